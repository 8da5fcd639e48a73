"""Figures for the reports (matplotlib, Agg, PNG), drawn from result rows only.

Each ``fig_*`` function takes the rows of one study and a path, draws one figure kind, writes the
PNG and returns True (or False when the rows hold nothing to draw). Colours are fixed per
implementation across every figure.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..bench import ceiling  # noqa: E402
from .data import torch_medians, vs_torch  # noqa: E402

COLOURS = {
    "naive": "#d62728",
    "clipped": "#ff7f0e",
    "lse": "#9467bd",
    "accurate": "#8c564b",
    "numba": "#2ca02c",
    # the fused call with a reused gradient buffer, and writing over the logits: greens of numba
    "numba_out": "#0b6e0b",
    "numba_inplace": "#98df8a",
    "cuda": "#17becf",
    "torch": "#1f77b4",
    "scipy": "#7f7f7f",
    "jax": "#e377c2",
    "tensorflow": "#bcbd22",
    "sklearn": "#393b79",
}
IMPL_ORDER = [
    "naive",
    "clipped",
    "lse",
    "accurate",
    "scipy",
    "sklearn",
    "torch",
    "jax",
    "tensorflow",
    "numba",
    "numba_out",
    "numba_inplace",
    "cuda",
]
DTYPE_ORDER = ["float64", "float32", "float16", "bfloat16"]
# A value drawn for an infinite ulp error (NaN/inf where the exact value is finite); figures draw
# a grey line labelled "non-finite" there and captions say so
INF_ULP = 1e12
# The colour range of the stability atlas, in ulp: it saturates outside it
ATLAS_RANGE = (1e-2, 1e8)
WEIGHT_LABELS = {"inverse": "inverse-frequency weights", "effective": "effective-number weights"}


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return True


def _legend_beside(fig, axes):
    """One legend for every panel of ``axes``, beside them (each label once), for a figure with
    constrained layout."""
    handles = {}
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=7)


def _log_x_panels(fig, axes, titles, xlabel, ylabel, suptitle, path):
    """Finish a row of panels that share a log x axis: titles, labels, grid, one legend beside
    the panels (none over the data), the figure title clear of the panels' titles; save."""
    fig.set_layout_engine("constrained")
    for ax, title in zip(axes[0], titles):
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    _legend_beside(fig, axes[0])
    fig.suptitle(suptitle)
    return _save(fig, path)


def _ordered(values, order):
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _num(v):
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


PLAIN = {"label_smoothing": 0.0, "class_weight": "none", "ignore_fraction": 0.0, "imbalance": 1.0}


def _acc(rows, plain=False, **where):
    """Accuracy rows matching ``where``; ``plain`` keeps only cells with default options (no
    smoothing, weights, ignored targets or imbalance), so sweeps compare like with like."""
    out = []
    for r in rows:
        if r["kind"] != "accuracy" or r["status"] != "ok":
            continue
        if plain and any(r.get(f"p_{k}", v) != v for k, v in PLAIN.items()):
            continue
        if all(
            r.get(f"p_{k}") in (v if isinstance(v, (list, tuple)) else (v,))
            for k, v in where.items()
        ):
            out.append(r)
    return out


def _agg(rows, key_fields, metric, how=max):
    """{key tuple: aggregated metric} over rows (infinite errors kept as inf)."""
    groups = {}
    for r in rows:
        k = tuple(r[f"p_{f}"] for f in key_fields)
        v = _num(r.get(metric))
        if not math.isnan(v):
            groups.setdefault(k, []).append(v)
    return {k: how(v) for k, v in groups.items()}


MAX_CAP = 1e30  # beyond this a log axis of ulps tells nothing more (and 1e308 breaks it)


def _series(ax, xs, ys, colour, label):
    """One series in the figures' usual style: a line with small dots."""
    ax.plot(xs, ys, "-o", ms=3, color=colour, label=label)


def _clip_inf(v, cap=INF_ULP):
    """The value drawn for an error: ``cap`` where it is infinite or beyond the cap, at least
    1e-3 (exact)."""
    return cap if math.isinf(v) or v > cap else max(v, 1e-3)


