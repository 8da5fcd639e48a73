"""Report section for ``performance`` cells (CPU timings against torch) and the benchmark's
``coldstart``, ``scaling`` and ``worstcase`` cells.

Every shape, ratio and verdict is read from the rows: the findings quote the largest shape that
both cestudy's kernels and torch were timed on.
"""

from __future__ import annotations

import math

from ...bench import ceiling
from .. import figures
from ..data import torch_medians, vs_torch
from ..figures import IMPL_ORDER
from ..markdown import Context, Part, fmt_pct, fmt_shape, fmt_ulp, table
from .accuracy import variant_order

KINDS = ("performance", "coldstart", "scaling", "worstcase")
TITLE = "Performance"
SAME_SPEED = 1.1
"""Within this ratio of each other two timings count as the same speed."""


def ok_rows(rows, kind="performance"):
    return [r for r in rows if r["kind"] == kind and r["status"] == "ok"]


def _key(r):
    return (r["p_variant"], r["p_dtype"], r["p_mode"], r["p_batch"], r["p_classes"])


def largest(perf, variant=None, dtype="float32"):
    """cestudy's rows (one per mode) at the largest shape timed for both cestudy and torch."""
    variant = variant or (variant_order({r["p_variant"] for r in perf}) or [None])[0]
    tt = torch_medians(perf)
    mine = [
        r
        for r in perf
        if r["p_implementation"] == "numba"
        and r["p_variant"] == variant
        and r["p_dtype"] == dtype
        and not math.isnan(vs_torch(r, tt))
    ]
    if not mine:
        return []
    top = max(r["p_batch"] * r["p_classes"] for r in mine)
    return sorted(
        (r for r in mine if r["p_batch"] * r["p_classes"] == top), key=lambda r: r["p_mode"]
    )


def speed_sentence(perf):
    """One sentence on cestudy against torch at the largest shape timed for both, or None."""
    big = largest(perf)
    if not big:
        return None
    tt = torch_medians(perf)
    r0 = big[0]
    parts = []
    for r in big:
        ratio = vs_torch(r, tt)
        if r["p_mode"] == "forward":
            parts.append(
                f"forward takes {1e3 * r['median_s']:.3g} ms, {ratio:.2f}x the speed "
                f"of torch's forward, at {fmt_pct(r['frac_bandwidth'])} of the measured "
                f"{ceiling.label('forward')} bandwidth"
            )
        else:
            parts.append(
                f"fused forward and gradient is {ratio:.2f}x the speed of torch's "
                "forward and backward"
            )
    return (
        f"On the CPU at {fmt_shape(r0['p_batch'], r0['p_classes'])} {r0['p_dtype']} (the "
        f"largest shape timed), cestudy's {r0['p_variant']} " + " and its ".join(parts) + "."
    )


# cestudy's kernels set against torch: the plain call, and the fused call writing into a
# gradient buffer reused from call to call (what a training loop does)
RATIO_KERNELS = ("numba", "numba_out")


def torch_ratios(perf):
    """{(variant, mode, kernel): {(dtype, batch, classes): torch time / cestudy time}} for every
    cell timed for both cestudy (:data:`RATIO_KERNELS`) and torch."""
    tt = torch_medians(perf)
    out = {}
    for r in perf:
        ratio = vs_torch(r, tt)
        if r["p_implementation"] in RATIO_KERNELS and not math.isnan(ratio):
            line = (r["p_variant"], r["p_mode"], r["p_implementation"])
            shape = (r["p_dtype"], r["p_batch"], r["p_classes"])
            out.setdefault(line, {})[shape] = ratio
    return out


def ratio_table(perf):
    """Markdown: one row per variant, mode and kernel, one column per dtype and shape, each cell
    torch's time over cestudy's (above 1: cestudy faster); '' where no table can be made."""
    ratios = torch_ratios(perf)
    if not ratios:
        return ""
    shapes = sorted({s for line in ratios.values() for s in line})
    order = variant_order({v for v, _, _ in ratios})
    lines = sorted(ratios, key=lambda k: (order.index(k[0]), k[1], RATIO_KERNELS.index(k[2])))
    rows = []
    for variant, mode, kernel in lines:
        got = ratios[(variant, mode, kernel)]
        label = "fused, reused buffer" if kernel == "numba_out" else mode.replace("_", "+")
        rows.append(
            (variant, label) + tuple("" if s not in got else f"{got[s]:.2f}x" for s in shapes)
        )
    head = ["variant", "call"] + [f"{fmt_shape(n, c)} {dt}" for dt, n, c in shapes]
    return table(head, rows)


