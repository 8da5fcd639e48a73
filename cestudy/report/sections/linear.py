"""Report section for ``linear`` cells: fused linear cross-entropy against materialised logits and
torch's chunked path, with the error split into the matrix product's and the cross-entropy's.

Reads result rows only (the metric names are those of ``cestudy.study.kinds.linear``: one
``<formulation>__<metric>`` per formulation); errors are shown in units of the dtype's unit
roundoff u, so that 1 is the rounding of the result itself.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt

from ...study.kinds.linear import FORMULATIONS
from .. import figures
from ..markdown import Context, Part, fmt_num, fmt_pct, section, table, with_findings

KINDS = ("linear",)
TITLE = "Fused linear cross-entropy"
LABELS = {
    "materialised_numpy": "numpy logits + cestudy CE",
    "materialised_torch": "torch F.linear + F.cross_entropy",
    "torch_chunked": "torch F.linear_cross_entropy (chunked)",
    "fused": "cestudy fused",
    "fused_filtered": "cestudy fused, CCE filter",
}
SHORT = {
    "materialised_numpy": "numpy",
    "materialised_torch": "torch",
    "torch_chunked": "torch chunked",
    "fused": "fused",
    "fused_filtered": "filtered",
}
COLOURS = {
    "materialised_numpy": "#8c564b",
    "materialised_torch": "#1f77b4",
    "torch_chunked": "#17becf",
    "fused": "#2ca02c",
    "fused_filtered": "#bcbd22",
}
DTYPES = ("float32", "bfloat16", "float16")
LOAD_LIMIT = 1.5
MIB = float(1 << 20)
INTRO = (
    "The loss of logits z = X W^T over a large vocabulary, five ways on the same inputs (drawn "
    "in float64, rounded to the dtype): "
    + "; ".join(f"**{SHORT[f]}**: {LABELS[f]}" for f in FORMULATIONS)
    + ". "
    "Errors are against the float64 oracle (logits from exact products summed in float64, the "
    "cross-entropy in float64 with exact-difference exponentials: about 1e-13 relative) and are "
    "shown in units of the dtype's unit roundoff u (1 u is the rounding of the result itself). "
    "The split evaluates the exact cross-entropy on each formulation's own logits: **product** "
    "is the error those logits alone cause, **CE** the rest (the cross-entropy's arithmetic, "
    "the rounding of the result and, for gradients, the backward products). Memory is "
    "tracemalloc's peak (numpy allocations) beyond the inputs and the returned gradients; for "
    "torch, in parentheses, the growth of the resident high-water mark.\n"
)


def ok_rows(rows):
    return sorted(
        (r for r in rows if r["kind"] == "linear" and r["status"] == "ok"),
        key=lambda r: (
            DTYPES.index(r["p_dtype"]) if r["p_dtype"] in DTYPES else 9,
            r["p_family"],
            r["p_scale"],
            r["p_vocab"],
            r["p_hidden"],
            r["p_tokens"],
        ),
    )


def _get(r, f, metric):
    return figures._num(r.get(f"{f}__{metric}"))


def _in_u(r, f, metric):
    """A relative error in units of the dtype's unit roundoff."""
    return _get(r, f, metric) / figures._num(r.get("unit_roundoff"))


def _u(v) -> str:
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2g}" if v < 1e4 else f"{v:.1e}"


def _inputs(r) -> str:
    fam = "confident, margin" if r["p_family"] == "confident" else "gaussian, scale"
    return f"{fam} {r['p_scale']:g}"


def _shape(r) -> str:
    return f"{r['p_tokens']} x {r['p_hidden']} x {r['p_vocab']}"


def _measured(hr, f, *metrics):
    """The rows of ``hr`` in which formulation ``f`` measured every one of ``metrics``."""
    return [r for r in hr if not any(math.isnan(_get(r, f, m)) for m in metrics)]