def _cap(*dicts):
    """Where to draw infinite errors: INF_ULP, or two decades above the largest finite error."""
    finite = [v for d in dicts for v in d.values() if math.isfinite(v) and v > 0]
    top = max(finite, default=1.0)
    # finite errors reach 1e308 ulp (a tiny exact value, a result of order 1): keep 10^e finite
    return max(INF_ULP, min(10.0 ** min(math.ceil(math.log10(top)) + 2, 300), MAX_CAP))


def _cap_line(ax, cap=INF_ULP):
    """The grey line at ``cap`` where non-finite results are drawn, labelled on the axes."""
    ax.axhline(cap, color="0.6", lw=1.5, zorder=0)
    ax.text(
        0.98,
        cap,
        "non-finite " if cap < MAX_CAP else f"non-finite or > {MAX_CAP:.0e} ulp ",
        transform=ax.get_yaxis_transform(),
        fontsize=7,
        color="0.35",
        va="top",
        ha="right",
    )
    ax.set_ylim(1e-3 / 3, cap * 30)


# --------------------------------------------------------------------------------------------
# 1. forward error vs logit scale
# --------------------------------------------------------------------------------------------
def fig_error_vs_scale(rows, path, variant="cross_entropy"):
    rows = _acc(rows, plain=True, variant=variant, family="gaussian")
    dtypes = _ordered({r["p_dtype"] for r in rows}, DTYPE_ORDER)
    if not rows or not dtypes:
        return False
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(4.2 * len(dtypes), 3.6), squeeze=False, sharey=True
    )
    mx = _agg(rows, ("dtype", "implementation", "scale"), "fwd_max_ulp")
    p99 = _agg(rows, ("dtype", "implementation", "scale"), "fwd_p99_ulp")
    cap = _cap(mx, p99)
    for ax, dt in zip(axes[0], dtypes):
        impls = _ordered({k[1] for k in mx if k[0] == dt}, IMPL_ORDER)
        for impl in impls:
            scales = sorted(k[2] for k in mx if k[0] == dt and k[1] == impl)
            c = COLOURS.get(impl, "k")
            _series(
                ax, scales, [_clip_inf(mx[(dt, impl, s)], cap) for s in scales], c, f"{impl} max"
            )
            ax.plot(
                scales,
                [_clip_inf(p99[(dt, impl, s)], cap) for s in scales],
                ":",
                color=c,
                label=f"{impl} p99",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(4, color="k", lw=0.8, ls="--")
        _cap_line(ax, cap)
        ax.set_title(f"{dt}")
        ax.set_xlabel("logit scale (standard deviation)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("forward error (ulp)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.9, 0.5), fontsize=7)
    fig.suptitle(f"{variant}: forward error against the oracle (dashed line: 4 ulp)", y=1.03)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# 2. stability atlas
