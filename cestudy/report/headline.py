"""The index's headline: at most six findings and the "which formulation to use" table, and the
README's "Headline findings" section, all computed from the stored rows.

Each finding is one sentence with its number, its figure and its page, chosen from the study
that holds the most evidence for it. The README section is the same findings with links into
``reports/``, written between ``README_START`` and ``README_END``.
"""

from __future__ import annotations

import math

from .. import variants
from .figures import DTYPE_ORDER, _num, _ordered
from .markdown import Finding, fmt_pct, table, ulp_phrase
from .sections import accuracy, cuda, higham, imbalance, performance

MAX_FINDINGS = 6
README_START = "<!-- findings:start -->"
README_END = "<!-- findings:end -->"


def _default_options(label):
    """Whether an imbalance label's gamma (if any) is its variant's default."""
    v = variants.VARIANTS.get(label.split(" ")[0])
    gamma = v.defaults.get("gamma") if v else None
    return "gamma" not in label or (gamma is not None and f"gamma {gamma:g}" in label)


def _home(by_study, kind):
    """The study that reports ``kind``: the one made only of it with the most such rows, else the
    one with the most such rows."""
    counts = {s: sum(r["kind"] == kind for r in rows) for s, rows in by_study.items()}
    counts = {s: n for s, n in counts.items() if n}
    if not counts:
        return None
    pure = [s for s in counts if all(r["kind"] == kind for r in by_study[s])]
    pool = pure or list(counts)
    return max(sorted(pool), key=lambda s: counts[s])


def _figure(figures, study, name):
    rel = f"figures/{study}-{name}.png"
    return rel if rel in figures else None


def _best_study(by_study, fn):
    """The study whose accuracy rows ``fn`` finds the most evidence in: (study, rows)."""
    best = None
    for study in sorted(by_study):
        acc = accuracy.ok_rows(by_study[study])
        n = fn(acc)
        if n and not math.isnan(n) and (best is None or n > best[0]):
            best = (n, study, acc)
    return (best[1], best[2]) if best else (None, [])


def findings(by_study, figures, cuda_doc=None, code_version=None) -> list[Finding]:
    out = []
    first = variants.VARIANTS and next(iter(variants.VARIANTS))
    # 1. confident rows
    study, acc = _best_study(by_study, lambda a: sum(c[2] for c in accuracy.confident(a).values()))
    if study:
        text = accuracy.confident_sentence(acc)
        if text:
            out.append(Finding(text, f"{study}.md", _figure(figures, study, "true-class-gradient")))
    # 2. the accuracy contract over every accuracy cell of every study, exclusions stated
    every = [r for s in sorted(by_study) for r in accuracy.ok_rows(by_study[s])]
    text = accuracy.contract_sentence(every)
    if text:
        study, _ = _best_study(
            by_study, lambda a: sum(r["p_dtype"] in ("float16", "bfloat16") for r in a)
        )
        study = study or _home(by_study, "accuracy")
        out.append(Finding(text, f"{study}.md", _figure(figures, study, f"error-vs-scale-{first}")))
    # 3. naive and clipped: the study holding the cell where clipping biases the loss most
    study, acc = _best_study(
        by_study,
        lambda a: (
            -_num(
                (accuracy.clipping_worst([r for r in a if r["p_dtype"] == "float32"])[0] or {}).get(
                    "clip_bias_nats", math.nan
                )
            )
            if accuracy.naive_nonfinite_from(a, "float32")
            else None
        ),
    )
    if study:
        text = accuracy.clipping_sentence(acc, "float32")
        if text:
            out.append(Finding(text, f"{study}.md", _figure(figures, study, "clipping")))
    # 4. speed, CPU and GPU
    study = _home(by_study, "performance")
    best_perf = None
    for s in sorted(by_study):
        big = performance.largest(performance.ok_rows(by_study[s]))
        if big and (best_perf is None or big[0]["p_batch"] * big[0]["p_classes"] > best_perf[0]):
            best_perf = (big[0]["p_batch"] * big[0]["p_classes"], s)
    if best_perf:
        study = best_perf[1]
        perf = performance.ok_rows(by_study[study])
        text = performance.speed_sentence(perf)
        if code_version and any(r.get("code_version") != code_version for r in perf):
            text = text[:-1] + (
                " (timed by code older than the current version; "
                "`python -m cestudy bench` re-times it)."
            )
        big = performance.largest(perf)
        clause = cuda.speed_clause(cuda_doc) if cuda_doc else None
        if clause:
            text = text[:-1] + f"; {clause}."
        cases = performance.cases_sentence(perf)
        if cases:  # every shape, not only the largest
            text += " " + cases
        out.append(
            Finding(
                text,
                f"{study}.md",
                _figure(figures, study, f"throughput-{big[0]['p_variant']}-{big[0]['p_dtype']}"),
                ("cuda.md",) if clause else (),
            )
        )
    # 5. imbalance
    study = _home(by_study, "imbalance")
    if study:
        rows = by_study[study]
        top = imbalance.top_ratio(rows)
        if top:
            shares = top[2]
            plain = [lab for lab in shares if "weights" not in lab and _default_options(lab)]
            weighted = [lab for lab in shares if "weights" in lab]
            pick = plain + ([max(weighted, key=lambda lab: shares[lab][0])] if weighted else [])
            text = imbalance.share_sentence(rows, labels=pick)
            out.append(Finding(text, f"{study}.md", _figure(figures, study, "imbalance")))
    # 6. Blanchard-Higham
    study = _home(by_study, "higham")
    if study:
        text = higham.overflow_sentence(higham.ok_rows(by_study[study]))
        if text:
            out.append(Finding(text, f"{study}.md", _figure(figures, study, "higham")))
    return out[:MAX_FINDINGS]