def _present(hr):
    return [f for f in FORMULATIONS if any(not math.isnan(_get(r, f, "loss_rel_err")) for r in hr)]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _formulation_table(hr, head, lead, cell) -> str:
    """A row per cell: the columns ``lead(r)`` under ``head``, then ``cell(r, f)`` for each
    formulation measured on the page."""
    forms = _present(hr)
    rows = [(*lead(r), *(cell(r, f) for f in forms)) for r in hr]
    return table(head + [SHORT[f] for f in forms], rows)


def _accuracy_cell(r, f) -> str:
    loss = _in_u(r, f, "loss_rel_err")
    grad = max(_in_u(r, f, "gx_err"), _in_u(r, f, "gw_err"))
    zero = _get(r, f, "rows_zero")
    text = f"{_u(loss)} / {_u(grad)}"
    return text + (f" ({fmt_pct(zero)} rows 0)" if zero > 0 else "")


def accuracy_table(hr) -> str:
    return _formulation_table(
        hr,
        ["N x H x V", "dtype", "inputs", "exact loss"],
        lambda r: (_shape(r), r["p_dtype"], _inputs(r), fmt_num(r.get("exact_loss"))),
        _accuracy_cell,
    )


def split_table(hr) -> str:
    head = [
        "N x H x V",
        "dtype",
        "inputs",
        "formulation",
        "loss: product",
        "loss: CE",
        "worst row: product",
        "worst row: CE",
        "gradients: product",
        "gradients: CE",
    ]
    rows = []
    for r in hr:
        for f in ("fused", "materialised_torch", "materialised_numpy"):
            if math.isnan(_get(r, f, "loss_rel_err_logits")):
                continue
            if (
                f == "materialised_numpy"
                and r.get(f"{f}__split_shared_with") is None
                and r.get("fused__split_shared_with") == f
            ):
                continue  # the fused row already shows these logits' split
            rows.append(
                (
                    _shape(r),
                    r["p_dtype"],
                    _inputs(r),
                    SHORT[f],
                    _u(_in_u(r, f, "loss_rel_err_logits")),
                    _u(_in_u(r, f, "loss_rel_err_ce")),
                    _u(_in_u(r, f, "row_rel_err_max_logits")),
                    _u(_in_u(r, f, "row_rel_err_max_ce")),
                    _u(max(_in_u(r, f, "gx_err_logits"), _in_u(r, f, "gw_err_logits"))),
                    _u(max(_in_u(r, f, "gx_err_ce"), _in_u(r, f, "gw_err_ce"))),
                )
            )
    return table(head, rows)


def _resources_cell(r, f) -> str:
    secs = _get(r, f, "seconds")
    traced = _get(r, f, "traced_peak")
    rss = _get(r, f, "rss_peak")
    mem = f"{traced / MIB:.3g}" if not math.isnan(traced) else f"({rss / MIB:.3g})"
    return "-" if math.isnan(secs) else f"{secs:.3g} s, {mem} MiB"


def resources_table(hr) -> str:
    return _formulation_table(
        hr,
        ["N x H x V", "dtype", "logits (MiB)", "load"],
        lambda r: (
            _shape(r),
            r["p_dtype"],
            f"{r['p_tokens'] * r['p_vocab'] * 4 / MIB:.3g}",
            f"{r.get('load', math.nan):.2f}",
        ),
        _resources_cell,
    )