# --------------------------------------------------------------------------------------------
def fig_atlas(rows, path, variant="cross_entropy", dtype="float32"):
    rows = _acc(rows, plain=True, variant=variant, family="gaussian", dtype=dtype)
    impls = _ordered({r["p_implementation"] for r in rows}, IMPL_ORDER)
    scales = sorted({r["p_scale"] for r in rows})
    classes = sorted({r["p_classes"] for r in rows})
    if len(scales) < 2 or len(classes) < 2:
        return False
    mx = _agg(rows, ("implementation", "scale", "classes"), "fwd_max_ulp")
    nonfin = _agg(rows, ("implementation", "scale", "classes"), "fwd_frac_nan")
    inf = _agg(rows, ("implementation", "scale", "classes"), "fwd_frac_inf")
    ncol = min(4, len(impls))
    nrow = math.ceil(len(impls) / ncol)
    fig, axes = plt.subplots(
        nrow,
        ncol,
        figsize=(3.6 * ncol + 1.2, 3.3 * nrow),
        squeeze=False,
        sharex=True,
        sharey=True,
        constrained_layout=True,
    )
    cmap = plt.get_cmap("viridis").copy()
    lo, hi = (math.log10(v) for v in ATLAS_RANGE)
    im = None
    for k, (ax, impl) in enumerate(zip(axes.ravel(), impls)):
        grid = np.full((len(classes), len(scales)), np.nan)
        for i, c in enumerate(classes):
            for j, s in enumerate(scales):
                v = mx.get((impl, s, c))
                if v is not None and math.isfinite(v):
                    grid[i, j] = np.log10(max(v, 1e-30))
        im = ax.imshow(grid, origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i, c in enumerate(classes):
            for j, s in enumerate(scales):
                n = nonfin.get((impl, s, c), 0.0) or 0.0
                f = inf.get((impl, s, c), 0.0) or 0.0
                if n > 0 or f > 0:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="#d62728"))
                    ax.text(
                        j,
                        i,
                        "NaN" if n >= f else "inf",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white",
                    )
        ax.set_title(impl, fontsize=9)
        ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales], fontsize=6, rotation=90)
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=6)
        if k // ncol == nrow - 1 or k + ncol >= len(impls):
            ax.set_xlabel("logit scale", fontsize=7)
            ax.tick_params(axis="x", labelbottom=True)
        if k % ncol == 0:
            ax.set_ylabel("classes", fontsize=7)
    for ax in axes.ravel()[len(impls) :]:
        ax.axis("off")
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, extend="both")
        cb.set_ticks(range(int(lo), int(hi) + 1, 2))
        cb.set_ticklabels([f"1e{t}" for t in range(int(lo), int(hi) + 1, 2)])
        cb.set_label(
            f"max forward error (ulp); saturates below {ATLAS_RANGE[0]:g} and above "
            f"{ATLAS_RANGE[1]:g}\nred: NaN or inf",
            fontsize=8,
        )
    fig.suptitle(f"Stability atlas, {variant}, {dtype}")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# 3. non-finite fraction vs scale
# --------------------------------------------------------------------------------------------
def fig_nonfinite(rows, path, variant="cross_entropy"):
    rows = _acc(rows, plain=True, variant=variant, family="gaussian")
    dtypes = _ordered({r["p_dtype"] for r in rows}, DTYPE_ORDER)
    if not rows:
        return False
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(4.0 * len(dtypes), 3.3), squeeze=False, sharey=True
    )
    for r in rows:
        r["_nonfinite"] = _num(r.get("fwd_frac_nan")) + _num(r.get("fwd_frac_inf"))
    frac = _agg(
        rows, ("dtype", "implementation", "scale"), "_nonfinite", how=lambda v: float(np.mean(v))
    )
    for ax, dt in zip(axes[0], dtypes):
        for impl in _ordered({k[1] for k in frac if k[0] == dt}, IMPL_ORDER):
            scales = sorted(k[2] for k in frac if k[0] == dt and k[1] == impl)
            _series(
                ax,
                scales,
                [100 * frac[(dt, impl, s)] for s in scales],
                COLOURS.get(impl, "k"),
                impl,
            )
    return _log_x_panels(
        fig,
        axes,
        dtypes,
        "logit scale",
        "non-finite results (% of samples)",
        f"{variant}: NaN or inf where the exact loss is finite",
        path,
    )


# --------------------------------------------------------------------------------------------
# 4. epsilon clipping
# --------------------------------------------------------------------------------------------
CLIPPING_FAMILIES = (
    ("dominant", "logit margin of the dominant class"),
    ("gaussian", "logit scale (gaussian logits)"),
)
"""The row families the clipping figure draws, one row of panels each, and their x axes."""


