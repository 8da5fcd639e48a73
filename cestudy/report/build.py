"""Markdown reports from stored results: one page per study, the GPU page, an index, the figures
and the README's "Headline findings" section.

``build_reports(source, out)`` reads a SQLite store or the JSON export (``reports/data/
results.json``), never recomputes, and writes deterministically: the same results (and the same
code version) give byte-identical pages, with no run ids, regeneration dates or local paths.
Each study page is its header, then every section of ``cestudy.report.sections`` that reports a
kind of row the study holds, then its skipped cells. Every number in a finding is computed by
the sections from the rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import data, headline, sections
from .markdown import Context, table

EXPORT_NAME = "results.json"
CUDA_NAME = "cuda_bench.json"


def current_code_version() -> str:
    """The code version that would produce results now (``cestudy.study.runner``)."""
    from ..study import runner

    return runner.code_version()


def build_reports(source, out, export=True, code_version=None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    if source.suffix != ".json":
        from ..study.store import Store

        with Store(source) as store:
            json_path = data.write_export(store, out / "data" / EXPORT_NAME) if export else None
        doc = data.load_document(json_path) if json_path else data.load_document(source)
    else:
        doc = data.load_document(source)
    code_version = code_version or current_code_version()
    by_study = {}
    for row in doc["cells"]:
        by_study.setdefault(row["study"], []).append(row)
    (out / "figures").mkdir(exist_ok=True)
    written, figures, pages = [], [], {}
    for study in sorted(by_study):
        ctx = Context(out, study)
        md, found = study_page(ctx, by_study[study], doc["runs"], code_version)
        path = out / f"{study}.md"
        path.write_text(md)
        written.append(path)
        figures += ctx.figures
        pages[study] = found
    cuda_doc = None
    cuda_json = out / "data" / CUDA_NAME
    if not cuda_json.exists() and source.suffix == ".json":
        cuda_json = source.parent / CUDA_NAME
    if cuda_json.exists():
        cuda_doc = json.loads(cuda_json.read_text())
        ctx = Context(out, sections.cuda.PAGE)
        part = sections.cuda.render(ctx, cuda_doc)
        (out / "cuda.md").write_text(part.markdown)
        written.append(out / "cuda.md")
        figures += ctx.figures
    top = headline.findings(by_study, set(figures), cuda_doc, code_version)
    index = out / "README.md"
    index.write_text(index_page(top, by_study, doc["runs"], cuda_doc, code_version))
    written.append(index)
    _remove_stale_figures(out / "figures", figures)
    readme = out.resolve().parent / "README.md"
    if readme.exists() and headline.README_START in readme.read_text():
        text = readme.read_text()
        new = headline.replace_readme_section(
            text, headline.readme_section(top, prefix=f"{out.resolve().name}/")
        )
        if new != text:
            readme.write_text(new)
        written.append(readme)
    return written


def _remove_stale_figures(folder: Path, keep):
    """Figures of an earlier build that this one did not draw (a renamed variant, a study
    gone) would be orphans: remove them."""
    keep = {Path(k).name for k in keep}
    for png in folder.glob("*.png"):
        if png.name not in keep:
            png.unlink()


# --------------------------------------------------------------------------------------------
# One study
# --------------------------------------------------------------------------------------------
def _runs_of(rows, runs):
    ids = {r["run_id"] for r in rows}
    return sorted(
        (r for r in runs if r["run_id"] in ids),
        key=lambda r: (r.get("manifest", {}).get("date", ""), r.get("finished") or ""),
    )


def study_page(ctx: Context, rows, runs, code_version):
    mine = _runs_of(rows, runs)
    manifest = mine[-1]["manifest"] if mine else {}
    desc = manifest.get("study_description", "")
    parts = [
        f"# Study `{ctx.study}`\n",
        desc + "\n" if desc else "",
        "Regenerate with `python -m cestudy report` (from stored results) or "
        f"`python -m cestudy run {ctx.study}` (recompute).\n",
        code_version_section(ctx.study, rows, code_version),
        "## What was swept\n",
        swept_table(rows),
        "## Machine and versions\n",
        machine_table(manifest, len(mine)),
    ]
    found = []
    kinds = {r["kind"] for r in rows}
    for section in sections.for_kinds(kinds):
        part = section.render(ctx, rows)
        if part.markdown:
            parts.append(part.markdown)
        found += part.findings
    unknown = kinds - sections.known_kinds()
    if unknown:
        parts.append(
            "## Cells of unknown kinds\n\nNo report section knows the kinds "
            + ", ".join(f"`{k}`" for k in sorted(unknown))
            + "; their rows are in "
            "the results but not on this page.\n"
        )
    parts.append(status_section(rows))
    return "\n".join(p for p in parts if p), found


def code_version_section(study, rows, current):
    counts = {}
    for r in rows:
        counts[r.get("code_version") or "unknown"] = (
            counts.get(r.get("code_version") or "unknown", 0) + 1
        )
    listed = ", ".join(f"`{v}` ({n} cells)" for v, n in sorted(counts.items()))
    text = f"## Code version\n\nThese results come from code version {listed}."
    if set(counts) != {current}:
        # which cells are older, by implementation (and kind), so that a reader can tell
        # cells a rerun here cannot redo (CUDA without a GPU) from those it would
        older = {}
        for r in rows:
            if (r.get("code_version") or "unknown") != current:
                what = r.get("p_implementation") or r["kind"]
                older[what] = older.get(what, 0) + 1
        which = ", ".join(f"{what} {n}" for what, n in sorted(older.items()))
        text += (
            f" **The code that produces {sum(older.values())} of them has changed since** "
            f"({which}; the current code version differs): rerun `python -m cestudy run "
            f"{study}` to bring them up to date. Cells that need what this machine lacks (a "
            "GPU, a package) or that the study no longer sweeps keep their older results."
        )
    else:
        text += " That is the current code version."
    return text + "\n"


def swept_table(rows):
    axes = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("p_"):
                axes.setdefault((r["kind"], k[2:]), set()).add(v)
    out = []
    for (kind, axis), vals in sorted(axes.items()):
        shown = sorted(vals, key=lambda v: (str(type(v)), v))
        text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in shown)
        if len(text) > 160:
            text = text[:157] + "..."
        out.append((kind, axis, text))
    counts = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    head = ", ".join(f"{v} {k} cells" for k, v in sorted(counts.items()))
    return f"{len(rows)} cells ({head}).\n\n" + table(["kind", "axis", "values"], out)


MACHINE_KEYS = (
    "cpu_model",
    "cpu_count",
    "cpu_features",
    "threading_layer",
    "numba_threads",
    "python",
    "numba",
    "llvmlite",
    "numpy",
    "scipy",
    "torch",
    "numba_cuda",
    "cuda",
    "platform",
    "git_commit",
    "date",
)


def machine_table(m, n_runs):
    if not m:
        return "No run manifest stored.\n"
    rows = [(k, str(m.get(k, ""))) for k in MACHINE_KEYS if k in m]
    note = (
        "From the manifest of the run these cells come from."
        if n_runs == 1
        else f"From the manifest of the latest of the {n_runs} runs these cells come from."
    )
    return note + "\n\n" + table(["", ""], rows)


def status_section(rows):
    bad = [r for r in rows if r["status"] != "ok"]
    if not bad:
        return "## Skipped and failed cells\n\nNone: every cell ran.\n"
    reasons = {}
    for r in bad:
        key = (r["status"], r.get("p_implementation", ""), r["message"][:120])
        reasons[key] = reasons.get(key, 0) + 1
    lines = [(s, impl, n, msg) for (s, impl, msg), n in sorted(reasons.items())]
    return (
        "## Skipped and failed cells\n\nSkipped cells are implementations unavailable on the "
        "machine that ran the study; they are recorded with the reason.\n\n"
        + table(["status", "implementation", "cells", "reason"], lines)
    )


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------
def index_page(top, by_study, runs, cuda_doc, code_version):
    lines = [
        "# cestudy reports\n",
        "Generated by `python -m cestudy report` from the results in `data/results.json` "
        "(or a local `results/cestudy.sqlite`). Each study's page lists what was swept, "
        "the code version and machine it ran on, tables, figures and findings computed "
        "from the results.\n",
        "## Headline findings\n",
    ]
    lines += [f"- {f.markdown()}" for f in top]
    lines.append("\n## Which formulation to use\n")
    lines.append(headline.which_table(by_study))
    lines.append("## Studies\n")
    if cuda_doc is not None:
        lines.append(
            f"- [cuda](cuda.md): the CUDA kernels measured on {cuda_doc.get('device', 'a GPU')}."
        )
    for study in sorted(by_study):
        rows = by_study[study]
        mine = _runs_of(rows, runs)
        m = mine[-1]["manifest"] if mine else {}
        ok = sum(r["status"] == "ok" for r in rows)
        stale = any(r.get("code_version") != code_version for r in rows)
        lines.append(
            f"- [{study}]({study}.md): {len(rows)} cells ({ok} ran), on "
            f"{m.get('cpu_model', 'unknown CPU')} with {m.get('cpu_count', '?')} cores"
            f", {m.get('date', '')[:10]}" + ("; older than the current code." if stale else ".")
        )
    lines.append("")
    return "\n".join(lines)
