"""Report section for ``accuracy`` cells: errors against the oracle, per variant and dtype.

Holds the tables, figures and findings of the accuracy studies (``default``, ``stability``,
``precision``) and the computations the index's findings and its "which formulation to use"
table reuse. Reads result rows only.
"""

from __future__ import annotations

import math

import numpy as np

from ... import variants
from .. import figures
from ..figures import DTYPE_ORDER, IMPL_ORDER, _num, _ordered
from ..markdown import (
    Context,
    Part,
    figure_block,
    fmt_pct,
    fmt_ulp,
    section,
    table,
    ulp_phrase,
    with_findings,
)

KINDS = ("accuracy",)
TITLE = "Accuracy against the oracle"
CONTRACT_ULP = 4.0
KERNEL = "numba"
"""The implementation that is cestudy's own kernels on the CPU."""
CONFIDENT_MARGIN = 20.0
"""Dominant-logit cells with at least this margin count as confident rows."""


def ok_rows(rows):
    return [r for r in rows if r["kind"] == "accuracy" and r["status"] == "ok"]


def worst(rows, metric):
    """The largest value of ``metric`` over ``rows`` (inf counts; NaN and missing do not)."""
    vals = [v for v in (_num(r.get(metric)) for r in rows) if not math.isnan(v)]
    return max(vals) if vals else math.nan


def worst_row(rows, metric):
    rows = [r for r in rows if not math.isnan(_num(r.get(metric)))]
    return max(rows, key=lambda r: _num(r.get(metric))) if rows else None


def variant_order(names):
    names = set(names)
    return [v for v in variants.VARIANTS if v in names] + sorted(names - set(variants.VARIANTS))


def has_grad(variant):
    v = variants.VARIANTS.get(variant)
    return v is None or v.has_grad


def without_kernel(names):
    """Variants that cestudy computes without a kernel of its own (in numpy, with a peer's
    semantics): their error is the peer's, so the kernels' findings leave them out and say so."""
    return [
        n
        for n in variant_order(names)
        if n in variants.VARIANTS and variants.VARIANTS[n].kernel is None
    ]


def _same_cells(rows, impl, like):
    """The rows of implementation ``impl`` on the same cells (every other parameter equal)."""

    def key(r):
        return tuple(
            sorted(
                (k, str(v)) for k, v in r.items() if k.startswith("p_") and k != "p_implementation"
            )
        )

    keys = {key(r) for r in like}
    return [r for r in rows if r["p_implementation"] == impl and key(r) in keys]


# --------------------------------------------------------------------------------------------
# Computations the findings use (also called by the index)
# --------------------------------------------------------------------------------------------
def kernel_worst(acc, dtypes):
    """cestudy's worst forward and gradient errors over every cell of ``dtypes``, the variants
    left out (no kernel of their own) with their worst error and torch's, and the cells that
    set the worst values."""
    names = {r["p_variant"] for r in acc if r["p_dtype"] in dtypes}
    out_names = without_kernel(names)
    kern = [r for r in acc if r["p_implementation"] == KERNEL and r["p_dtype"] in dtypes]
    kept = [r for r in kern if r["p_variant"] not in out_names]
    grad_rows = [r for r in kept if has_grad(r["p_variant"])]
    left = []
    for name in out_names:
        mine = [r for r in kern if r["p_variant"] == name]
        theirs = _same_cells(acc, "torch", mine)
        left.append((name, worst(mine, "fwd_max_ulp"), worst(theirs, "fwd_max_ulp")))
    return {
        "cells": len(kept),
        "fwd": worst(kept, "fwd_max_ulp"),
        "fwd_row": worst_row(kept, "fwd_max_ulp"),
        "grad": worst(grad_rows, "grad_max_ulp"),
        "grad_row": worst_row(grad_rows, "grad_max_ulp"),
        "torch": _same_cells(acc, "torch", kept),
        "left_out": left,
    }


def peer_phrase(cells) -> str:
    """ "up to 1.67e+07 ulp where finite, non-finite in 12 of 390 cells" for a peer's cells."""
    errs = [_num(r.get("fwd_max_ulp")) for r in cells]
    finite = [e for e in errs if math.isfinite(e)]
    text = f"up to {ulp_phrase(max(finite))}" if finite else "no finite result"
    bad = sum(1 for e in errs if not math.isfinite(e) and not math.isnan(e))
    if bad:
        text += f" where finite, non-finite in {bad} of {len(errs)} cells"
    return text