def cases_sentence(perf):
    """How often cestudy beats torch over every variant, shape and dtype timed for both, with
    the range of ratios and the cells where it is slower; None without such cells."""
    ratios = torch_ratios(perf)
    if not ratios:
        return None

    def count(mode, kernel):
        vals = [
            (q, v, s)
            for (v, m, k), line in ratios.items()
            if m == mode and k == kernel
            for s, q in line.items()
        ]
        return vals

    parts = []
    slower = []
    for mode, kernel, what in (
        ("forward", "numba", "forward"),
        ("forward_grad", "numba", "fused forward and gradient"),
        ("forward_grad", "numba_out", "fused call with a reused gradient buffer"),
    ):
        vals = count(mode, kernel)
        if not vals:
            continue
        qs = [q for q, _, _ in vals]
        faster = sum(q >= 1.0 for q in qs)
        parts.append(f"its {what} in {faster} of {len(qs)} ({min(qs):.2f}x to {max(qs):.2f}x)")
        if kernel == "numba":
            slower += [(q, v, mode, s) for q, v, s in vals if q < 1.0]
    n_lines = len({v for v, _, _ in ratios})
    text = (
        f"On the CPU, against torch at every shape and dtype timed ({n_lines} "
        f"variant{'' if n_lines == 1 else 's'}), cestudy is faster for " + ", ".join(parts)
    )
    if slower:
        slower.sort()
        shown = [
            f"{v} {m.replace('_', '+')} {fmt_shape(n, c)} {dt} {q:.2f}x"
            for q, v, m, (dt, n, c) in slower[:6]
        ]
        more = f" and {len(slower) - 6} more" if len(slower) > 6 else ""
        text += "; slower than torch: " + ", ".join(shown) + more
    return text + "."


PEER_LABELS = {
    "torch": "torch",
    "jax": "optax (JAX)",
    "tensorflow": "TensorFlow",
    "sklearn": "scikit-learn",
}
OTHER_FRAMEWORKS = ("jax", "tensorflow", "sklearn")


def _ms(seconds):
    """Milliseconds with three significant digits, never in exponent notation."""
    ms = 1e3 * seconds
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def frameworks_sentence(perf, variant="cross_entropy", dtype="float32"):
    """How fast each framework is beside cestudy, at the largest shape where one of JAX,
    TensorFlow or scikit-learn was timed with cestudy in the same run; None without one."""
    rows = [r for r in perf if r["p_variant"] == variant and r["p_dtype"] == dtype]
    shapes = {
        (r["p_batch"], r["p_classes"]) for r in rows if r["p_implementation"] in OTHER_FRAMEWORKS
    }
    if not shapes:
        return None
    n, c = max(shapes, key=lambda s: s[0] * s[1])
    parts = []
    for mode, what in (("forward", "forward"), ("forward_grad", "forward and gradient")):
        at = {
            r["p_implementation"]: r["median_s"]
            for r in rows
            if (r["p_batch"], r["p_classes"]) == (n, c) and r["p_mode"] == mode
        }
        if "numba" not in at:
            continue
        items = [f"cestudy {_ms(at['numba'])} ms"] + [
            f"{PEER_LABELS[p]} {_ms(at[p])} ms ({at[p] / at['numba']:.2f}x cestudy's time)"
            for p in PEER_LABELS
            if p in at
        ]
        parts.append(f"{what}: " + ", ".join(items))
    if not parts:
        return None
    return (
        f"Every framework timed in the same process on {variant} at {fmt_shape(n, c)} {dtype} "
        "(JAX after jit compilation, each call ended by block_until_ready): "
        + "; ".join(parts)
        + "."
    )


def ceiling_how(perf) -> str:
    """How the rows' memory ceiling was measured (the buffer, the cache it was sized from, the
    number of passes), from the fields ``bench.cpu.time_group`` records with every row; rows
    from before those fields say only how the buffer is sized."""
    fields = ("ceiling_buffer_bytes", "ceiling_llc_bytes", "ceiling_passes")
    hows = sorted({tuple(r[f] for f in fields) for r in perf if all(f in r for f in fields)})
    sizing = (
        f"{ceiling.LLC_FACTOR} times the last-level cache cpu0 reports, at least "
        f"{ceiling.fmt_bytes(ceiling.MIN_BUFFER_BYTES)} and at most "
        f"{ceiling.fmt_bytes(ceiling.MAX_BUFFER_BYTES)}"
    )
    if not hows:
        return f"of {sizing}"
    return " or ".join(
        f"of {ceiling.fmt_bytes(buf)} ({sizing}: {ceiling.fmt_bytes(llc)} here), the median of "
        f"{passes} passes"
        for buf, llc, passes in hows
    )