def fig_clipping(rows, path, variant="cross_entropy"):
    """Epsilon clipping's loss bias and zeroed gradients, per dtype and eps, over the margin of
    confident rows and over the scale of gaussian logits: each point the worst cell of its
    margin or scale (the most negative mean bias, the largest fraction of zeroed gradients),
    so that the cell a finding quotes is a point of the figure."""
    rows = [
        r
        for r in _acc(rows, implementation="clipped", variant=variant)
        if r.get("clip_bias_nats") is not None
    ]
    families = [(f, x) for f, x in CLIPPING_FAMILIES if any(r["p_family"] == f for r in rows)]
    if not families:
        return False
    fig, axes = plt.subplots(
        len(families),
        2,
        figsize=(10, 0.4 + 3.4 * len(families)),
        squeeze=False,
        layout="constrained",
    )
    styles = {"float64": "-", "float32": "--", "float16": ":", "bfloat16": "-."}
    for (family, xlabel), (a1, a2) in zip(families, axes):
        sel = [r for r in rows if r["p_family"] == family]
        key = ("dtype", "clip_eps", "scale")
        bias = _agg(sel, key, "clip_bias_nats", how=min)
        zero = _agg(sel, key, "clip_frac_grad_zeroed", how=max)
        for i, (dt, eps) in enumerate(sorted({k[:2] for k in bias})):
            xs = sorted(k[2] for k in bias if k[:2] == (dt, eps))
            col = plt.get_cmap("tab10")(i % 10)
            # float32 and float64 often coincide: hollow, larger markers keep both visible
            mk = dict(marker="o", ms=3 + 4 * i, mfc="none", lw=1 + 1.5 * (i == 0), alpha=0.85)
            style = styles.get(dt, "-")
            label = f"{dt}, eps={eps:.3g}"
            a1.plot(xs, [bias[(dt, eps, x)] for x in xs], style, color=col, label=label, **mk)
            a2.plot(
                xs,
                [100 * zero.get((dt, eps, x), 0.0) for x in xs],
                style,
                color=col,
                label=label,
                **mk,
            )
        a1.set_ylabel("most negative mean loss bias\nwhere the clip engages (nats)")
        a2.set_ylabel("most rows whose gradient\nthe clip zeroes (%)")
        for ax in (a1, a2):
            ax.set_xlabel(xlabel)
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        a2.legend(fontsize=7)
    fig.suptitle(
        f"Epsilon clipping of probabilities ({variant}): the worst cell of each margin or scale"
    )
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# 5. true-class gradient vs margin
# --------------------------------------------------------------------------------------------
def fig_true_class_gradient(rows, path, variant="cross_entropy"):
    rows = _acc(rows, plain=True, variant=variant, family="dominant")
    rows = [
        r
        for r in rows
        if r.get("grad_true_max_ulp") is not None and r["p_implementation"] != "clipped"
    ]
    dtypes = _ordered({r["p_dtype"] for r in rows}, DTYPE_ORDER)
    if not rows:
        return False
    fig, axes = plt.subplots(
        2,
        len(dtypes),
        figsize=(4.3 * len(dtypes) + 1.4, 6.2),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    err = _agg(rows, ("dtype", "implementation", "scale"), "grad_true_max_ulp")
    van = _agg(rows, ("dtype", "implementation", "scale"), "grad_true_frac_vanished")
    cap = _cap(err)
    impls = _ordered({k[1] for k in err}, IMPL_ORDER)
    # torch, JAX and TensorFlow compute the same numbers: hollow markers that grow along the
    # legend and dashes keep each visible where the lines coincide
    style = {
        impl: dict(
            ls=("-", "--", ":", "-.")[i % 4],
            marker="os^Dv"[i % 5],
            ms=3 + 1.1 * i,
            mfc="none",
            lw=1.2,
            color=COLOURS.get(impl, "k"),
            label=impl,
        )
        for i, impl in enumerate(impls)
    }
    for j, dt in enumerate(dtypes):
        for impl in _ordered({k[1] for k in err if k[0] == dt}, IMPL_ORDER):
            ms = sorted(k[2] for k in err if k[0] == dt and k[1] == impl)
            axes[0][j].plot(ms, [_clip_inf(err[(dt, impl, m)], cap) for m in ms], **style[impl])
            axes[1][j].plot(ms, [100 * van.get((dt, impl, m), 0) for m in ms], **style[impl])
        axes[0][j].set_yscale("log")
        axes[0][j].set_xscale("log")
        axes[0][j].axhline(4, color="k", lw=0.8, ls="--")
        _cap_line(axes[0][j], cap)
        axes[0][j].set_title(dt)
        axes[0][j].grid(True, alpha=0.3)
        axes[1][j].grid(True, alpha=0.3)
        axes[1][j].set_xlabel("logit margin of the dominant class")
    axes[0][0].set_ylabel("true-class gradient, max error (ulp)\n(dashed: 4 ulp)")
    axes[1][0].set_ylabel("true-class gradients wrongly 0 (%)")
    _legend_beside(fig, axes[0])
    fig.suptitle(
        f"{variant}: the true-class gradient p_y - 1 on confident rows\n(where e^-margin "
        "underflows the dtype the exact gradient rounds to 0, and every form is exact)"
    )
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# 6. imbalance
# --------------------------------------------------------------------------------------------
def imbalance_label(r):
    """A loss as the imbalance study ran it: the variant's registry name, its gamma where it
    has one, and its class weights."""
    label = r["p_variant"]
    opts = []
    if r.get("p_gamma") is not None and "focal" in label:
        opts.append(f"gamma {r['p_gamma']:g}")
    if r.get("p_class_weight", "none") != "none":
        opts.append(WEIGHT_LABELS.get(r["p_class_weight"], f"{r['p_class_weight']} weights"))
    return label + (f" ({', '.join(opts)})" if opts else "")


def imbalance_series(rows):
    """{(label, profile, classes): {ratio: (loss share, grad share, sample share)}} (seed mean)."""
    acc = {}
    for r in rows:
        if r["kind"] != "imbalance" or r["status"] != "ok":
            continue
        key = (imbalance_label(r), r["p_profile"], r["p_classes"])
        acc.setdefault(key, {}).setdefault(r["p_imbalance"], []).append(
            (r["minority_loss_share"], r["minority_grad_share"], r["minority_sample_share"])
        )
    return {k: {ratio: tuple(np.mean(v, axis=0)) for ratio, v in d.items()} for k, d in acc.items()}


def fig_imbalance(rows, path):
    series = imbalance_series(rows)
    if not series:
        return False
    profiles = sorted({k[1] for k in series})
    classes = min(k[2] for k in series)
    fig, axes = plt.subplots(
        2, len(profiles), figsize=(5.2 * len(profiles), 7), squeeze=False, sharex=True
    )
    labels = sorted({k[0] for k in series})
    cmap = plt.get_cmap("tab10")
    for j, prof in enumerate(profiles):
        sample = None
        for i, lab in enumerate(labels):
            d = series.get((lab, prof, classes))
            if not d:
                continue
            # no minority sample drawn: the shares are not applicable there
            ratios = [x for x in sorted(d) if d[x][2] > 0]
            _series(axes[0][j], ratios, [100 * d[x][0] for x in ratios], cmap(i % 10), lab)
            _series(axes[1][j], ratios, [100 * d[x][1] for x in ratios], cmap(i % 10), lab)
            sample = [(x, 100 * d[x][2]) for x in ratios]
        for ax in axes[:, j]:
            if sample:
                ax.plot(*zip(*sample), "k--", lw=1, label="minority share of samples")
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        axes[0][j].set_title(f"{prof} profile, {classes} classes")
        axes[1][j].set_xlabel("imbalance ratio (largest / smallest class)")
    axes[0][0].set_ylabel("minority share of the loss (%)")
    axes[1][0].set_ylabel("minority share of gradient norms (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("What the minority classes get under each loss")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# 7. performance
# --------------------------------------------------------------------------------------------
def fig_performance(rows, path, variant="cross_entropy", dtype="float32"):
    """Throughput over class counts, one line per (implementation, batch size), and the speed-up
    over torch; a bar chart where only one shape was timed."""
    rows = [
        r
        for r in rows
        if r["kind"] == "performance"
        and r["status"] == "ok"
        and r["p_variant"] == variant
        and r["p_dtype"] == dtype
    ]
    if not rows:
        return False
    modes = _ordered({r["p_mode"] for r in rows}, ["forward", "forward_grad"])
    shapes = sorted({(r["p_batch"], r["p_classes"]) for r in rows})
    batches = sorted({b for b, _ in shapes})
    markers = dict(zip(batches, ["o", "s", "^", "D", "v", "P"] * 4))
    styles = dict(zip(batches, ["-", "--", ":", "-."] * 6))
    fig, axes = plt.subplots(2, len(modes), figsize=(5.6 * len(modes), 7.4), squeeze=False)
    for j, mode in enumerate(modes):
        sel = [r for r in rows if r["p_mode"] == mode]
        # the ceiling is measured again during a run (bench.ceiling.MAX_AGE_S): the line is the
        # rows' median, the band what it ranged over
        ceilings = [r["bandwidth_gbs"] for r in sel]
        bw, lo, hi = float(np.median(ceilings)), min(ceilings), max(ceilings)
        torch_t = torch_medians(sel)
        impls = _ordered({r["p_implementation"] for r in sel}, IMPL_ORDER)
        if len(shapes) == 1:
            xs = np.arange(len(impls))
            gb = [next(r["gb_per_s"] for r in sel if r["p_implementation"] == i) for i in impls]
            axes[0][j].bar(xs, gb, color=[COLOURS.get(i, "k") for i in impls])
            axes[0][j].set_xticks(xs, impls, fontsize=8)
            sp = [
                (
                    i,
                    vs_torch(next(r for r in sel if r["p_implementation"] == i), torch_t),
                )
                for i in impls
                if i != "torch"
            ]
            sp = [(i, v) for i, v in sp if not math.isnan(v)]
            axes[1][j].bar(
                np.arange(len(sp)), [v for _, v in sp], color=[COLOURS.get(i, "k") for i, _ in sp]
            )
            axes[1][j].set_xticks(np.arange(len(sp)), [i for i, _ in sp], fontsize=8)
            n, c = shapes[0]
            axes[0][j].set_title(f"{mode}, {n} x {c}, {dtype}")
        else:
            for impl in impls:
                col = COLOURS.get(impl, "k")
                for b in batches:
                    pts = sorted(
                        (
                            r["p_classes"],
                            r["gb_per_s"],
                            vs_torch(r, torch_t),
                        )
                        for r in sel
                        if r["p_implementation"] == impl and r["p_batch"] == b
                    )
                    if not pts:
                        continue
                    axes[0][j].plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        styles[b],
                        marker=markers[b],
                        ms=4,
                        color=col,
                    )
                    rat = [(p[0], p[2]) for p in pts if not math.isnan(p[2])]
                    if rat and impl != "torch":
                        axes[1][j].plot(*zip(*rat), styles[b], marker=markers[b], ms=4, color=col)
            for ax in axes[:, j]:
                ax.set_xscale("log")
                ax.set_xlabel("classes")
            axes[0][j].set_title(f"{mode}, {dtype}")
        axes[0][j].axhline(bw, color="k", ls="--", lw=1)
        spread = ""
        if hi > lo:
            axes[0][j].axhspan(lo, hi, color="k", alpha=0.08, lw=0)
            spread = f" (median; measured {lo:.1f} to {hi:.1f})"
        axes[0][j].text(
            0.01,
            bw,
            f"{ceiling.label(mode)} bandwidth {bw:.1f} GB/s{spread}",
            fontsize=7,
            va="bottom",
            transform=axes[0][j].get_yaxis_transform(),
        )
        axes[0][j].set_ylim(0, hi * 1.15)
        axes[0][j].set_ylabel("throughput (GB/s moved)")
        axes[1][j].axhline(1, color="k", lw=0.8)
        axes[1][j].set_ylabel("speed-up over torch (x)")
        axes[1][j].set_yscale("log")
        axes[1][j].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[1][j].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes[1][j].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for ax in axes[:, j]:
            ax.grid(True, alpha=0.3)
    from matplotlib.lines import Line2D

    impls = _ordered({r["p_implementation"] for r in rows}, IMPL_ORDER)
    handles = [
        Line2D([], [], color=COLOURS.get(i, "k"), lw=6 if len(shapes) == 1 else 1.5, label=i)
        for i in impls
    ]
    if len(shapes) > 1:
        handles += [
            Line2D([], [], color="0.3", ls=styles[b], marker=markers[b], label=f"batch {b}")
            for b in batches
        ]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 6),
        fontsize=8,
        frameon=False,
    )
    n_runs = len({r.get("run_id") for r in rows})
    runs = "one run" if n_runs == 1 else f"{n_runs} runs; ratios only within a run"
    fig.suptitle(f"CPU throughput, {variant} ({runs}, medians of repeats)")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# 8. Blanchard-Higham reproduction
