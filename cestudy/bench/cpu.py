"""CPU speed measurement: cestudy's kernels side by side with torch, numpy and scipy.

``python -m cestudy bench`` times, in one process and interleaved (round r runs every
implementation of a group once before round r + 1, so machine drift hits all alike; the other
frameworks each in a group of their own beside torch), the forward and fused
forward+gradient of softmax CE with class indices, soft-target CE, BCE with logits, KL of
softmax and the softmax and sigmoid focal losses (:data:`VARIANTS`). It
measures this machine's memory ceiling in the same run (``bench.ceiling``: vectorised read, and
read + write, of the kernel's dtype over buffers far larger than the caches), checks each timed
result against the oracle before it counts, and reports ms, GB/s, the fraction of the ceiling
(read for forward, read + write for fused) and the ratio to torch. The ``performance`` study
uses the same machinery cell by cell.

No test asserts a timing: speed is measured here and reported, never tested.
"""

from __future__ import annotations

import functools
import time
import zlib

import numpy as np

from .. import dtypes, variants
from ..reference import oracle, peers
from . import ceiling

# --------------------------------------------------------------------------------------------
# Inputs and callables
# --------------------------------------------------------------------------------------------
CE = "cross_entropy"
CE_PROBS = "cross_entropy_probs"
BCE = "binary_cross_entropy_with_logits"
# every variant of logits with a gradient, each against torch (its own functional, or the
# torch-op expression of cestudy.reference.peers where torch has none)
VARIANTS = (CE, CE_PROBS, BCE, "kl_divergence", "softmax_focal_loss", "sigmoid_focal_loss")