# --------------------------------------------------------------------------------------------
# Which formulation to use
# --------------------------------------------------------------------------------------------
CASES = (
    (
        "typical logits (scale <= 10)",
        lambda r: r["p_family"] == "gaussian" and _num(r["p_scale"]) <= 10 and _plain(r),
    ),
    (
        "large logits (scale > 10)",
        lambda r: r["p_family"] == "gaussian" and _num(r["p_scale"]) > 10 and _plain(r),
    ),
    (
        f"confident rows (margin >= {accuracy.CONFIDENT_MARGIN:g})",
        lambda r: (
            r["p_family"] == "dominant"
            and _num(r["p_scale"]) >= accuracy.CONFIDENT_MARGIN
            and _plain(r)
        ),
    ),
    ("large equal offsets", lambda r: r["p_family"] == "equal_offset" and _plain(r)),
    ("masked classes (-inf)", lambda r: r["p_family"] == "masked"),
    ("near overflow", lambda r: r["p_family"] == "near_overflow"),
    (
        "imbalance 100, class weights, ignored targets, smoothing",
        lambda r: _num(r.get("p_imbalance", 1.0)) > 1,
    ),
)
COLUMNS = ("naive", "clipped", "lse", "torch", "numba")


def _plain(r):
    return (
        _num(r.get("p_imbalance", 1.0)) == 1
        and r.get("p_class_weight", "none") == "none"
        and _num(r.get("p_ignore_fraction", 0.0)) == 0
        and _num(r.get("p_label_smoothing", 0.0)) == 0
    )


def _cell(rows):
    if not rows:
        return "not run", math.nan
    w = accuracy.worst(rows, "fwd_max_ulp")
    nonfin = max(_num(r.get("fwd_frac_nan")) + _num(r.get("fwd_frac_inf")) for r in rows)
    if nonfin > 0:
        return f"non-finite on {fmt_pct(nonfin)} of samples", math.inf
    if math.isinf(w):
        # finite outputs: the exact loss is infinite (a masked true class), or the error is
        # beyond float64's range of ulp counts (a clipped loss where the exact one is e^-700)
        return "over 1e308 ulp", math.inf
    return ulp_phrase(w), w


def which_table(by_study, variant=None) -> str:
    every = [r for s in sorted(by_study) for r in accuracy.ok_rows(by_study[s])]
    variant = variant or next(
        (v for v in variants.VARIANTS if any(r["p_variant"] == v for r in every)), None
    )
    if variant is None:
        return ""
    every = [r for r in every if r["p_variant"] == variant]
    cols = [c for c in COLUMNS if any(r["p_implementation"] == c for r in every)]
    out = []
    for label, pred in CASES:
        sel = [r for r in every if pred(r)]
        for dt in _ordered({r["p_dtype"] for r in sel}, DTYPE_ORDER):
            cells = {
                c: _cell([r for r in sel if r["p_dtype"] == dt and r["p_implementation"] == c])
                for c in cols
            }
            measured = {c: v for c, (_, v) in cells.items() if not math.isnan(v)}
            if not measured:
                continue
            good = [c for c, v in measured.items() if v <= accuracy.CONTRACT_ULP]
            best = min(measured.values())
            use = (
                ", ".join(good)
                if good
                else (
                    "none within 4 ulp; least bad: "
                    + ", ".join(c for c, v in measured.items() if v == best)
                )
            )
            n = len(
                {
                    tuple(
                        sorted(
                            (k, str(v))
                            for k, v in r.items()
                            if k.startswith("p_") and k != "p_implementation"
                        )
                    )
                    for r in sel
                    if r["p_dtype"] == dt
                }
            )
            out.append((label, dt, n, *(cells[c][0] for c in cols), use))
    head = ["case", "dtype", "cells", *cols, f"within {accuracy.CONTRACT_ULP:g} ulp"]
    v = variants.VARIANTS.get(variant)
    return (
        f"Worst forward error of `{variant}`"
        + (f" ({v.description})" if v else "")
        + " over every accuracy cell of each case, against the oracle; `numba` is cestudy's "
        "kernels, `lse` the max-shifted log-sum-exp form, `non-finite` a NaN or infinite "
        "loss where the exact one is finite, `over 1e308 ulp` a finite loss where the exact "
        "one is infinite (a masked true class) or an error too large to count in float64 "
        "(epsilon clipping on confident float64 rows). The last column lists the formulations "
        f"within the kernels' {accuracy.CONTRACT_ULP:g}-ulp contract in that case.\n\n"
        + table(head, out)
    )


def readme_section(found: list[Finding], prefix: str = "reports/") -> str:
    lines = [
        README_START,
        "Computed by `python -m cestudy report` from the committed results "
        f"([{prefix}data/results.json]({prefix}data/results.json)); each finding links its "
        "figure and the report page that holds the evidence.",
        "",
    ]
    lines += [f"- {f.markdown(prefix)}" for f in found]
    lines.append(README_END)
    return "\n".join(lines)


def replace_readme_section(text: str, section: str) -> str:
    """``text`` with the part between the markers (inclusive) replaced by ``section``."""
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    return text[:start] + section + text[end:]