def filter_table(hr) -> str:
    head = [
        "N x H x V",
        "dtype",
        "inputs",
        "gradient mass dropped",
        "tiles dropped",
        "grad_weight change / max",
        "SGD-step loss bias",
        "bias / decrease",
    ]
    rows = []
    f = "fused_filtered"
    for r in _measured(hr, f, "dropped_mass"):
        rows.append(
            (
                _shape(r),
                r["p_dtype"],
                _inputs(r),
                fmt_pct(_get(r, f, "dropped_mass")),
                fmt_pct(_get(r, f, "tiles_dropped")),
                fmt_num(_get(r, f, "gw_diff")),
                fmt_num(_get(r, f, "step_bias")),
                fmt_pct(_get(r, f, "step_bias_rel")),
            )
        )
    return table(head, rows)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def fig_split(hr, path) -> bool:
    """Worst-row loss error in u against the vocabulary, product part and CE part, per dtype
    (gaussian inputs)."""
    pick = [r for r in hr if r["p_family"] == "gaussian"]
    dts = [d for d in DTYPES if any(r["p_dtype"] == d for r in pick)]
    if not dts:
        return False
    fig, axes = plt.subplots(1, len(dts), figsize=(4.2 * len(dts), 3.6), squeeze=False)
    drawn = False
    for ax, dt in zip(axes[0], dts):
        for f in ("fused", "materialised_torch"):
            for part, style in (("logits", "-"), ("ce", "--")):
                pts = {}
                for r in pick:
                    if r["p_dtype"] != dt:
                        continue
                    v = _in_u(r, f, f"row_rel_err_max_{part}")
                    if not math.isnan(v):
                        pts[r["p_vocab"]] = max(pts.get(r["p_vocab"], 0.0), v)
                if len(pts) < 1:
                    continue
                xs = sorted(pts)
                what = "product" if part == "logits" else "cross-entropy"
                ax.plot(
                    xs,
                    [max(pts[x], 1e-6) for x in xs],
                    style,
                    marker="o",
                    color=COLOURS[f],
                    label=f"{SHORT[f]}: {what}",
                )
                drawn = True
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    if not drawn:
        plt.close(fig)
        return False
    return figures._log_x_panels(
        fig,
        axes,
        [f"{d}" for d in dts],
        "vocabulary V",
        "worst per-token loss error / u",
        "Where the error comes from: the matrix product or the cross-entropy",
        path,
    )