def make_inputs(variant, dtype, n, c, seed=0):
    """Logits N(0, 3^2) of ``dtype`` and a target of the variant's kind (registry): class
    indices, probability rows, or 0/1 labels."""
    variant = variants.canonical_name(variant)
    rng = np.random.default_rng([seed, zlib.crc32(f"{variant}|{n}|{c}".encode())])
    dt = dtypes.dtype_from_name(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    x = (rng.standard_normal((n, c), dtype=np.float32) * 3).astype(dt)
    target = variants.get(variant).target
    if target == "index":
        t = rng.integers(0, c, n)
    elif target == "probs":
        t = rng.random((n, c), dtype=np.float32).astype(dt)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = (rng.random((n, c), dtype=np.float32) < 0.5).astype(dt)
    return x, t


def _mean_denominator(variant, x):
    """What the mean reduction divides by: every element for element-wise losses, else rows."""
    return x.size if variants.get(variant).elementwise else x.shape[0]


# cestudy's fused call and where its gradient goes: an array it returns ("numba": from
# cestudy.buffers, so the last call's array once the timing loop has dropped it), one buffer
# the caller passes to every call ("numba_out": no N x C pages faulted in per step), or the
# logits themselves ("numba_inplace": the gradient written over them, restored before each
# timed call)
GRAD_BUFFERS = ("numba_out", "numba_inplace")


def _cestudy_function(variant, grad):
    """cestudy's public function for ``variant`` (its ``_with_grad`` twin for a gradient), with
    the mean reduction (sigmoid_focal_loss defaults to 'none', as in torchvision)."""
    import cestudy as cs

    function = variants.get(variant).function
    return functools.partial(
        getattr(cs, function + "_with_grad" if grad else function), reduction="mean"
    )


def _torch_mean_loss(variant):
    """torch's mean loss of ``variant`` as f(xt, tt): its own functional where it has one
    (F.cross_entropy, F.binary_cross_entropy_with_logits), otherwise the torch-op expression
    the conformance peer uses (cestudy.reference.peers), reduced by mean as cestudy does."""
    import torch.nn.functional as F

    if variant in (CE, CE_PROBS):
        return F.cross_entropy
    if variant == BCE:
        return F.binary_cross_entropy_with_logits
    per_sample = peers.torch_loss_expression(variant)
    return lambda xt, tt: per_sample(xt, tt, None).mean()


def make_callable(variant, impl, mode, x, t):
    """A zero-argument function computing the mean loss (and its gradient for
    mode='forward_grad'), returning (loss, grad or None). A function with a ``setup``
    attribute needs ``setup()`` run, untimed, before each call."""
    grad = mode == "forward_grad"
    variant = variants.canonical_name(variant)
    if impl in GRAD_BUFFERS:
        if not grad:
            raise KeyError(f"{impl} times the fused call only")
        fn = _cestudy_function(variant, grad=True)
        if impl == "numba_out":
            buf = np.empty_like(x)
            return lambda: fn(x, t, out=buf)
        work = x.copy()

        def run_inplace():
            return fn(work, t, out=work)

        def restore():
            work[...] = x

        run_inplace.setup = restore
        return run_inplace
    if impl in peers.TIMED:  # jax, tensorflow, sklearn: run as their users run them
        return peers.timed_callable(variant, impl, mode, x, t)
    if impl == "numba":
        fn = _cestudy_function(variant, grad)
        if grad:
            return lambda: fn(x, t)
        return lambda: (fn(x, t), None)
    if impl == "torch":
        import torch

        xt = torch.from_numpy(x)
        tt = torch.from_numpy(t)
        f = _torch_mean_loss(variant)
        if not grad:

            def run():
                with torch.no_grad():
                    return f(xt, tt).item(), None

            return run
        xg = xt.clone().requires_grad_(True)

        def run_grad():
            xg.grad = None
            loss = f(xg, tt)
            loss.backward()
            return loss.item(), xg.grad.numpy()

        return run_grad
    if impl == "scipy":
        from scipy import special

        if variant != CE:
            raise KeyError("scipy implements only cross_entropy here")
        rows = np.arange(x.shape[0])

        def run_scipy():
            if not grad:
                return float(np.mean(special.logsumexp(x, axis=1) - x[rows, t])), None
            lp = special.log_softmax(x, axis=1)
            g = np.exp(lp)
            g[rows, t] -= 1
            return float(-np.mean(lp[rows, t])), g / x.shape[0]

        return run_scipy
    # numpy formulations from the registry (they compute loss and gradient together)
    from ..reference import implementations

    f = implementations.get(variant, impl).fn
    if grad and f(x[:1], t[:1])[1] is None:
        raise KeyError(f"the {impl} formulation of {variant} has no gradient")
    denom = _mean_denominator(variant, x)

    def run_numpy():
        loss, g = f(x, t)
        mean = float(np.sum(loss.astype(np.float64)) / denom)
        return mean, (g / g.dtype.type(denom) if grad else None)

    return run_numpy


def _oracle_mean(variant, x, t, chunk=256):
    """Exact mean loss, in row chunks so that extended precision fits in memory."""
    total = oracle.LD(0)
    for i in range(0, x.shape[0], chunk):
        total += oracle.loss(variant, x[i : i + chunk], t[i : i + chunk]).sum()
    return total / _mean_denominator(variant, x)


def _oracle_grad_rows(variant, x, t, rows=8):
    """The exact gradient of the mean loss on the first ``rows`` rows."""
    return oracle.grad(variant, x[:rows], t[:rows]) / _mean_denominator(variant, x)


@functools.lru_cache(maxsize=2)
def _exact(variant, dtype, n, c, seed):
    """(exact mean loss, exact gradient of the first rows) of ``make_inputs``' inputs, kept for
    the groups that time the same inputs one after another."""
    x, t = make_inputs(variant, dtype, n, c, seed)
    return _oracle_mean(variant, x, t), _oracle_grad_rows(variant, x, t)


def check(variant, x, t, result, dtype, exact_mean=None, exact_grad=None):
    """(ulp error of the mean loss, max gradient error in ulps on the first rows). The exact
    values may be passed in, computed once for all implementations of a group."""
    loss, g = result
    if exact_mean is None:
        exact_mean = _oracle_mean(variant, x, t)
    err = float(oracle.ulp_error(np.float64(loss), exact_mean, dtype))
    gerr = None
    if g is not None:
        ex = _oracle_grad_rows(variant, x, t) if exact_grad is None else exact_grad
        gerr = float(np.max(oracle.grad_ulp_error(np.asarray(g)[: len(ex)], ex, dtype)))
    return err, gerr


def bytes_moved(variant, mode, x, t):
    moved = x.nbytes + np.asarray(t).nbytes
    if mode == "forward_grad":
        moved += x.nbytes
    return moved


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_group(variant, dtype, mode, n, c, impls, repeats=7, seed=0, check_results=True):
    """Time several implementations of one (variant, dtype, mode, shape), interleaved.

    Returns {impl: metrics}. The first call of each (JIT compilation for Numba, from the disk
    cache when present) is timed on its own and not counted in the repeats."""
    x, t = make_inputs(variant, dtype, n, c, seed)
    dt = x.dtype
    calls, out = {}, {}
    for impl in impls:
        try:
            calls[impl] = make_callable(variant, impl, mode, x, t)
        except (ImportError, KeyError) as exc:
            out[impl] = {"skipped": str(exc)}
    first = {}
    exact_mean = exact_grad = None
    if check_results and calls:
        exact_mean, exact_grad = _exact(variant, dtype, n, c, seed)
    for impl, f in calls.items():
        setup = getattr(f, "setup", None)
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        res = f()
        first[impl] = time.perf_counter() - t0
        if check_results:
            out[impl] = dict(
                zip(
                    ("check_ulp", "grad_check_ulp"),
                    check(variant, x, t, res, dt, exact_mean, exact_grad),
                )
            )
        else:
            out[impl] = {}
        if setup is not None:
            setup()
        f()  # warm-up
    samples = {impl: [] for impl in calls}
    for _ in range(repeats):
        for impl, f in calls.items():
            setup = getattr(f, "setup", None)
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            f()
            samples[impl].append(time.perf_counter() - t0)
    # measured again when the last is over a minute old: the VM's memory speed moves
    ceil = ceiling.measured(mode, dt, max_age_s=ceiling.MAX_AGE_S)
    bw = ceil["gbs"]
    moved = bytes_moved(variant, mode, x, t)
    for impl, s in samples.items():
        q1, med, q3 = np.quantile(s, [0.25, 0.5, 0.75])
        out[impl].update(
            {
                "median_s": float(med),
                "q1_s": float(q1),
                "q3_s": float(q3),
                "first_call_s": float(first[impl]),
                "compile_s": float(max(first[impl] - med, 0.0)),
                "elements_per_s": float(x.size / med),
                "gb_per_s": float(moved / med / 1e9),
                "bandwidth_gbs": float(bw),
                "frac_bandwidth": float(moved / med / 1e9 / bw),
                # which ceiling, over how large a buffer (sized from which cache), the median
                # of how many passes
                "ceiling_kind": ceil["kind"],
                "ceiling_buffer_bytes": ceil["buffer_bytes"],
                "ceiling_llc_bytes": ceil["last_level_cache_bytes"],
                "ceiling_passes": ceil["passes"],
                "ceiling_age_s": ceil["age_s"],
                "ceiling_max_age_s": ceil["max_age_s"],
                "bytes": int(moved),
                "samples_s": [float(v) for v in s],
            }
        )
    if "torch" in samples:
        for impl in samples:
            out[impl]["speedup_vs_torch"] = out["torch"]["median_s"] / out[impl]["median_s"]
    return out


PAIRED_WITH_TORCH = ("numba",)
"""The implementations whose performance cells time torch interleaved with them (as ``python -m
cestudy bench`` does its groups), so that their ratio to torch is of timings taken side by side:
the machine's speed moved by a third within a minute, and a ratio of two cells timed minutes
apart moved with it. cestudy's kernels only: the ratios the reports claim are theirs, and a
pair for every numpy formulation as well would add a third to the study's time. The other cells
(the numpy formulations, and JAX, TensorFlow and scikit-learn, whose thread pools keep spinning
after a call and slowed whatever ran next) are timed alone and compared with torch's own cell."""


def performance_cell(cell):
    """One cell of the performance study: its implementation timed on its own, or interleaved
    with torch (:data:`PAIRED_WITH_TORCH`), when the cell also records torch's median
    (``torch_median_s``) and the ratio of the two (``speedup_vs_torch``)."""
    from ..backends import Skip
    from ..reference.implementations import get

    impl = cell["implementation"]
    ok, why = get(cell["variant"], impl).availability()
    if not ok:
        raise Skip(why)
    # torch missing (not installed): time_group skips it, and the cell records no ratio
    impls = [impl, "torch"] if impl in PAIRED_WITH_TORCH else [impl]
    group = time_group(
        cell["variant"],
        cell["dtype"],
        cell["mode"],
        cell["batch"],
        cell["classes"],
        impls,
        repeats=cell["repeats"],
        seed=cell["seed"],
    )
    res = group[impl]
    if "skipped" in res:
        raise Skip(res["skipped"])
    if len(impls) == 2 and "speedup_vs_torch" in res:
        res["torch_median_s"] = group["torch"]["median_s"]
    return res