# --------------------------------------------------------------------------------------------
def fig_higham(rows, path):
    rows = sorted(
        (r for r in rows if r["kind"] == "higham" and r["status"] == "ok"),
        key=lambda r: (r["p_dtype"], r["p_formulation"]),
    )
    if not rows:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"{r['p_dtype']}\n{r['p_formulation']}" for r in rows]
    xs = np.arange(len(rows))
    a1.bar(xs - 0.2, [r["overflow"] for r in rows], 0.4, label="this run", color="#2ca02c")
    a1.bar(
        xs + 0.2,
        [r["published_overflow"] or 0 for r in rows],
        0.4,
        label="published (Blanchard et al. 2021)",
        color="#7f7f7f",
    )
    for x, r in zip(xs, rows):
        a1.text(x - 0.2, r["overflow"], str(r["overflow"]), ha="center", va="bottom", fontsize=8)
    a1.set_xticks(xs, labels, fontsize=8)
    a1.set_ylabel(f"vectors whose log-sum-exp overflows (of {rows[0]['n_vectors']})")
    a1.legend(fontsize=8)
    edges = np.linspace(-6, 3, 37)
    centres = 10 ** ((edges[:-1] + edges[1:]) / 2)
    for r in rows:
        h = r.get("err_over_u_hist")
        if h:
            a2.step(centres, h, where="mid", label=f"{r['p_dtype']} {r['p_formulation']}")
    a2.set_xscale("log")
    a2.set_xlabel("relative error / unit roundoff u (finite results)")
    a2.set_ylabel("vectors")
    a2.legend(fontsize=8)
    a2.grid(True, alpha=0.3)
    fig.suptitle("Blanchard, Higham & Higham 2021 on their MNIST data: simulated low precision")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# GPU benchmark
