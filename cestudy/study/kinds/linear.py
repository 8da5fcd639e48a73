"""Linear cells: the cross-entropy of the logits z = X W^T over a large vocabulary, computed five
ways side by side on the same inputs, scored against the float64 / longdouble oracle.

One cell is one input (tokens N, hidden size H, vocabulary V, dtype, logit family); it runs
every formulation, because they share the oracle, which costs more than any of them:

==========================  =====================================================================
``materialised_numpy``      Z = X W^T in float32 (numpy's BLAS; float64 for float64 inputs), then
                            ``cestudy.cross_entropy_with_grad`` and the two backward products:
                            the N x V logits and their gradient are held
``materialised_torch``      ``F.cross_entropy(F.linear(X, W))`` and autograd, in the input dtype
                            (float16/bfloat16 logits are rounded to that dtype)
``torch_chunked``           ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``:
                            torch 2.13's batch-chunked path with its default accumulation policy
``fused``                   ``cestudy.linear_cross_entropy_with_grad``: blocks of rows over the
                            whole vocabulary where they fit (float32/float64 weights), else
                            vocabulary chunks and an online log-sum-exp; float32 accumulation
                            for float32/float16/bfloat16
``fused_filtered``          the same with Cut Cross-Entropy's gradient filter: 128 x 128 tiles of
                            dL/dz whose entries are all below eps/32 of the input dtype dropped
==========================  =====================================================================

Inputs (drawn in float64 from the cell's seed, then rounded to the dtype; every error is that of
the computation on the rounded inputs): ``gaussian``: X ~ N(0, 1), W ~ N(0, scale^2 / H), so
that the logits are about N(0, scale^2), targets uniform; ``confident``: the rows of a trained
model, x_i = scale * w_{y_i} / |w_{y_i}|^2 + N(0, 1 / H) noise, so the target's logit leads the
others by about scale - 4.5 (tiny losses; the case where ``lse - z_y`` rounds to 0).

Metrics, per formulation ``f`` (as ``f__<metric>``), the loss being the mean over tokens:

- ``loss_rel_err``: |loss - exact| / exact; ``row_rel_err_max``/``_median``: the per-token losses
  (reduction "none"), ``row_rel_err_max_normal`` over the tokens whose exact loss is a normal
  number of the dtype (``rows_below_normal`` are not: float16 losses below 6.1e-5 are
  subnormal); ``rows_zero``: fraction of tokens whose loss is 0 where the exact one is not;
- ``gx_err``, ``gw_err``: max |grad - exact| / max |exact| for grad_input and grad_weight;
- the split, for the formulations whose logits are known (all but ``torch_chunked``): the exact
  cross-entropy of the formulation's own logits gives ``*_err_logits`` (what the matrix product's
  rounding alone costs: exact loss and gradients at the computed logits against the exact ones)
  and ``*_err_ce`` (the rest: the cross-entropy's arithmetic and, for gradients, the backward
  products), for ``loss_rel_err``, ``row_rel_err_max``, ``gx_err`` and ``gw_err``;
- ``seconds`` (forward and backward, "mean" reduction, best of ``repeats``), ``traced_peak``
  (tracemalloc's peak during the call minus the returned gradients: every numpy allocation,
  not torch's) and ``rss_peak`` (growth of the process's resident high-water mark, minus the
  same, for every formulation);
- ``fused_filtered`` also: ``dropped_mass`` (share of sum |dL/dz| dropped), ``tiles_dropped``,
  ``gw_diff`` (max |gw - gw of fused| / max |exact gw|) and the loss bias of one SGD step:
  ``step_bias`` = L(theta - eta g_filtered) - L(theta - eta g_fused), theta = (X, W), eta such
  that the first-order decrease is 1% of the loss, and ``step_bias_rel`` = that over the
  decrease of the unfiltered step.

``skip`` names formulations to leave out of a cell (comma-separated): torch's chunked path on the
CPU picks about N H / (2 V) rows per chunk and updates the whole (V, H) weight gradient once per
chunk, about 2 V / H times; at V = 262144 that is minutes per cell.

``load`` is the 1-minute load average when the cell started: timings taken above 1.5 on a
2-core machine are not to be trusted.
"""

from __future__ import annotations

import math
import os
import time
import tracemalloc

import numpy as np

from ... import dtypes
from ... import linear as lin
from ...backends import Skip
from ...kernels import linear as kern
from ...reference import oracle
from .. import inputs
from ..keys import SEED, Key, choice, integer, number