def left_out_clause(left):
    """ ", leaving out binary_cross_entropy, which has no kernel of its own (4.33e+07 ulp, as
    torch's)" for the variants ``kernel_worst`` left out."""
    parts = []
    for name, mine, theirs in left:
        same = "as torch's" if mine == theirs else f"torch's: {ulp_phrase(theirs)}"
        parts.append(f"{name}, which has no kernel of its own ({ulp_phrase(mine)}, {same})")
    return (", leaving out " + " and ".join(parts)) if parts else ""


def confident(acc, dtype="float32", variant="cross_entropy"):
    """{implementation: (worst forward error, worst fraction of true-class gradients wrongly 0)}
    on confident rows (dominant logits with a margin of at least ``CONFIDENT_MARGIN``)."""
    sel = [
        r
        for r in acc
        if r["p_family"] == "dominant"
        and r["p_variant"] == variant
        and r["p_dtype"] == dtype
        and _num(r["p_scale"]) >= CONFIDENT_MARGIN
    ]
    out = {}
    for impl in _ordered({r["p_implementation"] for r in sel}, IMPL_ORDER):
        g = [r for r in sel if r["p_implementation"] == impl]
        out[impl] = (worst(g, "fwd_max_ulp"), worst(g, "grad_true_frac_vanished"), len(g))
    return out


def naive_nonfinite_from(acc, dtype, variant="cross_entropy"):
    """The smallest logit scale at which naive softmax-then-log gives a non-finite loss."""
    bad = sorted(
        _num(r["p_scale"])
        for r in acc
        if r["p_implementation"] == "naive"
        and r["p_family"] == "gaussian"
        and r["p_variant"] == variant
        and r["p_dtype"] == dtype
        and _num(r.get("fwd_frac_nan")) + _num(r.get("fwd_frac_inf")) > 0
    )
    return bad[0] if bad else None


def clipping_worst(acc, variant="cross_entropy"):
    """The clipped cell with the most negative mean bias, and the worst fraction of rows whose
    gradient the clip zeroes."""
    clip = [
        r
        for r in acc
        if r["p_implementation"] == "clipped"
        and r["p_variant"] == variant
        and not math.isnan(_num(r.get("clip_bias_nats")))
    ]
    if not clip:
        return None, math.nan
    return (
        min(clip, key=lambda r: _num(r["clip_bias_nats"])),
        worst(clip, "clip_frac_grad_zeroed"),
    )


def clipping_sentence(acc, dtype):
    naive_from = naive_nonfinite_from(acc, dtype)
    cell, zeroed = clipping_worst([r for r in acc if r["p_dtype"] == dtype])
    if cell is None:
        return None
    if naive_from is None or cell is None:
        return None
    return (
        f"In {dtype}, naive softmax-then-log cross_entropy is non-finite from logit scale "
        f"{naive_from:g} upward; clipping the probabilities at {cell['p_clip_eps']:g} keeps "
        f"it finite but biases the loss by {_num(cell['clip_bias_nats']):.3g} nats on "
        f"average where the clip engages in the worst cell ({cell['p_family']} logits at "
        f"scale {cell['p_scale']:g}, {cell['p_classes']} classes) and zeroes the gradient "
        f"of up to {fmt_pct(zeroed)} of a cell's rows."
    )


PEER_NAMES = {
    "torch": "torch",
    "jax": "optax (JAX)",
    "tensorflow": "TensorFlow",
    "sklearn": "scikit-learn",
    "lse": "the lse - x_y form",
}


def confident_sentence(acc, dtype="float32"):
    """Which frameworks lose the tiny losses and the true-class gradients of confident rows."""
    c = confident(acc, dtype)
    peers = [p for p in ("torch", "jax", "tensorflow", "sklearn") if p in c] or (
        ["lse"] if "lse" in c else []
    )
    if KERNEL not in c or not peers:
        return None

    def phrase(p):
        fwd, zero, _ = c[p]
        grad = (
            "no gradient"
            if math.isnan(_num(zero))
            else f"{fmt_pct(zero)} of true-class gradients exactly 0"
        )
        return f"{PEER_NAMES[p]} {ulp_phrase(fwd)} ({grad})"

    kf, kz, _ = c[KERNEL]
    return (
        f"On confident rows (logit margin {CONFIDENT_MARGIN:g} or more, {dtype}), the "
        f"frameworks' cross-entropy loses the tiny loss and the true-class gradient, worst "
        f"cell forward error: {'; '.join(phrase(p) for p in peers)}; cestudy's kernels stay "
        f"within {ulp_phrase(kf)} and return 0 for " + ("none." if kz == 0 else f"{fmt_pct(kz)}.")
    )


