"""``python -m cestudy bench --backend cuda``: the GPU benchmark, for a machine with an NVIDIA GPU.

One run measures, on the same device:

- the ceilings: the read bandwidth (a numba kernel that sums a 4 GiB float32 buffer, and torch's
  ``sum`` of it when torch is there; the larger counts) and the device-to-device copy bandwidth
  (bytes read + written), each the best of five;
- for float32 and bfloat16 logits at each shape (``SHAPES``): cestudy's public functions on
  device arrays (``cross_entropy`` forward, ``cross_entropy_with_grad`` into a gradient buffer
  and into the logits themselves), at 256, 512 and 1024 threads per block, beside torch's eager
  ``F.cross_entropy`` forward and forward+backward. Each kernel is first checked against the
  oracle in the input's precision (per-sample losses of the first rows, gradients of the first
  four rows; ``ulp``/``grad_ulp``), then timed with CUDA events after warm-up: the median over
  21 batches of 10 calls issued back to back (the host's launch work overlapping the GPU's, as
  in a training loop), inputs rotated over buffers at least three times the L2 so that they do
  not sit in it. Each row records GB/s (the logits read, plus the gradient written for the
  fused calls, which read the logits twice), ``frac_read_bw`` and ``frac_copy_bw`` (those bytes
  per second over each ceiling) and ``vs_torch`` (torch's time over cestudy's);
- what a call costs on the host (``call_overhead``): microseconds per call issued back to back
  without synchronisation at a small shape, where the GPU work is shorter than the launch, for
  cestudy's forward and fused calls and torch's forward and forward+backward.

It prints one table and writes everything as JSON (``--json``; the committed results are
``reports/data/cuda_bench.json``). In the CUDA simulator it runs the checks alone at small shapes
(``--validate-only`` does the same on a GPU): simulator timings are meaningless and never
recorded, so every timing field of such a run is None ("unmeasured").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import numpy as np

from .. import dtypes
from ..reference import oracle
from ..study import manifest as info

SHAPES = [(65536, 128), (16384, 1024), (4096, 4096), (8192, 32768), (8192, 131072)]
DTYPES = ("float32", "bfloat16")
THREADS = (256, 512, 1024)
VALIDATE_SHAPES = [(16, 300), (8, 2000)]
VALIDATE_THREADS = (8, 32)
OVERHEAD_SHAPE = (64, 128)
L2_FLUSH_BYTES = 3 * 60 * 2**20  # rotate over >= 3x the largest L2 (60 MB on an H200)
PEERS = {"forward": "torch forward", "forward+grad": "torch forward+backward"}


# --------------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------------
def _events():
    from numba import cuda

    return cuda.event(timing=True), cuda.event(timing=True)


def _time(fn, repeats, warmup=3, batch=10):
    """Median seconds per call of ``fn(i)``: ``repeats`` batches of ``batch`` calls issued back to
    back between two CUDA events on the default stream (torch's eager ops run on it too), so
    that the host's launch work overlaps the GPU's as in a training loop; ``call_overhead``
    reports the host's share apart."""
    from numba import cuda

    for i in range(warmup):
        fn(i)
    cuda.synchronize()
    times = []
    for r in range(repeats):
        a, b = _events()
        a.record()
        for i in range(batch):
            fn(r * batch + i)
        b.record()
        b.synchronize()
        times.append(cuda.event_elapsed_time(a, b) / 1e3 / batch)
    return float(np.median(times))


def copy_bandwidth(nbytes=4 << 30, repeats=5):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    from numba import cuda

    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    best = min(
        _time(lambda i: dst.copy_to_device(src), 1, warmup=1, batch=1) for _ in range(repeats)
    )
    return 2 * nbytes / best / 1e9


_READ_KERNEL = []


def _read_kernel():
    """A kernel that reads a float32 vector once (grid-stride, four independent loads a
    thread) and writes one value only if its sum is an impossible one (so nothing is skipped)."""
    if not _READ_KERNEL:
        from numba import cuda, float32

        @cuda.jit
        def read_all(a, out):
            i = cuda.grid(1)
            step = cuda.gridsize(1)
            n = a.shape[0]
            s0 = s1 = s2 = s3 = float32(0.0)
            while i + 3 * step < n:
                s0 += a[i]
                s1 += a[i + step]
                s2 += a[i + 2 * step]
                s3 += a[i + 3 * step]
                i += 4 * step
            while i < n:
                s0 += a[i]
                i += step
            if s0 + s1 + s2 + s3 == float32(-1.5e38):
                out[0] = s0

        _READ_KERNEL.append(read_all)
    return _READ_KERNEL[0]


def read_bandwidth(nbytes=4 << 30, repeats=5):
    """(numba, torch) read bandwidth in GB/s over a ``nbytes`` float32 buffer (torch: None
    without it)."""
    from numba import cuda

    buf = cuda.device_array(nbytes // 4, np.float32)  # its contents do not matter
    out = cuda.device_array(1, np.float32)
    sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 132)
    kernel = _read_kernel()
    t = min(
        _time(lambda i: kernel[sms * 8, 256](buf, out), 1, warmup=1, batch=1)
        for _ in range(repeats)
    )
    numba_bw = nbytes / t / 1e9
    torch_bw = None
    try:
        import torch

        x = torch.as_tensor(buf, device="cuda")
        t = min(_time(lambda i: x.sum(), 1, warmup=1, batch=1) for _ in range(repeats))
        torch_bw = nbytes / t / 1e9
    except ImportError:
        pass
    return numba_bw, torch_bw


# --------------------------------------------------------------------------------------------
# Inputs, checks, timed calls
# --------------------------------------------------------------------------------------------
def _torch_cuda():
    from .. import backends

    if backends.simulator_enabled():
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def make_inputs(n, c, dtype, count, seed=0):
    """``count`` logits buffers (N(0, 9) values) and class-index targets on the device: torch
    tensors when torch has CUDA (generated there: host generation of 4 GiB would dominate the
    run), else numba arrays (bfloat16 as ``BFloat16Bits``). Returns (logits, target, torch)."""
    from numba import cuda

    from ..kernels import cuda as ck

    torch = _torch_cuda()
    if torch is not None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[
            dtype
        ]
        xs = [(torch.randn((n, c), generator=g, device="cuda") * 3).to(tdt) for _ in range(count)]
        y = torch.randint(0, c, (n,), generator=g, device="cuda", dtype=torch.int64)
        return xs, y, True
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(count):
        x = (rng.standard_normal((n, c), dtype=np.float32) * 3).astype(
            dtypes.dtype_from_name(dtype)
        )
        xs.append(
            ck.bfloat16_bits(cuda.to_device(x.view(np.uint16)))
            if dtype == "bfloat16"
            else cuda.to_device(x)
        )
    return xs, cuda.to_device(rng.integers(0, c, n)), False


def _host(a, rows):
    """The first ``rows`` rows of a device array (torch, numba or BFloat16Bits) on the host, in
    its dtype (bfloat16 as ml_dtypes)."""
    if hasattr(a, "cpu"):
        import torch

        t = a[:rows].cpu()
        return (
            t.view(torch.int16).numpy().view(dtypes.bfloat16)
            if t.dtype == torch.bfloat16
            else t.numpy()
        )
    from ..kernels import cuda as ck

    if isinstance(a, ck.BFloat16Bits):
        return a.bits[:rows].copy_to_host().view(dtypes.bfloat16)
    return a[:rows].copy_to_host()


def check(x, y, dtype, rows=16, grad_rows=4):
    """cestudy's per-sample losses and gradient of the first rows against the oracle, in ulps
    of the input's precision: (loss ulp, gradient ulp)."""
    import cestudy as cs

    hx, hy = _host(x, rows), _host(y, rows)
    dt = dtypes.dtype_from_name(dtype)
    loss, grad = cs.cross_entropy_with_grad(x[:rows], y[:rows], reduction="none", backend="cuda")
    got_l = _host(loss, rows).astype(dt)
    got_g = _host(grad, grad_rows)
    err = float(np.max(oracle.ulp_error(got_l, oracle.cross_entropy(hx, hy), dt)))
    gerr = float(
        np.max(
            oracle.grad_ulp_error(
                got_g, oracle.cross_entropy_grad(hx[:grad_rows], hy[:grad_rows]), dt
            )
        )
    )
    return err, gerr


@contextlib.contextmanager
def threads(nt):
    """Run cestudy's kernels at ``nt`` threads per block (they read $CESTUDY_CUDA_THREADS)."""
    old = os.environ.get("CESTUDY_CUDA_THREADS")
    os.environ["CESTUDY_CUDA_THREADS"] = str(nt)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CESTUDY_CUDA_THREADS")
        else:
            os.environ["CESTUDY_CUDA_THREADS"] = old


def cestudy_calls(xs, y, grad):
    """(label, bytes factor, fn(i), peer) for cestudy's timed calls on buffer i % len(xs)."""
    import cestudy as cs

    count = len(xs)
    return (
        (
            "cestudy forward",
            1,
            lambda i: cs.cross_entropy(xs[i % count], y, backend="cuda"),
            "forward",
        ),
        (
            "cestudy forward+grad",
            2,
            lambda i: cs.cross_entropy_with_grad(xs[i % count], y, backend="cuda", out=grad),
            "forward+grad",
        ),
        (
            "cestudy forward+grad inplace",
            2,
            lambda i: cs.cross_entropy_with_grad(
                xs[i % count], y, backend="cuda", out=xs[i % count]
            ),
            "forward+grad",
        ),
    )


def torch_calls(xs, y):
    """(label, bytes factor, fn(i)) for torch's eager forward and forward+backward."""
    import torch.nn.functional as F

    count = len(xs)

    def fwd_bwd(i):
        xi = xs[i % count].detach().requires_grad_(True)
        F.cross_entropy(xi, y).backward()

    return (
        ("torch forward", 1, lambda i: F.cross_entropy(xs[i % count], y)),
        ("torch forward+backward", 2, fwd_bwd),
    )


def row(kernel, n, c, dtype, nt, seconds, nbytes, bw, **extra):
    """One result row; timing fields are None when ``seconds`` is None (unmeasured)."""
    r = {
        "kernel": kernel,
        "n": n,
        "c": c,
        "dtype": dtype,
        "threads": nt,
        "bytes": nbytes,
        "ms": None,
        "gb_per_s": None,
        "frac_read_bw": None,
        "frac_copy_bw": None,
        **extra,
    }
    if seconds is not None:
        gbs = nbytes / seconds / 1e9
        r.update(
            ms=1e3 * seconds,
            gb_per_s=gbs,
            frac_read_bw=gbs / bw["read"] if bw.get("read") else None,
            frac_copy_bw=gbs / bw["copy"] if bw.get("copy") else None,
        )
    return r


def host_cost(fn, calls=200):
    """Microseconds of host time per call, ``calls`` calls issued back to back (no
    synchronisation between them), after warm-up; the GPU drained before and after."""
    from numba import cuda

    for i in range(5):
        fn(i)
    cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    host = time.perf_counter() - t0
    cuda.synchronize()
    return 1e6 * host / calls


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def measure_shape(n, c, dtype, bw, repeats, thread_counts, timed, out):
    """The rows of one (shape, dtype): the check, then (``timed``) torch and cestudy."""
    item = 4 if dtype == "float32" else 2
    size = n * c * item
    count = 1 if not timed else max(2, min(8, math.ceil(L2_FLUSH_BYTES / size)))
    xs, y, is_torch = make_inputs(n, c, dtype, count)
    from ..kernels import cuda as ck

    grad = xs[0].clone() if is_torch else ck.device_array((n, c), dtypes.dtype_from_name(dtype))
    peers = {}
    if timed and is_torch:
        for label, factor, fn in torch_calls(xs, y):
            med = _time(fn, repeats)
            peers[label] = med
            out.append(row(label, n, c, dtype, None, med, factor * size, bw, vs_torch=1.0))
            _print(out[-1])
    for nt in thread_counts:
        with threads(nt):
            try:
                err, gerr = check(xs[0], y, dtype)
            except Exception as exc:  # e.g. too many registers for this block size
                print(f"threads={nt}: {type(exc).__name__}: {exc}")
                out.append(
                    {
                        "kernel": "launch failure",
                        "n": n,
                        "c": c,
                        "dtype": dtype,
                        "threads": nt,
                        "error": str(exc),
                    }
                )
                continue
            for label, factor, fn, peer in cestudy_calls(xs, y, grad):
                med = _time(fn, repeats) if timed else None
                ref = peers.get(PEERS[peer])
                out.append(
                    row(
                        label,
                        n,
                        c,
                        dtype,
                        nt,
                        med,
                        factor * size,
                        bw,
                        vs_torch=None if ref is None or med is None else ref / med,
                        ulp=err,
                        grad_ulp=gerr,
                    )
                )
                _print(out[-1])


def call_overhead(dtype, timed):
    """Host microseconds per call at ``OVERHEAD_SHAPE`` (None: unmeasured)."""
    n, c = OVERHEAD_SHAPE
    xs, y, is_torch = make_inputs(n, c, dtype, 2)
    from ..kernels import cuda as ck

    grad = xs[0].clone() if is_torch else ck.device_array((n, c), dtypes.dtype_from_name(dtype))
    calls = [(label, fn) for label, _, fn, _ in cestudy_calls(xs, y, grad)[:2]]
    if is_torch:
        calls += [(label, fn) for label, _, fn in torch_calls(xs, y)]
    rows = []
    for label, fn in calls:
        us = host_cost(fn) if timed else None
        rows.append({"kernel": label, "n": n, "c": c, "dtype": dtype, "host_us_per_call": us})
        print(
            f"host cost per call, {label} {n}x{c} {dtype}: "
            f"{'unmeasured' if us is None else f'{us:.1f} us'}"
        )
    return rows


def main(args):
    from numba import cuda

    from .. import backends

    ok, desc = backends.cuda_status()
    if not ok:
        print(f"no GPU: {desc}")
        return 2
    sim = backends.simulator_enabled()
    timed = not (getattr(args, "validate_only", False) or sim)
    if sim:
        print("CUDA simulator: running the checks only; simulator timings are never recorded")
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    print(f"device: {desc}")
    m = info.manifest()
    result = {
        "device": name,
        "device_description": desc,
        "machine": m,
        "source_commit": m.get("git_commit"),
        "rows": [],
        "timed": timed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    bw = {}
    if timed:
        numba_read, torch_read = read_bandwidth()
        bw = {"read": max(numba_read, torch_read or 0.0), "copy": copy_bandwidth()}
        print(
            f"read bandwidth: {bw['read']:.0f} GB/s (numba kernel {numba_read:.0f}, torch sum "
            f"{'-' if torch_read is None else f'{torch_read:.0f}'}); device-to-device copy "
            f"bandwidth: {bw['copy']:.0f} GB/s (read + write)"
        )
        result.update(read_bandwidth_numba_gbs=numba_read, read_bandwidth_torch_gbs=torch_read)
    result["read_bandwidth_gbs"] = bw.get("read")
    result["copy_bandwidth_gbs"] = bw.get("copy")
    shapes = SHAPES if timed else VALIDATE_SHAPES
    if getattr(args, "shapes", None):
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    thread_counts = THREADS if timed else VALIDATE_THREADS
    repeats = getattr(args, "repeats", 7) * 3
    print(
        f"{'kernel':30s} {'shape':>14s} {'dtype':9s} {'threads':>7s} {'ms':>9s} {'GB/s':>7s} "
        f"{'of read':>7s} {'of copy':>7s} {'vs torch':>8s} {'ulp':>6s}"
    )
    for n, c in shapes:
        for dtype in DTYPES:
            measure_shape(n, c, dtype, bw, repeats, thread_counts, timed, result["rows"])
    result["call_overhead"] = [r for dtype in DTYPES for r in call_overhead(dtype, timed)]
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)
    return 0


def _fmt(v, spec, scale=1.0, unit=""):
    return "" if v is None else format(v * scale, spec) + unit


def _print(r):
    vs = "" if r.get("vs_torch") is None else f"{r['vs_torch']:.2f}x"
    print(
        f"{r['kernel']:30s} {r['n']:>6d}x{r['c']:<7d} {r['dtype']:9s} "
        f"{'' if r['threads'] is None else r['threads']:>7} {_fmt(r['ms'], '9.3f'):>9s} "
        f"{_fmt(r['gb_per_s'], '7.0f'):>7s} {_fmt(r['frac_read_bw'], '6.1f', 100, '%'):>7s} "
        f"{_fmt(r['frac_copy_bw'], '6.1f', 100, '%'):>7s} {vs:>8s} "
        f"{_fmt(r.get('ulp'), '6.2g'):>6s}",
        flush=True,
    )