NAME = "linear"
FORMULATIONS = (
    "materialised_numpy",
    "materialised_torch",
    "torch_chunked",
    "fused",
    "fused_filtered",
)
FAMILIES = ("gaussian", "confident")
DTYPES = ("float32", "bfloat16", "float16")
MAX_WEIGHTS = 1 << 27
"""Cells with V x H above this (512 MiB of float32 weights, 1 GiB per float64 copy) are left out
of the grid: the oracle and the formulations hold several V x H arrays at once."""

KEYS = {
    "vocab": integer(32768, 2),
    "hidden": integer(512),
    "tokens": integer(256),
    "dtype": choice("float32", DTYPES),
    "family": choice("gaussian", FAMILIES),
    "scale": number(4.0, 0.0),
    "chunk": integer(0, 0),
    "repeats": integer(1),
    "skip": Key(str, "", None),
    **SEED,
}
SEED_FIELDS = ("vocab", "hidden", "tokens", "family", "scale")  # every dtype: the same draw


def skipped(cell: dict) -> tuple[str, ...]:
    """The formulations the cell's ``skip`` key leaves out (comma-separated names)."""
    names = tuple(n.strip() for n in str(cell.get("skip", "")).split(",") if n.strip())
    unknown = [n for n in names if n not in FORMULATIONS]
    if unknown:
        raise ValueError(
            f"skip: unknown formulations {unknown}; allowed: {', '.join(FORMULATIONS)}"
        )
    return names


def normalise(cell: dict) -> dict | None:
    if cell["vocab"] * cell["hidden"] > MAX_WEIGHTS:
        return None
    skipped(cell)
    return cell


def estimate_seconds(cell: dict) -> float:
    """Fitted to cells timed on the 2-core machine (load about 1.7): the products, the oracle's
    passes over N x V and, unless skipped, torch's chunked path (about 2 V^2 weight updates)."""
    n, h, v = cell["tokens"], cell["hidden"], cell["vocab"]
    t = 1.0 + 1.3e-9 * n * h * v * (1 + 0.3 * (cell["repeats"] - 1)) + 7.6e-7 * n * v
    if "torch_chunked" not in skipped(cell):
        t += 2.2e-8 * v * v
    return t


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_inputs(cell: dict):
    """(X (N, H), W (V, H), y (N,)): float64 draws rounded to the cell's dtype, and targets."""
    n, h, v = cell["tokens"], cell["hidden"], cell["vocab"]
    scale = cell["scale"]
    rng = inputs.rng(cell, SEED_FIELDS)
    y = rng.integers(0, v, n)
    if cell["family"] == "gaussian":
        x = rng.standard_normal((n, h))
        w = rng.standard_normal((v, h)) * (scale / math.sqrt(h))
    else:
        w = rng.standard_normal((v, h)) / math.sqrt(h)
        wy = w[y]
        x = scale * wy / np.sum(wy * wy, axis=1, keepdims=True)
        x += rng.standard_normal((n, h)) / math.sqrt(h)
    dt = dtypes.dtype_from_name(cell["dtype"])
    return x.astype(dt), w.astype(dt), y