def fig_memory(hr, path) -> bool:
    """Peak memory against N x V: tracemalloc's peak for the numpy-based formulations, the
    resident high-water growth for torch's."""
    if not hr:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for f in FORMULATIONS:
        metric = (
            "traced_peak" if f in ("materialised_numpy", "fused", "fused_filtered") else "rss_peak"
        )
        pts = {}
        for r in hr:
            v = _get(r, f, metric)
            if not math.isnan(v) and v > 0:
                nv = r["p_tokens"] * r["p_vocab"]
                pts[nv] = max(pts.get(nv, 0.0), v / MIB)
        if pts:
            xs = sorted(pts)
            ax.plot(
                xs,
                [pts[x] for x in xs],
                marker="o",
                color=COLOURS[f],
                label=LABELS[f] + ("" if metric == "traced_peak" else " (RSS)"),
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    xs = sorted({r["p_tokens"] * r["p_vocab"] for r in hr})
    ax.plot(xs, [4 * x / MIB for x in xs], ":", color="grey", label="float32 logits N x V")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens x vocabulary")
    ax.set_ylabel("peak extra memory (MiB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Peak memory beyond inputs and returned gradients")
    return figures._save(fig, path)


# --------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------
def product_dominates_sentence(hr):
    """At which vocabularies (per dtype) the product's error exceeds the cross-entropy's in the
    fused kernel's worst per-token loss, and the same for torch's materialised logits: every
    one, from one on, none, or the list where it does not hold monotonically."""
    parts = []
    for f in ("fused", "materialised_torch"):
        bits = []
        for dt in DTYPES:
            pts = sorted(
                (
                    r["p_vocab"],
                    _get(r, f, "row_rel_err_max_logits"),
                    _get(r, f, "row_rel_err_max_ce"),
                )
                for r in hr
                if r["p_dtype"] == dt and r["p_family"] == "gaussian"
            )
            pts = [p for p in pts if not (math.isnan(p[1]) or math.isnan(p[2]))]
            if not pts:
                continue
            # the worst of each error over the cells of a vocabulary (several token counts)
            by_v = {}
            for v, a, b in pts:
                wa, wb = by_v.get(v, (-math.inf, -math.inf))
                by_v[v] = (max(wa, a), max(wb, b))
            every = sorted(by_v)
            holds = [v for v in every if by_v[v][0] > by_v[v][1]]
            if not holds:
                bits.append(f"never in {dt} (up to V = {every[-1]})")
            elif holds == every:
                bits.append(f"at every V measured in {dt} ({every[0]} to {every[-1]})")
            elif holds == every[every.index(holds[0]) :]:
                bits.append(f"from V = {holds[0]} on in {dt} (up to {every[-1]})")
            else:  # not monotone in V: say where it holds
                at = ", ".join(map(str, holds))
                bits.append(f"at V = {at} in {dt} (of {every[0]} to {every[-1]})")
        if bits:
            parts.append(f"{LABELS[f]}: " + ", ".join(bits))
    if not parts:
        return None
    return (
        "The matrix product's error exceeds the cross-entropy's (worst per-token loss, "
        "gaussian logits) for " + "; ".join(parts) + "."
    )


def confident_sentence(hr):
    conf = [r for r in hr if r["p_family"] == "confident"]
    if not conf:
        return None
    # zeros count only in cells whose exact losses are all normal numbers of the dtype: where
    # they underflow it (float16 at margin 40), 0 is the correctly rounded loss, not a failure
    normal = [r for r in conf if figures._num(r.get("rows_below_normal")) == 0]
    worst = {}
    for f in FORMULATIONS:
        zeros = [_get(r, f, "rows_zero") for r in normal]
        zeros = [z for z in zeros if not math.isnan(z)]
        if zeros:
            worst[f] = max(zeros)
    fused = max((_in_u(r, "fused", "row_rel_err_max_normal") for r in conf), default=math.nan)
    fused_zero = max((_get(r, "fused", "rows_zero") for r in normal), default=math.nan)
    torch_bits = [
        f"{LABELS[f]} {fmt_pct(worst[f])}"
        for f in ("materialised_torch", "torch_chunked")
        if f in worst
    ]
    if math.isnan(fused) or not torch_bits:
        return None
    margins = ", ".join(f"{m:g}" for m in sorted({r["p_scale"] for r in conf}))
    zero = "none" if fused_zero == 0 or math.isnan(fused_zero) else fmt_pct(fused_zero)
    ce = max(
        (
            _in_u(r, "fused", "row_rel_err_max_ce")
            for r in conf
            if figures._num(r.get("rows_below_normal")) == 0
        ),
        default=math.nan,
    )
    ce_text = (
        ""
        if math.isnan(ce)
        else (f" (the cross-entropy's part within {_u(ce)} u, the rest the float32 product's)")
    )
    return (
        f"On confident rows (margins {margins}) whose exact per-token losses are normal "
        f"numbers of their dtype, the share of tokens whose loss comes back as exactly 0 "
        f"reaches {' and '.join(torch_bits)}; cestudy's fused kernel "
        f"returns {zero} as 0 and stays within {_u(fused)} u of the exact per-token losses "
        f"that its dtype holds as normal numbers{ce_text}."
    )


def filter_sentence(hr):
    rs = _measured(hr, "fused_filtered", "dropped_mass")
    if not rs:
        return None
    worst = max(rs, key=lambda r: _get(r, "fused_filtered", "dropped_mass"))
    bias = max(rs, key=lambda r: abs(_get(r, "fused_filtered", "step_bias_rel")))
    return (
        f"Cut Cross-Entropy's gradient filter (eps/32 of the input dtype, 128 x 128 tiles) "
        f"drops up to {fmt_pct(_get(worst, 'fused_filtered', 'dropped_mass'))} of the "
        f"gradient mass ({worst['p_dtype']}, {_inputs(worst)}, {_shape(worst)}); the "
        f"largest effect on an SGD step is "
        f"{fmt_pct(_get(bias, 'fused_filtered', 'step_bias_rel'))} of the step's loss "
        f"decrease lost ({bias['p_dtype']}, {_inputs(bias)})."
    )


def _largest(rs, size):
    """The row of ``rs`` with the largest ``size(row)``, or None when there is none."""
    return max(rs, key=size) if rs else None


def memory_sentence(hr):
    big = _largest(_measured(hr, "fused", "traced_peak"), lambda r: r["p_tokens"] * r["p_vocab"])
    if big is None:
        return None
    logits = big["p_tokens"] * big["p_vocab"] * 4
    fused = _get(big, "fused", "traced_peak")
    text = (
        f"At {_shape(big)} ({big['p_dtype']}) the fused kernel's peak traced memory is "
        f"{fused / MIB:.3g} MiB, {fmt_pct(fused / logits)} of the float32 logits it does not "
        f"materialise"
    )
    mat = _get(big, "materialised_numpy", "traced_peak")
    if not math.isnan(mat):
        text += f" (materialised: {mat / MIB:.3g} MiB)"
    return text + "."


def speed_sentence(hr):
    big = _largest(
        _measured(_measured(hr, "fused", "seconds"), "torch_chunked", "seconds"),
        lambda r: r["p_tokens"] * r["p_hidden"] * r["p_vocab"],
    )
    if big is None:
        return None
    ratio = _get(big, "torch_chunked", "seconds") / _get(big, "fused", "seconds")
    mat = _get(big, "materialised_torch", "seconds") / _get(big, "fused", "seconds")
    load = figures._num(big.get("load"))
    caveat = (
        ""
        if load <= LOAD_LIMIT
        else f" (measured at a load average of {load:.2f} on this machine: not a reliable timing)"
    )
    return (
        f"At {_shape(big)} ({big['p_dtype']}), forward and backward, the fused kernel is "
        f"{ratio:.3g}x the speed of torch's chunked F.linear_cross_entropy and "
        f"{mat:.3g}x that of torch's materialised logits{caveat}."
    )


# --------------------------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------------------------


@section(ok_rows)
def render(ctx: Context, hr) -> Part:
    parts = [f"## {TITLE}\n", INTRO]
    parts += [
        "### Accuracy\n",
        "Mean loss error / gradient error (the larger of grad_input's and grad_weight's, "
        "relative to the largest exact entry), both in u; rows that came back as exactly "
        "0 where the exact loss is not.\n",
        accuracy_table(hr),
        "### Where the error comes from\n",
        split_table(hr),
    ]
    rel = ctx.add_figure(
        parts,
        "linear-split",
        fig_split,
        hr,
        alt="Error split",
        caption="Worst per-token loss error in u against the vocabulary, gaussian logits: "
        "solid, the error the formulation's logits cause (exact cross-entropy of its logits); "
        "dashed, the rest. The dotted line is 1 u.",
    )
    parts += [
        "### Memory and time\n",
        'Forward and backward, reduction "mean"; time of the best of the cell\'s '
        f"repeats. Timings at a load average above {LOAD_LIMIT} are not reliable on this "
        "2-core machine.\n",
        resources_table(hr),
    ]
    mem = ctx.add_figure(
        parts,
        "linear-memory",
        fig_memory,
        hr,
        alt="Peak memory",
        caption="Peak extra memory against tokens x vocabulary; the dotted line is the float32 "
        "logits.",
    )
    ftab = filter_table(hr)
    if ftab.count("\n") > 2:
        parts += [
            "### Cut Cross-Entropy's gradient filter\n",
            "Tiles of dL/dz whose entries are all below eps/32 of the input dtype are "
            "dropped. The bias is that of one SGD step on (X, W) with the filtered "
            "gradient against the unfiltered one, the step sized for a 1% first-order "
            "decrease.\n",
            ftab,
        ]
    findings = []
    for text, fig in (
        (product_dominates_sentence(hr), rel),
        (confident_sentence(hr), None),
        (filter_sentence(hr), None),
        (memory_sentence(hr), mem),
        (speed_sentence(hr), None),
    ):
        if text:
            findings.append(ctx.finding(text, fig))
    return with_findings(parts, findings, always=False)