def contract_sentence(acc, low=("float32", "float16", "bfloat16"), high=("float64",)):
    lo = kernel_worst(acc, low)
    hi = kernel_worst(acc, high)
    present = [d for d in low if any(r["p_dtype"] == d for r in acc)]
    if not lo["cells"] or not present:
        return None
    text = (
        f"Over every {', '.join(present[:-1]) + ' and ' if len(present) > 1 else ''}"
        f"{present[-1]} accuracy cell of the studies ({lo['cells']} cells), cestudy's losses "
        f"are within {ulp_phrase(lo['fwd'])} of the exact values and their gradients within "
        f"{ulp_phrase(lo['grad'])} (torch on the same cells: {peer_phrase(lo['torch'])})"
    )
    if hi["cells"]:
        text += (
            f", and within {ulp_phrase(hi['fwd'])} in float64 (worst: {hi['fwd_row']['p_variant']})"
        )
    return text + left_out_clause(lo["left_out"]) + "."


# --------------------------------------------------------------------------------------------
# The page section
# --------------------------------------------------------------------------------------------
def accuracy_table(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["p_implementation"], r["p_dtype"]), []).append(r)
    out = []
    for impl in _ordered({k[0] for k in groups}, IMPL_ORDER):
        for dt in _ordered({k[1] for k in groups if k[0] == impl}, DTYPE_ORDER):
            g = groups[(impl, dt)]
            over = np.mean([_num(r.get("fwd_frac_over_4ulp")) for r in g])
            nonfin = np.mean([_num(r.get("fwd_frac_nan")) + _num(r.get("fwd_frac_inf")) for r in g])
            finite_max = max(
                (
                    _num(r.get("fwd_max_ulp"))
                    for r in g
                    if math.isfinite(_num(r.get("fwd_max_ulp")))
                ),
                default=math.nan,
            )
            grad = worst(g, "grad_max_ulp") if has_grad(g[0]["p_variant"]) else math.nan
            out.append(
                (
                    impl,
                    dt,
                    len(g),
                    fmt_ulp(worst(g, "fwd_p99_ulp")),
                    fmt_ulp(worst(g, "fwd_max_ulp")),
                    fmt_ulp(finite_max),
                    fmt_pct(over),
                    fmt_pct(nonfin),
                    fmt_ulp(grad),
                    fmt_pct(worst(g, "grad_true_frac_vanished")),
                )
            )
    return table(
        [
            "implementation",
            "dtype",
            "cells",
            "worst p99 (ulp)",
            "worst max (ulp)",
            "worst finite max (ulp)",
            "samples > 4 ulp",
            "non-finite samples",
            "grad worst (ulp)",
            "true-class grad wrongly 0 (worst cell)",
        ],
        out,
    )


VARIANT_FIGURES = (
    (
        "nonfinite",
        figures.fig_nonfinite,
        "Non-finite results vs logit scale",
        "Share of samples whose loss is NaN or infinite although the exact loss is finite.",
    ),
    (
        "clipping",
        figures.fig_clipping,
        "Epsilon clipping: bias and zeroed gradients",
        "Mean bias of the clipped loss where the clip engages, and the share of rows "
        "whose gradient the clip sets to 0, by the margin of confident rows and by the "
        "scale of gaussian logits (a row of panels each, where the page has such cells), "
        "each point the worst cell of its margin or scale.",
    ),
    (
        "true-class-gradient",
        figures.fig_true_class_gradient,
        "True-class gradient on confident rows",
        "Top: worst error of the true-class gradient p_y - 1 (dashed: 4 ulp); "
        "points on the grey line labelled non-finite are NaN or infinite "
        "gradients, not measured errors (the cap sits two decades above the "
        "largest finite error, at least at 1e12), and errors of 0 are drawn at "
        "1e-3. Bottom: share of true-class gradients that are exactly 0 although "
        "the exact value is not.",
    ),
)
"""The figures drawn for the first variant after the atlases: (name, function, title,
caption)."""