# --------------------------------------------------------------------------------------------
# Measuring one call
# --------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_high_water() -> bool:
    """Reset the resident high-water mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeats: int = 1):
    """Run ``fn()`` (returns (result, list of returned arrays)) and measure it: (result,
    best seconds, tracemalloc peak minus the returned bytes, resident high-water growth minus
    the same (None where it cannot be reset)). The memory run is the first; further
    ``repeats`` only time. (No ``gc.collect()``: with torch imported it takes 0.5 s, and the
    arrays of earlier runs are freed by reference counting.)"""
    rss0 = _status("VmRSS")
    hwm_ok = _reset_high_water()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        result, kept = fn()
        best = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    hwm = _status("VmHWM") - rss0 if hwm_ok else None
    kept_bytes = sum(
        int(a.nbytes) if hasattr(a, "nbytes") else int(a.element_size() * a.nelement())
        for a in kept
    )
    for _ in range(repeats - 1):
        del result, kept
        t0 = time.perf_counter()
        result, kept = fn()
        best = min(best, time.perf_counter() - t0)
    return (
        result,
        best,
        max(0, peak - kept_bytes),
        None if hwm is None else max(0, hwm - kept_bytes),
    )


# --------------------------------------------------------------------------------------------
# The formulations: each returns a dict with loss (the mean, float), rows (per-token losses in
# the dtype), gx, gw (arrays), seconds, traced_peak, rss_peak and, where known, logits(c0, c1)
# --------------------------------------------------------------------------------------------
def _compute_dtype(dt):
    return np.float64 if dt == np.float64 else np.float32


def _formulation(loss, rows, gx, gw, measured, logits, logits_chunk, traced=True):
    """The dict a formulation returns, from its mean loss, per-token losses, gradients, what
    :func:`measure` measured (result, seconds, traced peak, RSS peak) and its logits (None
    where they are not at hand). ``traced=False``: tracemalloc does not see the allocations."""
    _, seconds, traced_peak, rss_peak = measured
    return dict(
        loss=float(loss),
        rows=rows,
        gx=gx,
        gw=gw,
        seconds=seconds,
        traced_peak=traced_peak if traced else None,
        rss_peak=rss_peak,
        logits=logits,
        logits_chunk=logits_chunk,
    )


def run_fused(x, w, y, chunk, repeats, filter_eps=0.0):
    def fn():
        r = lin.run_fused(x, w, y, chunk_size=chunk, with_grad=True, filter_eps=filter_eps)
        return r, [r.grad_input, r.grad_weight]

    measured = measure(fn, repeats)
    r = measured[0]
    rows = lin.run_fused(x, w, y, chunk_size=chunk, reduction="none").loss
    cdt = _compute_dtype(x.dtype)
    xc = np.ascontiguousarray(x, dtype=cdt)
    n = x.shape[0]
    if r.row_block:
        # the kernel's own products, a block of rows at a time: the logits it saw, held whole
        # (N x V, as the materialised formulations hold them) for the error split
        z = np.empty((n, w.shape[0]), dtype=cdt)
        for r0 in range(0, n, r.row_block):
            r1 = min(n, r0 + r.row_block)
            kern.block_logits(xc, w, None, r0, r1, z[r0:r1])
        out = _formulation(
            r.loss, rows, r.grad_input, r.grad_weight, measured, lambda c0, c1: z[:, c0:c1], None
        )
        out["row_block"] = r.row_block
    else:
        used = r.chunk
        wbuf = np.empty(used * x.shape[1], dtype=cdt)

        def logits(c0, c1):  # the kernel's own chunks: the same BLAS calls
            part = np.empty((n, c1 - c0), dtype=cdt)
            kern.chunk_logits(xc, w, None, c0, c1, part, wbuf)
            return part

        out = _formulation(r.loss, rows, r.grad_input, r.grad_weight, measured, logits, used)
    if r.filter_stats is not None:
        out["filter_stats"] = r.filter_stats
    return out


def run_materialised_numpy(x, w, y, chunk, repeats):
    from ... import losses

    cdt = _compute_dtype(x.dtype)

    def fn():
        x32 = np.asarray(x, dtype=cdt)
        w32 = np.asarray(w, dtype=cdt)
        z = x32 @ w32.T
        loss, g = losses.cross_entropy_with_grad(z, y)
        gx = (g @ w32).astype(x.dtype)
        gw = (g.T @ x32).astype(x.dtype)
        return (np.asarray(loss).astype(x.dtype), gx, gw), [gx, gw]

    measured = measure(fn, repeats)
    loss, gx, gw = measured[0]
    z = np.asarray(x, dtype=cdt) @ np.asarray(w, dtype=cdt).T
    rows = losses.cross_entropy(z, y, reduction="none").astype(x.dtype)
    return _formulation(loss, rows, gx, gw, measured, lambda c0, c1: z[:, c0:c1], None)


def _torch():
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed (pip install torch==2.13.0, the CPU build)") from None
    return torch


def _to_torch(a):
    torch = _torch()
    if a.dtype == dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _from_torch(t, dtype):
    torch = _torch()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy().astype(dtype)


def run_torch(x, w, y, chunked, repeats):
    torch = _torch()
    F = torch.nn.functional
    xt, wt = _to_torch(x), _to_torch(w)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    opts = torch.nn.LinearCrossEntropyOptions() if chunked else None

    def call(reduction):
        if chunked:
            return F.linear_cross_entropy(xt, wt, yt, reduction=reduction, options=opts)
        return F.cross_entropy(F.linear(xt, wt), yt, reduction=reduction)

    def fn():
        xt.grad = wt.grad = None
        xt.requires_grad_(True)
        wt.requires_grad_(True)
        loss = call("mean")
        loss.backward()
        return loss.detach(), [xt.grad, wt.grad]

    measured = measure(fn, repeats)
    gx, gw = _from_torch(xt.grad, x.dtype), _from_torch(wt.grad, x.dtype)
    xt.requires_grad_(False)
    wt.requires_grad_(False)
    with torch.no_grad():
        rows = _from_torch(call("none"), x.dtype)
        logits = None
        if not chunked:
            z = _from_torch(F.linear(xt, wt), np.float64 if x.dtype == np.float64 else np.float32)
            logits = lambda c0, c1: z[:, c0:c1]  # noqa: E731
    loss = _from_torch(measured[0], np.float64)
    return _formulation(loss, rows, gx, gw, measured, logits, None, traced=False)


def warm_up(x, w, y, chunk, leave_out=()):
    """Run every formulation once on a small slice of the inputs, so that no timing includes
    numba's compilation (or loading from its cache) or torch's first call for a dtype."""
    xs, ws, ys = x[:4], w[:300], y[:4] % 300
    for f in FORMULATIONS:
        if f in leave_out:
            continue
        try:
            if f == "fused":
                run_fused(xs, ws, ys, 128, 1)
            elif f == "fused_filtered":
                run_fused(xs, ws, ys, 128, 1, filter_eps=1e-30)
            elif f == "materialised_numpy":
                run_materialised_numpy(xs, ws, ys, None, 1)
            else:
                run_torch(xs, ws, ys, f == "torch_chunked", 1)
        except Skip:
            pass


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _rel(value, exact):
    return abs(float(value) - float(exact)) / abs(float(exact)) if exact != 0 else math.inf


def _max_rel_to_largest(g, exact):
    """max |g - exact| / max |exact| (chunked over rows, in float64)."""
    scale = float(np.max(np.abs(exact)))
    worst = 0.0
    step = max(1, (1 << 22) // max(1, exact.shape[1]))
    for r0 in range(0, exact.shape[0], step):
        gc = np.asarray(g[r0 : r0 + step])
        if gc.dtype not in (np.float32, np.float64):
            gc = gc.astype(np.float32)  # bfloat16 -> float64 directly is 25 times slower
        d = np.subtract(gc, exact[r0 : r0 + step], dtype=np.float64)
        np.abs(d, out=d)
        worst = max(worst, float(np.max(d)) if d.size else 0.0)
    return worst / scale if scale > 0 else math.inf


def _row_errors(rows, exact_rows, tiny=0.0):
    """(max, median relative error, share of zeros where the exact loss is > 0, max relative
    error over the rows whose exact loss is at least ``tiny``: the dtype's smallest normal)."""
    ex = np.asarray(exact_rows, dtype=np.float64)
    got = np.asarray(rows).astype(np.float64)
    pos = ex > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(got[pos] - ex[pos]) / ex[pos]
    rel = np.where(np.isnan(rel), np.inf, rel)
    normal = rel[ex[pos] >= tiny]
    return (
        float(np.max(rel)) if rel.size else 0.0,
        float(np.median(rel)) if rel.size else 0.0,
        float(np.mean(got[pos] == 0)) if rel.size else 0.0,
        float(np.max(normal)) if normal.size else 0.0,
    )


def _oracle(x, w, y, logits=None, chunk=None):
    """(per-row losses, mean (float), grad_input, grad_weight) of the "mean" loss: the oracle in
    float64 (about 1e-13 relative: 2e-6 of a float32 ulp)."""
    rows, gx, gw, _ = oracle.linear_cross_entropy_and_grad(
        x, w, y, logits=logits, chunk=chunk, precision="float64"
    )
    n = x.shape[0]
    gx /= n
    gw /= n
    return rows, float(np.sum(rows) / n), gx, gw


def _f64(a):
    a = np.asarray(a)
    return (a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)).astype(np.float64)