def ceiling_spread(perf) -> str:
    """How far the ceilings the rows were judged against ranged, by kind and dtype, and how old
    one could be when a row's timing ended (rows record ``ceiling_age_s`` and
    ``ceiling_max_age_s`` since the ceiling is measured again during a run); "" when no row
    records them."""
    aged = [r for r in perf if r.get("ceiling_max_age_s") is not None and "ceiling_kind" in r]
    if not aged:
        return ""
    ranges = {}
    for r in aged:
        ranges.setdefault((r["ceiling_kind"], r["p_dtype"]), []).append(r["bandwidth_gbs"])
    spans = ", ".join(
        f"{ceiling.LABELS[k]} {dt} "
        + (
            f"{min(v):.1f} GB/s"
            if f"{min(v):.1f}" == f"{max(v):.1f}"
            else f"{min(v):.1f} to {max(v):.1f} GB/s"
        )
        for (k, dt), v in sorted(ranges.items())
    )
    limits = " or ".join(f"{a:g} s" for a in sorted({r["ceiling_max_age_s"] for r in aged}))
    which = "Each row" if len(aged) == len(perf) else "Each row that records its ceiling's age"
    return (
        f" {which} is judged against the latest ceiling of its kind and dtype when its timing "
        f"ended, measured again at that point when older than {limits} (the oldest one a row "
        f"was judged against had been measured {max(r['ceiling_age_s'] for r in aged):.0f} s "
        f"before the row's timing ended); these ceilings ranged over {spans}."
    )


def render(ctx: Context, rows) -> Part:
    perf = ok_rows(rows)
    parts, findings = [], []
    if perf:
        parts.append(f"## {TITLE}\n")
        parts.append(
            "Medians of single timed calls after warm-up (`--repeats` of them, and at "
            "least 31 for calls on at most 2^21 elements, whose medians of a few calls "
            "moved by up to 30% between runs); the first call (JIT compilation, from the "
            "disk cache when present) is reported on its own. GB/s counts the logits "
            "and targets read plus the gradient written; the bandwidth it is a fraction of is "
            "this machine's, measured in the same run by vectorised parallel passes over a "
            f"buffer {ceiling_how(perf)}: the {ceiling.label('forward')} bandwidth for forward "
            f"calls, {ceiling.label('forward_grad')} for forward+gradient.{ceiling_spread(perf)}"
            " Every timed "
            "result was checked against the oracle first (mean loss, and the gradient "
            "of the first rows). `python -m cestudy bench` interleaves cestudy's calls, torch "
            "and the numpy formulations round by round and times each other framework (JAX, "
            "TensorFlow, scikit-learn) in a group of its own right after them: their thread "
            "pools keep spinning after a call and slowed whatever ran next by up to 5x. A "
            "study's cell of cestudy's kernel times torch interleaved with it, and its *vs "
            "torch* is of that pair; every other cell is timed alone, and its *vs torch* is "
            "against torch's own cell.\n"
        )
        tt = torch_medians(perf)
        out_rows = []
        for r in sorted(
            perf,
            key=lambda r: (
                variant_order([r["p_variant"]]),
                _key(r),
                IMPL_ORDER.index(r["p_implementation"])
                if r["p_implementation"] in IMPL_ORDER
                else 99,
            ),
        ):
            ratio = vs_torch(r, tt)
            out_rows.append(
                (
                    r["p_variant"],
                    r["p_implementation"],
                    r["p_mode"],
                    fmt_shape(r["p_batch"], r["p_classes"]),
                    r["p_dtype"],
                    f"{1e3 * r['median_s']:.3g}",
                    f"{r['gb_per_s']:.3g}",
                    fmt_pct(r["frac_bandwidth"]),
                    "n/a" if math.isnan(ratio) else f"{ratio:.2f}x",
                    f"{1e3 * r['compile_s']:.0f}",
                    fmt_ulp(r.get("check_ulp")),
                )
            )
        parts.append(
            table(
                [
                    "variant",
                    "kernel",
                    "mode",
                    "shape",
                    "dtype",
                    "ms",
                    "GB/s",
                    "of bandwidth",
                    "vs torch",
                    "first-call extra (ms)",
                    "mean-loss error (ulp)",
                ],
                out_rows,
            )
        )
        ratios = ratio_table(perf)
        if ratios:
            parts.append(
                "### cestudy against torch, every shape\n\ntorch's median time over "
                "cestudy's, from the same run (above 1.00x cestudy is faster). "
                "forward and forward+grad are the plain calls (the fused one returns its "
                "gradient in an array from `cestudy.buffers`: the previous call's, once the "
                "timing loop has dropped it, from 1 MiB up); *fused, reused buffer* passes "
                "`out=` a gradient array kept from call to call, as a training loop would.\n"
            )
            parts.append(ratios)
        figs = {}
        for variant in variant_order({r["p_variant"] for r in perf}):
            for dt in ("float32", "float64"):
                rel = ctx.figure(
                    f"throughput-{variant}-{dt}",
                    figures.fig_performance,
                    perf,
                    variant=variant,
                    dtype=dt,
                )
                if rel:
                    figs[(variant, dt)] = rel
                    parts.append(
                        f"![Throughput {variant} {dt}]({rel})\n\n*{variant}, {dt}: "
                        "throughput per class count, one line per batch size (a bar "
                        "chart where one shape was timed), and the speed-up over "
                        "torch on the same shapes.*\n"
                    )
        text = speed_sentence(perf)
        if text:
            big = largest(perf)
            findings.append(ctx.finding(text, figs.get((big[0]["p_variant"], big[0]["p_dtype"]))))
        text = cases_sentence(perf)
        if text:
            findings.append(ctx.finding(text))
        text = frameworks_sentence(perf)
        if text:
            findings.append(ctx.finding(text))
    extras = extras_section(rows, perf)
    if extras:
        parts.append(extras)
    if findings:
        parts.append("### Findings\n")
        parts += [f"- {f.markdown(own_page=True)}" for f in findings]
        parts.append("")
    return Part("\n".join(parts), findings)


