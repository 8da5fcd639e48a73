"""Markdown reports from stored results: one file per study, an index, and the figures.

``build_reports(source, out)`` reads a SQLite store or the JSON export (``reports/data/
results.json``), never recomputes, and writes deterministically: the same results give
byte-identical Markdown. Every number in a finding is computed here from the rows.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import data, figures
from .figures import DTYPE_ORDER, IMPL_ORDER, _num, _ordered

EXPORT_NAME = "results.json"


def build_reports(source, out, export=True) -> list[Path]:
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
    runs = {r["run_id"]: r for r in doc["runs"]}
    by_study = {}
    for row in doc["cells"]:
        by_study.setdefault(row["study"], []).append(row)
    (out / "figures").mkdir(exist_ok=True)
    written = []
    summaries = {}
    for study in sorted(by_study):
        md, headline = study_report(study, by_study[study], runs, out)
        path = out / f"{study}.md"
        path.write_text(md)
        written.append(path)
        summaries[study] = headline
    # the GPU benchmark's JSON lives beside the results export (reports/data/)
    cuda_json = out / "data" / "cuda_bench.json"
    if not cuda_json.exists() and source.suffix == ".json":
        cuda_json = source.parent / "cuda_bench.json"
    if cuda_json.exists():
        import json

        md, headline = cuda_report(json.loads(cuda_json.read_text()), out)
        (out / "cuda.md").write_text(md)
        written.append(out / "cuda.md")
        summaries["cuda"] = headline
    index = out / "README.md"
    index.write_text(index_page(summaries, by_study, runs))
    written.append(index)
    return written


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------
def fmt_ulp(v):
    v = _num(v)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "NaN/inf"
    if v >= 1e4:
        return f"{v:.2e}"
    return f"{v:.3g}"


def fmt_pct(v):
    v = _num(v)
    if math.isnan(v):
        return "n/a"
    return f"{100 * v:.3g}%" if 0 < abs(v) < 0.01 else f"{100 * v:.1f}%"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _manifest(rows, runs):
    ids = sorted({r["run_id"] for r in rows if r["run_id"] in runs})
    return runs[ids[-1]]["manifest"] if ids else {}, ids


def _figure(out, study, name, fn, *args, **kw):
    rel = f"figures/{study}-{name}.png"
    if fn(*args, out / rel, **kw):
        return rel
    return None


# --------------------------------------------------------------------------------------------
# One study
# --------------------------------------------------------------------------------------------
def study_report(study, rows, runs, out):
    manifest, run_ids = _manifest(rows, runs)
    desc = manifest.get("study_description", "")
    parts = [f"# Study `{study}`\n", desc + "\n" if desc else ""]
    parts.append("Regenerate with `python -m cestudy report` (from stored results) or "
                 f"`python -m cestudy run {study}` (recompute).\n")
    parts.append("## What was swept\n")
    parts.append(swept_table(rows))
    parts.append("## Machine and versions\n")
    parts.append(machine_table(manifest, run_ids))
    headline = []
    kinds = {r["kind"] for r in rows}
    if "accuracy" in kinds:
        body, h = accuracy_section(study, rows, out)
        parts.append(body)
        headline += h
    if "imbalance" in kinds:
        body, h = imbalance_section(study, rows, out)
        parts.append(body)
        headline += h
    if "performance" in kinds:
        body, h = performance_section(study, rows, out)
        parts.append(body)
        headline += h
    if kinds & {"coldstart", "scaling", "worstcase"}:
        parts.append(bench_extras_section(rows))
    if "training" in kinds:
        body, h = training_section(study, rows, out)
        parts.append(body)
        headline += h
    if "higham" in kinds:
        body, h = higham_section(study, rows, out)
        parts.append(body)
        headline += h
    parts.append(status_section(rows))
    return "\n".join(p for p in parts if p), headline


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


def machine_table(m, run_ids):
    if not m:
        return "No run manifest stored.\n"
    keys = ["cpu_model", "cpu_count", "cpu_features", "threading_layer", "numba_threads",
            "python", "numba", "llvmlite", "numpy", "scipy", "torch", "numba_cuda", "cuda",
            "platform", "git_commit", "date"]
    rows = [(k, str(m.get(k, ""))) for k in keys if k in m]
    note = f"From the manifest of run {run_ids[-1]}" + (
        f" (the cells come from runs {', '.join(map(str, run_ids))})." if len(run_ids) > 1
        else ".")
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
    return ("## Skipped and failed cells\n\nSkipped cells are implementations unavailable on the "
            "machine that ran the study; they are recorded with the reason.\n\n"
            + table(["status", "implementation", "cells", "reason"], lines))


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------
def _worst(rows, metric):
    vals = [_num(r.get(metric)) for r in rows]
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) if vals else math.nan


def accuracy_table(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["p_implementation"], r["p_dtype"]), []).append(r)
    out = []
    for impl in _ordered({k[0] for k in groups}, IMPL_ORDER):
        for dt in _ordered({k[1] for k in groups if k[0] == impl}, DTYPE_ORDER):
            g = groups[(impl, dt)]
            over = np.mean([_num(r.get("fwd_frac_over_4ulp")) for r in g])
            nonfin = np.mean([_num(r.get("fwd_frac_nan")) + _num(r.get("fwd_frac_inf"))
                              for r in g])
            finite_max = max((_num(r.get("fwd_max_ulp")) for r in g
                              if math.isfinite(_num(r.get("fwd_max_ulp")))), default=math.nan)
            out.append((impl, dt, len(g), fmt_ulp(_worst(g, "fwd_p99_ulp")),
                        fmt_ulp(_worst(g, "fwd_max_ulp")), fmt_ulp(finite_max),
                        fmt_pct(over), fmt_pct(nonfin),
                        fmt_ulp(_worst(g, "grad_max_ulp")),
                        fmt_pct(_worst(g, "grad_true_frac_vanished"))))
    return table(["implementation", "dtype", "cells", "worst p99 (ulp)", "worst max (ulp)",
                  "worst finite max (ulp)", "samples > 4 ulp", "spurious NaN/inf",
                  "grad worst (ulp)", "true-class grad wrongly 0 (worst cell)"], out)


def accuracy_section(study, rows, out):
    acc = [r for r in rows if r["kind"] == "accuracy" and r["status"] == "ok"]
    parts = ["## Accuracy against the oracle\n",
             "Errors are in ulps of the dtype under test against the extended-precision oracle "
             "(`cestudy.oracle`); `NaN/inf` means a non-finite result where the exact loss is "
             "finite. Gradient errors use the contract's measure (relative, or in ulps of the "
             "row's largest element). The numba kernels' contract is 4 ulp.\n"]
    variants = sorted({r["p_variant"] for r in acc})
    for v in variants:
        parts.append(f"### `{v}`\n")
        parts.append(accuracy_table([r for r in acc if r["p_variant"] == v]))
    figs = []
    for v in ("ce_index", "bce_logits", "ce_prob", "kl", "focal_softmax", "focal_sigmoid"):
        if v in variants:
            rel = _figure(out, study, f"error-vs-scale-{v}", figures.fig_error_vs_scale, acc,
                          variant=v)
            if rel:
                figs.append((f"Forward error vs logit scale, {v}", rel))
            if v == "ce_index":
                break
    for dt in ("float32", "float64"):
        rel = _figure(out, study, f"atlas-{dt}", figures.fig_atlas, acc, dtype=dt)
        if rel:
            figs.append((f"Stability atlas, {dt}", rel))
    rel = _figure(out, study, "nonfinite", figures.fig_nonfinite, acc)
    if rel:
        figs.append(("Non-finite results vs logit scale", rel))
    rel = _figure(out, study, "clipping", figures.fig_clipping, acc)
    if rel:
        figs.append(("Epsilon clipping: bias and zeroed gradients", rel))
    rel = _figure(out, study, "true-class-gradient", figures.fig_true_class_gradient, acc)
    if rel:
        figs.append(("True-class gradient on confident rows", rel))
    if figs:
        parts.append("### Figures\n")
        parts += [f"![{title}]({rel})\n" for title, rel in figs]
    findings = accuracy_findings(acc)
    parts.append("### Findings\n")
    parts += [f"- {f}" for f in findings]
    parts.append("")
    return "\n".join(parts), findings[:2]


def accuracy_findings(acc):
    f = []
    for dt in _ordered({r["p_dtype"] for r in acc}, DTYPE_ORDER):
        kern = [r for r in acc if r["p_implementation"] == "numba" and r["p_dtype"] == dt
                and r["p_variant"] != "bce_probs"]
        torch = [r for r in acc if r["p_implementation"] == "torch" and r["p_dtype"] == dt
                 and r["p_variant"] != "bce_probs"]
        if kern:
            w = _worst(kern, "fwd_max_ulp")
            worst_cell = max(kern, key=lambda r: _num(r.get("fwd_max_ulp")))
            tw = _worst(torch, "fwd_max_ulp") if torch else math.nan
            f.append(f"{dt}: cestudy's numba kernels' worst forward error is {fmt_ulp(w)} ulp "
                     f"over {len(kern)} cells (worst: {worst_cell['p_variant']}, "
                     f"{worst_cell['p_family']} logits); torch's worst on the same cells is "
                     f"{fmt_ulp(tw)} ulp.")
    conf = [r for r in acc if r.get("p_family") == "dominant" and r["p_variant"] == "ce_index"
            and r["p_scale"] >= 20]
    for impl in ("torch", "lse", "numba"):
        sel = [r for r in conf if r["p_implementation"] == impl and r["p_dtype"] == "float32"]
        if sel:
            f.append(f"Confident rows (margin >= 20, float32, ce_index): {impl} has worst "
                     f"forward error {fmt_ulp(_worst(sel, 'fwd_max_ulp'))} ulp and zeroes "
                     f"{fmt_pct(_worst(sel, 'grad_true_frac_vanished'))} of true-class "
                     f"gradients in its worst cell.")
    naive = [r for r in acc if r["p_implementation"] == "naive" and r["p_family"] == "gaussian"
             and r["p_variant"] == "ce_index"]
    for dt in _ordered({r["p_dtype"] for r in naive}, DTYPE_ORDER):
        bad = sorted(r["p_scale"] for r in naive if r["p_dtype"] == dt and
                     _num(r.get("fwd_frac_nan")) + _num(r.get("fwd_frac_inf")) > 0)
        if bad:
            f.append(f"Naive softmax-then-log, {dt}: non-finite losses from logit scale "
                     f"{bad[0]:g} upward.")
    clip = [r for r in acc if r["p_implementation"] == "clipped" and
            r.get("clip_bias_nats") is not None and r["p_variant"] == "ce_index"]
    if clip:
        worst = min(clip, key=lambda r: _num(r.get("clip_bias_nats")))
        f.append(f"Epsilon clipping (eps = {worst['p_clip_eps']:g}, {worst['p_dtype']}) biases "
                 f"the loss by {_num(worst['clip_bias_nats']):.3g} nats on average where it "
                 f"engages in its worst cell ({worst['p_family']} logits at scale "
                 f"{worst['p_scale']:g}, {worst['p_classes']} classes), and zeroes the gradient "
                 f"of up to {fmt_pct(_worst(clip, 'clip_frac_grad_zeroed'))} of the rows of a "
                 f"cell.")
    return f


# --------------------------------------------------------------------------------------------
# Imbalance
# --------------------------------------------------------------------------------------------
def imbalance_section(study, rows, out):
    series = figures.imbalance_series(rows)
    parts = ["## Class imbalance\n",
             "A classifier that has learned the class prior (logits log prior + N(0, 1) noise + "
             "a margin of 2 on the true class) scored under each loss. Shares are means over "
             "seeds; the minority classes are the rarer half.\n"]
    out_rows = []
    for (label, prof, classes), d in sorted(series.items()):
        for ratio in sorted(d):
            loss_s, grad_s, samp = d[ratio]
            out_rows.append((label, prof, classes, f"{ratio:g}", fmt_pct(samp), fmt_pct(loss_s),
                             fmt_pct(grad_s)))
    parts.append(table(["loss", "profile", "classes", "ratio", "minority samples",
                        "minority loss", "minority gradient"], out_rows))
    rel = _figure(out, study, "imbalance", figures.fig_imbalance, rows)
    if rel:
        parts.append(f"![Minority share of loss and gradient]({rel})\n")
    findings = []
    classes = min((k[2] for k in series), default=None)
    for prof in ("step", "exp"):
        pick = {lab: d for (lab, p, c), d in series.items() if p == prof and c == classes}
        ratio = max((max(d) for d in pick.values()), default=None)
        if ratio is None:
            continue
        desc = "; ".join(f"{lab} {fmt_pct(d[ratio][0])}" for lab, d in sorted(pick.items())
                         if ratio in d)
        samp = next(iter(pick.values()))[ratio][2]
        findings.append(f"At imbalance {ratio:g} ({prof} profile, {classes} classes) the "
                        f"minority classes are {fmt_pct(samp)} of the samples; their share of the "
                        f"loss: {desc}.")
    parts.append("### Findings\n")
    parts += [f"- {f}" for f in findings]
    parts.append("")
    return "\n".join(parts), findings[:1]


# --------------------------------------------------------------------------------------------
# Performance
# --------------------------------------------------------------------------------------------
def performance_section(study, rows, out):
    perf = [r for r in rows if r["kind"] == "performance" and r["status"] == "ok"]
    parts = ["## Performance\n",
             "Medians of repeats after warm-up; the first call (JIT compilation, from the disk "
             "cache when present) is reported on its own. GB/s counts the logits and targets "
             "read plus the gradient written; the bandwidth is this machine's streaming-read "
             "bandwidth measured in the same run. Every timed result was checked against the "
             "oracle first (mean loss, and the gradient of the first rows).\n"]
    torch_t = {(r["p_variant"], r["p_dtype"], r["p_mode"], r["p_batch"], r["p_classes"]):
               r["median_s"] for r in perf if r["p_implementation"] == "torch"}
    out_rows = []
    for r in sorted(perf, key=lambda r: (r["p_variant"], r["p_dtype"], r["p_mode"],
                                         r["p_batch"], r["p_classes"],
                                         IMPL_ORDER.index(r["p_implementation"])
                                         if r["p_implementation"] in IMPL_ORDER else 99)):
        key = (r["p_variant"], r["p_dtype"], r["p_mode"], r["p_batch"], r["p_classes"])
        ratio = torch_t[key] / r["median_s"] if key in torch_t else math.nan
        out_rows.append((r["p_variant"], r["p_implementation"], r["p_mode"],
                         f"{r['p_batch']}x{r['p_classes']}", r["p_dtype"],
                         f"{1e3 * r['median_s']:.3g}", f"{r['gb_per_s']:.3g}",
                         fmt_pct(r["frac_bandwidth"]),
                         "n/a" if math.isnan(ratio) else f"{ratio:.2f}x",
                         f"{1e3 * r['compile_s']:.0f}", fmt_ulp(r.get("check_ulp"))))
    parts.append(table(["variant", "kernel", "mode", "shape", "dtype", "ms", "GB/s",
                        "of bandwidth", "vs torch", "first-call extra (ms)",
                        "mean-loss error (ulp)"], out_rows))
    figs = []
    for variant in ("ce_index", "ce_prob", "bce_logits"):
        for dt in ("float32", "float64"):
            rel = _figure(out, study, f"throughput-{variant}-{dt}", figures.fig_performance,
                          perf, variant=variant, dtype=dt)
            if rel:
                figs.append((f"Throughput {variant} {dt}", rel))
    parts += [f"![{t}]({rel})\n" for t, rel in figs]
    findings = []
    big = [r for r in perf if r["p_implementation"] == "numba" and r["p_dtype"] == "float32"
           and r["p_variant"] == "ce_index"]
    if big:
        top = max(r["p_batch"] * r["p_classes"] for r in big)
        for r in sorted((r for r in big if r["p_batch"] * r["p_classes"] == top),
                        key=lambda r: r["p_mode"]):
            key = (r["p_variant"], r["p_dtype"], r["p_mode"], r["p_batch"], r["p_classes"])
            ratio = torch_t.get(key)
            findings.append(
                f"ce_index {r['p_mode']}, {r['p_batch']}x{r['p_classes']} float32: numba "
                f"{1e3 * r['median_s']:.3g} ms, {r['gb_per_s']:.3g} GB/s "
                f"({fmt_pct(r['frac_bandwidth'])} of the measured bandwidth)"
                + (f", {ratio / r['median_s']:.2f}x torch's speed." if ratio else "."))
    parts.append("### Findings\n")
    parts += [f"- {f}" for f in findings]
    parts.append("")
    return "\n".join(parts), findings[:2]


def bench_extras_section(rows):
    ok = [r for r in rows if r["status"] == "ok"]
    parts = ["## Cold start, threads and the worst case\n"]
    for r in ok:
        if r["kind"] == "coldstart":
            parts.append(f"- Cold start (a fresh process: `import cestudy`, then the first forward "
                         f"and fused call on float32): **{r['cold_s']:.2f} s** with an empty Numba "
                         f"cache (compilation), **{r['warm_cache_s']:.2f} s** with the cache it "
                         f"left.")
    sc = sorted((r for r in ok if r["kind"] == "scaling"),
                key=lambda r: (r["p_mode"], r["p_implementation"], r["p_threads"]))
    if sc:
        parts.append("\nThreads (2048 x 32768 float32, the same run):\n")
        parts.append(table(["kernel", "mode", "threads", "ms"],
                           [(r["p_implementation"], r["p_mode"], r["p_threads"],
                             f"{1e3 * r['median_s']:.2f}") for r in sc]))
        for impl in sorted({r["p_implementation"] for r in sc}):
            for mode in sorted({r["p_mode"] for r in sc}):
                t = {r["p_threads"]: r["median_s"] for r in sc
                     if r["p_implementation"] == impl and r["p_mode"] == mode}
                if len(t) > 1:
                    lo, hi = min(t), max(t)
                    parts.append(f"- {impl} {mode}: {t[lo] / t[hi]:.2f}x faster with {hi} threads "
                                 f"than with {lo}.")
    wc = [r for r in ok if r["kind"] == "worstcase"]
    perf = {(r["p_mode"]): r["median_s"] for r in ok if r["kind"] == "performance"
            and r["p_implementation"] == "numba" and r["p_variant"] == "ce_index"
            and r["p_dtype"] == "float32" and r["p_batch"] == 2048 and r["p_classes"] == 32768}
    for r in sorted(wc, key=lambda r: r["p_mode"]):
        typical = perf.get(r["p_mode"])
        parts.append(f"- Every row confident-correct (true logit 50 above the rest), "
                     f"{r['p_mode']}, 2048 x 32768 float32: {1e3 * r['median_s']:.2f} ms"
                     + (f" (typical rows: {1e3 * typical:.2f} ms): the kernels have no slow "
                        "path for tiny losses." if typical else "."))
    parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _mean_sd(vals):
    vals = [v for v in (_num(x) for x in vals) if not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def training_section(study, rows, out):
    tr = [r for r in rows if r["kind"] == "training" and r["status"] == "ok"]
    parts = ["## Training: the losses in gradient descent on real data\n",
             "Multinomial logistic regression (and a one-hidden-layer network) on scikit-learn's "
             "bundled `digits` and `breast_cancer`, the training split subsampled to each "
             "imbalance ratio, the test split balanced. Objective: mean loss + l2/2 ||W||^2 with "
             "l2 = 1/(C N), scikit-learn's LogisticRegression objective divided by C N, so the "
             "plain-CE L-BFGS run and `sklearn` solve the same problem. Values are mean ± "
             "standard deviation over seeds; `NaN runs` counts runs in which the loss or a "
             "gradient became NaN/inf (first step in the cell's metrics).\n"]
    groups = {}
    for r in tr:
        key = (r["p_dataset"], r["p_model"], r["p_optimizer"], r["p_imbalance"], r["p_profile"],
               r["p_loss"], r["p_dtype"])
        groups.setdefault(key, []).append(r)
    for ratio in sorted({k[3] for k in groups}):
        parts.append(f"### Imbalance ratio {ratio:g}\n")
        out_rows = []
        for key in sorted(k for k in groups if k[3] == ratio):
            g = groups[key]
            nan_runs = sum(1 for r in g if r.get("first_nonfinite_step"))
            out_rows.append((key[0], key[1], key[2], key[4], key[5], key[6], len(g),
                             _mean_sd(r["balanced_accuracy"] for r in g),
                             _mean_sd(r["minority_recall"] for r in g),
                             _mean_sd(r["macro_f1"] for r in g), _mean_sd(r["ece"] for r in g),
                             _mean_sd(r["final_train_loss"] for r in g),
                             _mean_sd(r["converged_at"] for r in g), nan_runs))
        parts.append(table(["dataset", "model", "optimiser", "profile", "loss", "dtype", "runs",
                            "balanced acc.", "minority recall", "macro F1", "ECE",
                            "final train loss", "converged at (epoch/iter)", "NaN runs"],
                           out_rows))
    for name, fn, title in (("training-curves", figures.fig_training_curves, "Learning curves"),
                            ("training-bacc", figures.fig_training_bacc,
                             "Balanced accuracy vs imbalance")):
        rel = _figure(out, study, name, fn, tr)
        if rel:
            parts.append(f"![{title}]({rel})\n")
    findings = training_findings(groups)
    parts.append("### Findings\n")
    parts += [f"- {f}" for f in findings]
    parts.append("")
    return "\n".join(parts), findings[:2]


def training_findings(groups):
    f = []

    def mean(key, metric):
        g = groups.get(key)
        if not g:
            return math.nan
        return float(np.nanmean([_num(r.get(metric)) for r in g]))

    for ds in sorted({k[0] for k in groups}):
        ratios = sorted({k[3] for k in groups if k[0] == ds})
        if not ratios:
            continue
        top = ratios[-1]
        base = (ds, "logreg", "lbfgs", top, "step")
        parts = []
        for loss, dt in (("ce", "float32"), ("ce_inverse", "float32"), ("ce_effective", "float32"),
                         ("focal2", "float32"), ("sklearn", "float64"),
                         ("sklearn_balanced", "float64")):
            v = mean(base + (loss, dt), "balanced_accuracy")
            if not math.isnan(v):
                parts.append(f"{loss} {v:.3f}")
        if parts:
            f.append(f"{ds}, imbalance {top:g} (step), L-BFGS logistic regression, balanced "
                     f"accuracy: " + ", ".join(parts) + ".")
        ours = mean((ds, "logreg", "lbfgs", 1.0, "step", "ce", "float32"), "final_train_loss")
        sk = mean((ds, "logreg", "lbfgs", 1.0, "step", "sklearn", "float64"), "final_train_loss")
        binary = ds == "breast_cancer"
        if binary and not (math.isnan(ours) or math.isnan(sk)):
            f.append(f"{ds}: scikit-learn fits a binary problem with one weight vector (penalty "
                     f"||w||^2 / 2) where the softmax model has two, so their objectives differ "
                     f"by design ({ours:.4f} vs {sk:.4f}); the like-for-like check is digits.")
        elif not (math.isnan(ours) or math.isnan(sk)):
            f.append(f"{ds}: the plain-CE L-BFGS objective {ours:.6f} vs scikit-learn's "
                     f"{sk:.6f} on the same balanced splits (relative gap "
                     f"{abs(ours - sk) / abs(sk):.1e}).")
    nan_by = {}
    for key, g in groups.items():
        lab = (key[5], key[6])
        runs = nan_by.setdefault(lab, [0, 0])
        runs[0] += sum(1 for r in g if r.get("first_nonfinite_step"))
        runs[1] += len(g)
    bad = sorted((k, v) for k, v in nan_by.items() if v[0])
    if bad:
        f.append("Runs that hit NaN/inf: " + "; ".join(f"{loss} in {dt}: {a} of {b}"
                                                        for (loss, dt), (a, b) in bad)
                 + ". No cestudy loss did." if not any(k[0] in ("ce", "ce_inverse",
                                                                "ce_effective", "focal1",
                                                                "focal2", "smooth")
                                                       for k, _ in bad)
                 else "Runs that hit NaN/inf: " + "; ".join(
                     f"{loss} in {dt}: {a} of {b}" for (loss, dt), (a, b) in bad) + ".")
    return f


# --------------------------------------------------------------------------------------------
# Blanchard-Higham
# --------------------------------------------------------------------------------------------
def higham_section(study, rows, out):
    hr = sorted((r for r in rows if r["kind"] == "higham" and r["status"] == "ok"),
                key=lambda r: (r["p_dtype"], r["p_formulation"]))
    parts = ["## Blanchard, Higham & Higham 2021 reproduction\n",
             "Their 2500 MNIST pre-softmax vectors rounded to the low precision, the "
             "log-sum-exp evaluated with every operation rounded to that precision; the error "
             "is measured against the oracle on the rounded vector, in units of the format's "
             "unit roundoff u.\n"]
    if not hr:
        parts.append("No results: the data was not found when the study ran (see skipped "
                     "cells).\n")
        return "\n".join(parts), []
    out_rows = [(r["p_dtype"], r["p_formulation"], r["overflow"], r["published_overflow"],
                 fmt_ulp(r["err_over_u_median"]), fmt_ulp(r["err_over_u_max"]),
                 fmt_ulp(r["bound_median"]), fmt_pct(r["frac_within_bound"])) for r in hr]
    parts.append(table(["precision", "form", "overflows (this run)", "overflows (published)",
                        "median error/u", "max error/u", "median bound", "within bound"],
                       out_rows))
    rel = _figure(out, study, "higham", figures.fig_higham, rows)
    if rel:
        parts.append(f"![Blanchard-Higham reproduction]({rel})\n")
    match = all(r["overflow"] == r["published_overflow"] for r in hr)
    basic16 = next((r for r in hr if r["p_dtype"] == "float16" and r["p_formulation"] == "basic"),
                   None)
    findings = []
    if basic16:
        findings.append(f"fp16 basic log-sum-exp overflows on {basic16['overflow']} of "
                        f"{basic16['n_vectors']} vectors (published: "
                        f"{basic16['published_overflow']}); the shifted form on "
                        + ", ".join(f"{r['overflow']} ({r['p_dtype']})" for r in hr
                                    if r["p_formulation"] == "shifted") + ".")
    findings.append("All overflow counts match the published ones." if match else
                    "Overflow counts differ from the published ones (see the table).")
    parts.append("### Findings\n")
    parts += [f"- {f}" for f in findings]
    parts.append("")
    return "\n".join(parts), findings[:1]


# --------------------------------------------------------------------------------------------
# GPU benchmark (reports/data/cuda_bench.json, written by `python -m cestudy bench --backend cuda`)
# --------------------------------------------------------------------------------------------
def cuda_report(doc, out):
    m = doc.get("machine", {})
    bw = doc.get("copy_bandwidth_gbs")
    parts = ["# CUDA kernels on a GPU\n",
             f"Measured by `python -m cestudy bench --backend cuda` on an **{doc.get('device')}** "
             f"({doc.get('device_description')}) on {doc.get('date')}, from commit "
             f"`{doc.get('source_commit', m.get('git_commit', 'unknown'))}`; numba "
             f"{m.get('numba')}, numba-cuda {m.get('numba_cuda')}, torch {m.get('torch')}. "
             "Raw log: [data/cuda_bench.log](data/cuda_bench.log); the kernel tests "
             "(`tests/cudasim`, the simulator suite) run on the GPU: "
             "[data/cuda_gpu_tests.log](data/cuda_gpu_tests.log).\n",
             "Timings are CUDA-event medians after warm-up, inputs rotated over several buffers "
             "(at least three times the L2) so that they do not sit in L2. GB/s counts the logits "
             "read plus, for the fused kernels, the gradient written (the kernels themselves read "
             "the row a second time for the gradient). Every kernel was first checked against the "
             "oracle (per-sample losses of the first rows, gradients of the first four rows; "
             "`ulp` column). CUDA simulator timings are never recorded.\n",
             f"Device-to-device copy bandwidth (bytes read + written): **{bw:.0f} GB/s**.\n"
             if bw else ""]
    rows = []
    for r in doc.get("rows", []):
        if "ms" not in r:
            continue
        vs = r.get("vs_torch")
        rows.append((r["kernel"], f"{r['n']}x{r['c']}", r["dtype"],
                     "" if r.get("threads") is None else r["threads"], f"{r['ms']:.3f}",
                     f"{r['gb_per_s']:.0f}", fmt_pct(r["frac_copy_bw"]),
                     "" if vs is None else f"{vs:.2f}x",
                     "" if r.get("ulp") is None else fmt_ulp(r["ulp"])))
    parts.append(table(["kernel", "shape", "dtype", "threads/block", "ms", "GB/s",
                        "of copy bandwidth", "vs torch", "ulp (fwd)"], rows))
    rel = _figure(out, "cuda", "throughput", figures.fig_cuda, doc)
    if rel:
        parts.append(f"![GPU throughput]({rel})\n")
    best = {}
    for r in doc.get("rows", []):
        if "ms" in r and r["kernel"].startswith("cestudy") and r["dtype"] == "float32":
            key = (r["kernel"], r["n"], r["c"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    findings = []
    big = max((k[1] * k[2] for k in best), default=0)
    for (kernel, n, c), r in sorted(best.items()):
        if n * c == big and kernel in ("cestudy forward", "cestudy forward+grad"):
            findings.append(f"{kernel}, {n}x{c} float32: {r['ms']:.2f} ms, "
                            f"{fmt_pct(r['frac_copy_bw'])} of the copy bandwidth (target 80%: "
                            f"{'met' if r['frac_copy_bw'] >= 0.8 else 'not met'}), "
                            f"{r['vs_torch']:.2f}x the speed of torch's eager "
                            f"{'forward' if kernel.endswith('forward') else 'forward+backward'}"
                            f" ({r['threads']} threads per block).")
    slow = sorted({f"{n}x{c}" for (kernel, n, c), r in best.items()
                   if kernel == "cestudy forward" and r["vs_torch"] < 1},
                  key=lambda s: int(s.split("x")[1]))
    if slow:
        findings.append("Slower than torch's eager forward at " + ", ".join(slow) + ": the "
                        "float64 arithmetic that keeps the accuracy contract (about 20 double-"
                        "precision operations per element) bounds these kernels, not memory.")
    parts.append("## Findings\n")
    parts += [f"- {f}" for f in findings]
    parts.append("")
    return "\n".join(parts), findings[:2]


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------
def index_page(summaries, by_study, runs):
    lines = ["# cestudy reports\n",
             "Generated by `python -m cestudy report` from the results in `data/results.json` "
             "(or a local `results/cestudy.sqlite`). Each study's page lists what was swept, "
             "the machine it ran on, tables, figures and findings computed from the results.\n",
             "## Headline findings\n"]
    for study in sorted(summaries):
        for h in summaries[study]:
            lines.append(f"- [{study}]({study}.md): {h}")
    lines.append("\n## Studies\n")
    if "cuda" in summaries:
        lines.append("- [cuda](cuda.md): the CUDA kernels measured on a GPU.")
    for study in sorted(by_study):
        rows = by_study[study]
        m, _ = _manifest(rows, runs)
        ok = sum(r["status"] == "ok" for r in rows)
        lines.append(f"- [{study}]({study}.md): {len(rows)} cells ({ok} ran), on "
                     f"{m.get('cpu_model', 'unknown CPU')} with {m.get('cpu_count', '?')} cores"
                     f", {m.get('date', '')[:10]}.")
    lines.append("")
    return "\n".join(lines)