@section(ok_rows)
def render(ctx: Context, acc) -> Part:
    names = variant_order({r["p_variant"] for r in acc})
    parts = [
        f"## {TITLE}\n",
        "Errors are in ulps of the dtype under test against the extended-precision oracle "
        "(`cestudy.reference.oracle`); `non-finite` means an unbounded error: a NaN or "
        "infinite result where the exact loss is finite (counted in `non-finite "
        "samples`), or a finite one where the exact loss is infinite; `n/a` means that "
        "nothing was measured (no gradient, or every exact value non-finite). Gradient "
        "errors use the contract's measure "
        "(relative, or in ulps of the row's largest element). `numba` is cestudy's "
        f"kernels; their contract is {CONTRACT_ULP:g} ulp.\n",
    ]
    for name in names:
        v = variants.VARIANTS.get(name)
        parts.append(f"### `{name}`" + (f": {v.description}" if v else "") + "\n")
        if v is not None and v.kernel is None:
            parts.append(
                "cestudy has no kernel of its own for this variant: the public "
                "function computes it in numpy with its peer's semantics.\n"
            )
        parts.append(accuracy_table([r for r in acc if r["p_variant"] == name]))
    figs = []
    first = names[0]
    rel = ctx.figure(f"error-vs-scale-{first}", figures.fig_error_vs_scale, acc, variant=first)
    if rel:
        figs.append(
            (
                f"Forward error vs logit scale, {first}",
                "Worst and 99th-percentile forward error per logit scale (dashed: the "
                "4-ulp contract); points on the grey line labelled non-finite at the top "
                "are non-finite results, not measured errors, and errors of 0 are drawn at "
                "1e-3.",
                rel,
            )
        )
    for dt in ("float32", "float64"):
        rel = ctx.figure(f"atlas-{dt}", figures.fig_atlas, acc, variant=first, dtype=dt)
        if rel:
            figs.append(
                (
                    f"Stability atlas, {dt}",
                    f"Worst forward error of {first} ({dt}) by logit scale and class "
                    f"count; the colour scale saturates below {figures.ATLAS_RANGE[0]:g} "
                    f"and above {figures.ATLAS_RANGE[1]:g} ulp (arrows on the colour "
                    "bar); red cells hold non-finite results.",
                    rel,
                )
            )
    for name, fn, title, caption in VARIANT_FIGURES:
        rel = ctx.figure(name, fn, acc, variant=first)
        if rel:
            figs.append((title, caption, rel))
    if figs:
        parts.append("### Figures\n")
        for title, caption, rel in figs:
            parts.append(figure_block(rel, title, caption))
    findings = page_findings(ctx, acc)
    return with_findings(parts, findings)


def _fig(ctx, name):
    rel = f"figures/{ctx.study}-{name}.png"
    return rel if rel in ctx.figures else None


def page_findings(ctx, acc):
    f = []
    first = variant_order({r["p_variant"] for r in acc})[0]
    for dt in _ordered({r["p_dtype"] for r in acc}, DTYPE_ORDER):
        w = kernel_worst(acc, (dt,))
        if not w["cells"]:
            continue
        cell = w["fwd_row"]
        where = f" (worst: {cell['p_variant']}, {cell['p_family']} logits)" if cell else ""
        f.append(
            ctx.finding(
                f"{dt}: cestudy's worst forward error is {ulp_phrase(w['fwd'])} over {w['cells']} "
                f"cells{where}; torch on the same cells: {peer_phrase(w['torch'])}"
                + left_out_clause(w["left_out"])
                + ".",
                _fig(ctx, f"atlas-{dt}") or _fig(ctx, f"error-vs-scale-{first}"),
            )
        )
    text = confident_sentence(acc)
    if text:
        f.append(ctx.finding(text, _fig(ctx, "true-class-gradient")))
    for dt in _ordered({r["p_dtype"] for r in acc}, DTYPE_ORDER):
        text = clipping_sentence(acc, dt)
        if text:
            f.append(ctx.finding(text, _fig(ctx, "clipping")))
    return f