def extras_section(rows, perf):
    cold = ok_rows(rows, "coldstart")
    sc = sorted(
        ok_rows(rows, "scaling"), key=lambda r: (r["p_mode"], r["p_implementation"], r["p_threads"])
    )
    wc = ok_rows(rows, "worstcase")
    if not (cold or sc or wc):
        return ""
    parts = ["## Cold start, threads and the worst case\n"]
    for r in cold:
        parts.append(
            f"- Cold start (a fresh process: `import cestudy`, then the first forward "
            f"and fused call of {r.get('p_variant', 'cross_entropy')} on "
            f"{r.get('p_dtype', 'float32')}): **{r['cold_s']:.2f} s** with an empty "
            f"Numba cache (compilation), **{r['warm_cache_s']:.2f} s** with the cache "
            f"it left."
        )
    if sc:
        shapes = sorted({(r["p_variant"], r["p_batch"], r["p_classes"], r["p_dtype"]) for r in sc})
        for variant, n, c, dt in shapes:
            sel = [
                r
                for r in sc
                if (r["p_variant"], r["p_batch"], r["p_classes"], r["p_dtype"])
                == (variant, n, c, dt)
            ]
            parts.append(f"\nThreads ({variant}, {fmt_shape(n, c)} {dt}, the same run):\n")
            parts.append(
                table(
                    ["kernel", "mode", "threads", "ms"],
                    [
                        (
                            r["p_implementation"],
                            r["p_mode"],
                            r["p_threads"],
                            f"{1e3 * r['median_s']:.2f}",
                        )
                        for r in sel
                    ],
                )
            )
            for impl in sorted({r["p_implementation"] for r in sel}):
                for mode in sorted({r["p_mode"] for r in sel}):
                    t = {
                        r["p_threads"]: r["median_s"]
                        for r in sel
                        if r["p_implementation"] == impl and r["p_mode"] == mode
                    }
                    if len(t) > 1:
                        lo, hi = min(t), max(t)
                        parts.append(
                            f"- {impl} {mode}: {t[lo] / t[hi]:.2f}x faster with {hi} "
                            f"threads than with {lo}."
                        )
    typical = {
        (r["p_variant"], r["p_mode"], r["p_dtype"], r["p_batch"], r["p_classes"]): r["median_s"]
        for r in perf
        if r["p_implementation"] == "numba"
    }
    for r in sorted(wc, key=lambda r: r["p_mode"]):
        key = (r["p_variant"], r["p_mode"], r["p_dtype"], r["p_batch"], r["p_classes"])
        t = typical.get(key)
        text = (
            f"- Every row confident-correct, {r['p_variant']} {r['p_mode']}, "
            f"{fmt_shape(r['p_batch'], r['p_classes'])} {r['p_dtype']}: "
            f"{1e3 * r['median_s']:.2f} ms"
        )
        if t:
            ratio = r["median_s"] / t
            verdict = (
                "no slower than on typical rows"
                if ratio <= SAME_SPEED
                else f"{ratio:.2f}x the time of typical rows"
            )
            text += f" against {1e3 * t:.2f} ms on typical rows of the same shape: {verdict}."
        else:
            text += " (no typical-row timing of this shape in the same study)."
        parts.append(text)
    parts.append("")
    return "\n".join(parts)