# --------------------------------------------------------------------------------------------
def fig_cuda(doc, path):
    """Throughput per shape on the GPU: torch vs cestudy (best block size), with the measured
    copy bandwidth as the ceiling."""
    rows = [
        r for r in doc.get("rows", []) if r.get("ms") is not None and r.get("dtype") == "float32"
    ]
    if not rows:
        return False
    shapes = sorted({(r["n"], r["c"]) for r in rows}, key=lambda s: s[1])
    series = {
        "torch forward": [],
        "torch forward+backward": [],
        "cestudy forward": [],
        "cestudy forward+grad": [],
    }
    for s in shapes:
        for label in series:
            sel = [r["gb_per_s"] for r in rows if (r["n"], r["c"]) == s and r["kernel"] == label]
            series[label].append(max(sel) if sel else np.nan)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = np.arange(len(shapes))
    styles = {
        "torch forward": ("#1f77b4", "-"),
        "torch forward+backward": ("#1f77b4", "--"),
        "cestudy forward": ("#17becf", "-"),
        "cestudy forward+grad": ("#17becf", "--"),
    }
    for label, vals in series.items():
        col, ls = styles[label]
        ax.plot(xs, vals, ls, marker="o", color=col, label=label)
    bw = doc.get("copy_bandwidth_gbs")
    if bw:
        ax.axhline(bw, color="k", lw=1, ls=":", label=f"copy bandwidth {bw:.0f} GB/s")
        ax.axhline(0.8 * bw, color="grey", lw=1, ls=":", label="80% of copy bandwidth")
    ax.set_xticks(xs, [f"{n}x{c}" for n, c in shapes], fontsize=8)
    ax.set_xlabel("shape (rows x classes); cestudy at its fastest block size per shape")
    ax.set_ylabel("GB/s of logits read (+ gradient written)")
    ax.set_title(f"{doc.get('device', 'GPU')}: float32 cross-entropy throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Training study
# --------------------------------------------------------------------------------------------
LOSS_COLOURS = {
    "ce": "#1f77b4",
    "ce_inverse": "#ff7f0e",
    "ce_effective": "#bcbd22",
    "focal1": "#9467bd",
    "focal2": "#8c564b",
    "smooth": "#e377c2",
    "naive": "#d62728",
    "clipped": "#7f7f7f",
    "sklearn": "#17becf",
    "sklearn_balanced": "#2ca02c",
}


def fig_training_curves(rows, path):
    """Training loss per epoch (mini-batch GD, logistic regression, seed 0), one panel per
    (dataset, dtype) at the largest imbalance, one line per loss."""
    rows = [
        r
        for r in rows
        if r["kind"] == "training"
        and r["status"] == "ok"
        and r["p_optimizer"] == "gd"
        and r["p_model"] == "logreg"
        and r["p_seed"] == 0
        and r.get("curve_train_loss")
    ]
    if not rows:
        return False
    top = max(r["p_imbalance"] for r in rows)
    rows = [r for r in rows if r["p_imbalance"] == top and r["p_profile"] == "step"]
    datasets = sorted({r["p_dataset"] for r in rows})
    dts = _ordered({r["p_dtype"] for r in rows}, DTYPE_ORDER)
    if not datasets:
        return False
    # one row of panels per dataset, one column per dtype; the legend beside them
    fig, axes = plt.subplots(
        len(datasets),
        len(dts),
        figsize=(3.6 * len(dts) + 1.6, 2.9 * len(datasets) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    handles = {}
    for (i, ds), (j, dt) in ((a, b) for a in enumerate(datasets) for b in enumerate(dts)):
        ax = axes[i][j]
        sel = [r for r in rows if (r["p_dataset"], r["p_dtype"]) == (ds, dt)]
        if not sel:
            ax.set_visible(False)
            continue
        for r in sorted(sel, key=lambda r: r["p_loss"]):
            ys = [_num(v) for v in r["curve_train_loss"]]
            (line,) = ax.plot(
                range(1, len(ys) + 1),
                [v if math.isfinite(v) else np.nan for v in ys],
                color=LOSS_COLOURS.get(r["p_loss"], "k"),
            )
            handles.setdefault(r["p_loss"], line)
            if r.get("first_nonfinite_step"):
                ax.plot(
                    [len(ys)],
                    [np.nanmax([v for v in ys if math.isfinite(v)] or [1])],
                    "x",
                    color=LOSS_COLOURS.get(r["p_loss"], "k"),
                )
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{ds}, {dt}, imbalance {top:g}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if j == 0:
            ax.set_ylabel("training objective\n(x: NaN/inf appeared)")
    fig.legend(
        list(handles.values()), list(handles), loc="outside right center", fontsize=8, title="loss"
    )
    fig.suptitle("Learning curves, logistic regression by mini-batch gradient descent")
    return _save(fig, path)


def fig_training_bacc(rows, path):
    """Balanced accuracy (mean over seeds) vs imbalance ratio per loss, L-BFGS logistic
    regression, float32 (and scikit-learn's peers)."""
    rows = [
        r
        for r in rows
        if r["kind"] == "training"
        and r["status"] == "ok"
        and r["p_optimizer"] == "lbfgs"
        and r["p_dtype"] in ("float32", "float64")
        and r["p_profile"] == "step"
    ]
    datasets = sorted({r["p_dataset"] for r in rows})
    if not datasets:
        return False
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sel = [r for r in rows if r["p_dataset"] == ds]
        for loss in sorted({r["p_loss"] for r in sel}):
            pts = {}
            for r in sel:
                if r["p_loss"] == loss:
                    pts.setdefault(r["p_imbalance"], []).append(_num(r["balanced_accuracy"]))
            xs = sorted(pts)
            _series(ax, xs, [np.nanmean(pts[x]) for x in xs], LOSS_COLOURS.get(loss, "k"), loss)
    return _log_x_panels(
        fig,
        axes,
        datasets,
        "imbalance ratio of the training split",
        "balanced accuracy on the balanced test split",
        "Logistic regression by L-BFGS: which loss copes with imbalance",
        path,
    )