def _sgd_loss(x64, w64, y, gx, gw, eta):
    return float(lin.linear_cross_entropy(x64 - eta * _f64(gx), w64 - eta * _f64(gw), y))


# --------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------
def compute(cell: dict) -> dict:
    x, w, y = make_inputs(cell)
    dt = x.dtype
    chunk = cell["chunk"] or None
    repeats = cell["repeats"]
    leave_out = skipped(cell)
    out = {"load": os.getloadavg()[0], "unit_roundoff": dtypes.unit_roundoff(dt)}
    warm_up(x, w, y, chunk, leave_out)

    ex_rows, ex_mean, ex_gx, ex_gw = _oracle(x, w, y)
    tiny = float(dtypes.finfo(dt).tiny)  # the smallest normal: below it results are subnormal
    out.update(
        exact_loss=ex_mean,
        exact_row_min=float(np.min(ex_rows)),
        exact_row_median=float(np.median(ex_rows.astype(np.float64))),
        rows_below_normal=float(np.mean(ex_rows < tiny)),
    )

    results = {}
    split_of = {}  # formulation -> (o_rows, o_mean, o_gx, o_gw, its logits) for reuse
    for f in FORMULATIONS:
        if f in leave_out:
            continue
        try:
            if f == "fused":
                r = run_fused(x, w, y, chunk, repeats)
            elif f == "fused_filtered":
                r = run_fused(x, w, y, chunk, repeats, filter_eps=float(dtypes.finfo(dt).eps) / 32)
            elif f == "materialised_numpy":
                r = run_materialised_numpy(x, w, y, chunk, repeats)
            else:
                r = run_torch(x, w, y, f == "torch_chunked", repeats)
        except Skip as exc:
            out[f"{f}__skipped"] = str(exc)
            continue
        results[f] = r
        m = {
            "loss": r["loss"],
            "loss_rel_err": _rel(r["loss"], ex_mean),
            "gx_err": _max_rel_to_largest(r["gx"], ex_gx),
            "gw_err": _max_rel_to_largest(r["gw"], ex_gw),
            "seconds": r["seconds"],
            "traced_peak": r["traced_peak"],
            "rss_peak": r["rss_peak"],
        }
        (
            m["row_rel_err_max"],
            m["row_rel_err_median"],
            m["rows_zero"],
            m["row_rel_err_max_normal"],
        ) = _row_errors(r["rows"], ex_rows, tiny)
        if r["logits"] is not None and f != "fused_filtered":
            same = _same_logits(r, split_of, w.shape[0])
            if same is not None:  # the same logits as an earlier formulation: its split
                o_rows, o_mean, o_gx, o_gw = split_of[same][:4]
                m["split_shared_with"] = same
            else:
                o_rows, o_mean, o_gx, o_gw = _oracle(x, w, y, r["logits"], r["logits_chunk"])
                split_of[f] = (o_rows, o_mean, o_gx, o_gw, r["logits"], r["logits_chunk"])
            m["loss_rel_err_logits"] = _rel(o_mean, ex_mean)
            m["loss_rel_err_ce"] = abs(r["loss"] - o_mean) / abs(ex_mean)
            m["row_rel_err_max_logits"] = _row_errors(o_rows.astype(np.float64), ex_rows)[0]
            m["row_rel_err_max_ce"] = _row_errors(r["rows"], o_rows)[0]
            m["gx_err_logits"] = _max_rel_to_largest(o_gx, ex_gx)
            m["gw_err_logits"] = _max_rel_to_largest(o_gw, ex_gw)
            m["gx_err_ce"] = _max_rel_to_largest(r["gx"], o_gx) * _ratio(o_gx, ex_gx)
            m["gw_err_ce"] = _max_rel_to_largest(r["gw"], o_gw) * _ratio(o_gw, ex_gw)
        if "row_block" in r:
            m["row_block"] = r["row_block"]
        if "filter_stats" in r:
            st = r["filter_stats"]
            m["dropped_mass"] = float(st[0] / st[1]) if st[1] else 0.0
            m["tiles_dropped"] = float(st[2] / st[3]) if st[3] else 0.0
        out.update({f"{f}__{k}": v for k, v in m.items()})
        r.pop("rows", None)
    split_of.clear()

    if "fused" in results and "fused_filtered" in results:
        a, b = results["fused"], results["fused_filtered"]
        out["fused_filtered__gw_diff"] = _max_rel_to_largest(b["gw"], _f64(a["gw"])) * _ratio(
            a["gw"], ex_gw
        )
        out["fused_filtered__step_bias"] = out["fused_filtered__step_bias_rel"] = 0.0
        if out.get("fused_filtered__dropped_mass", 0.0) > 0:  # else the same step exactly
            x64, w64 = _f64(x), _f64(w)
            l0 = float(lin.linear_cross_entropy(x64, w64, y))
            norm2 = float(np.sum(_f64(a["gx"]) ** 2) + np.sum(_f64(a["gw"]) ** 2))
            eta = 0.01 * l0 / norm2 if norm2 > 0 else 0.0
            l_full = _sgd_loss(x64, w64, y, a["gx"], a["gw"], eta)
            l_filt = _sgd_loss(x64, w64, y, b["gx"], b["gw"], eta)
            out["fused_filtered__step_bias"] = l_filt - l_full
            out["fused_filtered__step_bias_rel"] = (
                (l_filt - l_full) / (l0 - l_full) if l0 != l_full else math.nan
            )
    return out


def _same_logits(r, split_of, v):
    """The earlier formulation whose logits are bitwise those of ``r`` (compared one chunk at a
    time), or None."""
    step = r["logits_chunk"] or 4096
    for name, (*_, logits, chunk) in split_of.items():
        step = chunk or step
        if all(
            np.array_equal(
                np.asarray(r["logits"](c0, min(v, c0 + step))),
                np.asarray(logits(c0, min(v, c0 + step))),
            )
            for c0 in range(0, v, step)
        ):
            return name
    return None


def _ratio(a, b) -> float:
    """max |a| / max |b|: rescales an error relative to a's largest entry to b's."""
    sb = float(np.max(np.abs(b)))
    return float(np.max(np.abs(_f64(a)))) / sb if sb else math.inf


# --------------------------------------------------------------------------------------------
# The benchmark of the target: python -m cestudy.study.kinds.linear
# --------------------------------------------------------------------------------------------
def benchmark(
    tokens=2048,
    hidden=512,
    vocab=65536,
    dtype="float32",
    repeats=3,
    chunk=None,
    reference=True,
    stream=print,
) -> dict:
    """Time, memory and accuracy of the fused kernel against torch's F.linear_cross_entropy,
    chunked (``options=LinearCrossEntropyOptions()``) and materialised (F.cross_entropy of
    F.linear: what F.linear_cross_entropy computes with its default ``options=None``), in the
    same process, at one shape (forward and backward, "mean"); with ``reference``, torch in
    float64 as the accuracy reference. Prints one line per measurement and returns them."""
    torch = _torch()
    cell = dict(
        tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype, family="gaussian", scale=4.0, seed=0
    )
    x, w, y = make_inputs(cell)
    out = {"load_before": os.getloadavg()[0], "threads_torch": torch.get_num_threads()}
    warm_up(x, w, y, chunk, ("materialised_numpy", "fused_filtered"))
    runs = {
        "fused": run_fused(x, w, y, chunk, repeats),
        "torch_chunked": run_torch(x, w, y, True, repeats),
        "materialised_torch": run_torch(x, w, y, False, repeats),
    }
    out.update(
        logits_bytes=tokens * vocab * 4,
        chunk=runs["fused"]["logits_chunk"],
        row_block=runs["fused"].get("row_block", 0),
    )
    for name, r in runs.items():
        out.update(
            {
                f"{name}_seconds": r["seconds"],
                f"{name}_traced_peak": r["traced_peak"],
                f"{name}_rss_peak": r["rss_peak"],
            }
        )
    if reference:
        # torch in float64, in batch chunks of 256 rows (the same function; 128 MiB of logits)
        F = torch.nn.functional
        xt = torch.from_numpy(_f64(x)).requires_grad_(True)
        wt = torch.from_numpy(_f64(w)).requires_grad_(True)
        opts = torch.nn.LinearCrossEntropyOptions(
            batch_chunk_size=min(256, tokens), chunking_method=None
        )
        ref = F.linear_cross_entropy(xt, wt, torch.from_numpy(y), options=opts)
        ref.backward()
        rgx, rgw = xt.grad.numpy(), wt.grad.numpy()
        for name, r in runs.items():
            out.update(
                {
                    f"{name}_loss_rel_err": _rel(r["loss"], float(ref)),
                    f"{name}_gx_err": _max_rel_to_largest(r["gx"], rgx),
                    f"{name}_gw_err": _max_rel_to_largest(r["gw"], rgw),
                }
            )
    out["load_after"] = os.getloadavg()[0]
    for k, v in out.items():
        stream(f"{k:28s} {v}")
    return out


if __name__ == "__main__":  # pragma: no cover - a command
    import argparse

    ap = argparse.ArgumentParser(
        description="fused linear cross-entropy vs torch: time, traced memory, accuracy"
    )
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--no-reference", action="store_true")
    a = ap.parse_args()
    benchmark(a.tokens, a.hidden, a.vocab, a.dtype, a.repeats, a.chunk, not a.no_reference)
