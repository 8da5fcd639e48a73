"""``python -m cestudy bench --backend cuda``: the GPU benchmark, for a machine with an NVIDIA GPU.

One run: the device's copy bandwidth (a large device-to-device copy, bytes read + written); each
CUDA kernel checked against the oracle first (per-sample losses of the first rows, gradients of
the first few rows), then timed with CUDA events after warm-up (median of many repeats, inputs
rotated over several buffers so that they do not sit in L2); torch's ``F.cross_entropy`` forward
and forward+backward on the same GPU in the same run when torch is there. Prints one table and
writes it as JSON. It refuses to time anything in the CUDA simulator (``--validate-only`` runs
the checks alone, which is what CI-like machines can do).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

from ..reference import oracle
from ..study import manifest as info

CE = "cross_entropy_index"  # the raw kernel of variant cross_entropy
SHAPES_F32 = [(8192, 131072), (8192, 32768), (4096, 4096), (16384, 1024), (65536, 128)]
SHAPES_F64 = [(4096, 32768)]
L2_FLUSH_BYTES = 3 * 60 * 2 ** 20  # rotate over >= 3x the largest L2 (60 MB on an H200)


def _events():
    from numba import cuda

    return cuda.event(timing=True), cuda.event(timing=True)


def copy_bandwidth(nbytes=4 << 30, repeats=5):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    from numba import cuda

    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    dst.copy_to_device(src)
    best = math.inf
    for _ in range(repeats):
        a, b = _events()
        a.record()
        dst.copy_to_device(src)
        b.record()
        b.synchronize()
        best = min(best, cuda.event_elapsed_time(a, b) / 1e3)
    del src, dst
    return 2 * nbytes / best / 1e9


def _make_inputs(n, c, dtype, count, seed=0):
    """``count`` logits buffers on the device and the targets, generated on the device when torch
    is there (host generation of 4 GiB would dominate the run)."""
    from numba import cuda

    from .. import backends

    try:
        import torch

        if backends.simulator_enabled() or not torch.cuda.is_available():
            raise ImportError("torch has no CUDA device here")
        g = torch.Generator(device="cuda").manual_seed(seed)
        tdt = torch.float32 if dtype == np.float32 else torch.float64
        xs = [torch.randn((n, c), generator=g, device="cuda", dtype=tdt) * 3 for _ in range(count)]
        y = torch.randint(0, c, (n,), generator=g, device="cuda", dtype=torch.int64)
        return xs, y, "torch"
    except ImportError:
        rng = np.random.default_rng(seed)
        xs = [cuda.to_device((rng.standard_normal((n, c), dtype=np.float32) * 3).astype(dtype))
              for _ in range(count)]
        return xs, cuda.to_device(rng.integers(0, c, n)), "numba"


def _time(fn, repeats, warmup=3):
    from numba import cuda

    for i in range(warmup):
        fn(i)
    cuda.synchronize()
    times = []
    for i in range(repeats):
        a, b = _events()
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(cuda.event_elapsed_time(a, b) / 1e3)
    return float(np.median(times)), times


def _check(x_dev, y_dev, kernels, nt, dtype, rows=16, grad_rows=4):
    """Run our forward and fused kernels once and compare the first rows with the oracle."""
    from numba import cuda

    from ..kernels import cuda as ck

    x = ck.as_device(x_dev)
    y = ck.as_device(y_dev)
    n, c = x.shape
    w = cuda.to_device(np.ones(c))
    loss = cuda.device_array(n, np.float64)
    grad = cuda.device_array((n, c), x.dtype)
    tpr = ck.threads_per_row(c, nt)
    grid = (n + nt // tpr - 1) // (nt // tpr)
    kernels[CE][grid, nt](x, y, w, -100, 0.0, float(c), 1.0, True, tpr, loss, grad)
    cuda.synchronize()
    hx = x[:rows].copy_to_host()
    hy = y[:rows].copy_to_host()
    err = float(np.max(oracle.ulp_error(loss[:rows].copy_to_host().astype(dtype),
                                        oracle.cross_entropy(hx, hy), dtype)))
    gerr = float(np.max(oracle.grad_ulp_error(grad[:grad_rows].copy_to_host(),
                                              oracle.cross_entropy_grad(hx[:grad_rows],
                                                                        hy[:grad_rows]),
                                              dtype)))
    return err, gerr


def main(args):
    from numba import cuda

    from .. import backends
    from ..kernels import cuda as ck

    ok, desc = backends.cuda_status()
    if not ok:
        print(f"no GPU: {desc}")
        return 2
    sim = backends.simulator_enabled()
    validate_only = getattr(args, "validate_only", False) or sim
    if sim:
        print("CUDA simulator: running the checks only; simulator timings are never recorded")
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    print(f"device: {desc}")
    result = {"device": name, "device_description": desc, "machine": info.manifest(),
              "rows": [], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    bw = None if validate_only else copy_bandwidth()
    if bw:
        print(f"device-to-device copy bandwidth: {bw:.0f} GB/s (read + write)")
    result["copy_bandwidth_gbs"] = bw
    shapes = [(s, np.float32) for s in SHAPES_F32] + [(s, np.float64) for s in SHAPES_F64]
    if validate_only:
        shapes = [((16, 300), np.float32), ((8, 500), np.float64)]
    repeats = getattr(args, "repeats", 7) * 3
    print(f"{'kernel':28s} {'shape':>14s} {'dtype':8s} {'threads':>7s} {'ms':>9s} {'GB/s':>8s} "
          f"{'of copy bw':>10s} {'vs torch':>9s} {'ulp':>6s}")
    for (n, c), dtype in shapes:
        item = np.dtype(dtype).itemsize
        size = n * c * item
        count = 1 if validate_only else max(2, min(8, math.ceil(L2_FLUSH_BYTES / size)))
        xs, y, src = _make_inputs(n, c, dtype, count)
        dx = [ck.as_device(t) for t in xs]
        dy = ck.as_device(y)
        w = cuda.to_device(np.ones(c))
        loss = cuda.device_array(n, np.float64)
        total = cuda.device_array(1, np.float64)
        grad = cuda.device_array((n, c), dtype)
        torch_t = {}
        if src == "torch" and not validate_only:
            import torch
            import torch.nn.functional as F

            def t_fwd(i):
                F.cross_entropy(xs[i % count], y)

            def t_fwd_bwd(i):
                xi = xs[i % count].detach().requires_grad_(True)
                F.cross_entropy(xi, y).backward()

            for label, fn, nbytes in (("torch forward", t_fwd, size),
                                      ("torch forward+backward", t_fwd_bwd, 2 * size)):
                med, _ = _time(fn, repeats)
                torch_t[label.split(" ", 1)[1]] = med
                row = {"kernel": label, "n": n, "c": c, "dtype": np.dtype(dtype).name,
                       "threads": None, "ms": 1e3 * med, "gb_per_s": nbytes / med / 1e9,
                       "frac_copy_bw": nbytes / med / 1e9 / bw, "vs_torch": 1.0}
                result["rows"].append(row)
                _print(row)
            del torch
        for nt in ((8, 32) if sim else (256, 512, 1024)):
            k = ck.kernels(nt, dtype == np.float32)
            tpr = ck.threads_per_row(c, nt)
            grid = (n + nt // tpr - 1) // (nt // tpr)
            try:
                err, gerr = _check(dx[0], dy, k, nt, dtype)
            except Exception as exc:  # e.g. too many registers for this block size
                print(f"threads={nt}: {type(exc).__name__}: {exc}")
                result["rows"].append({"kernel": "launch failure", "n": n, "c": c,
                                       "threads": nt, "error": str(exc)})
                continue
            if validate_only:
                print(f"check {n}x{c} {np.dtype(dtype).name} threads={nt}: forward "
                      f"{err:.3g} ulp, gradient {gerr:.3g} ulp")
                result["rows"].append({"kernel": "check", "n": n, "c": c, "threads": nt,
                                       "dtype": np.dtype(dtype).name, "ulp": err,
                                       "grad_ulp": gerr})
                continue
            cases = (
                ("cestudy forward", size, lambda i: (
                    k[CE][grid, nt](dx[i % count], dy, w, -100, 0.0, float(c), 1.0 / n,
                                            False, tpr, loss, grad[:1, :1]),
                    k["reduce_sum"][1, nt](loss, total)), "forward"),
                ("cestudy forward+grad", 2 * size, lambda i: (
                    k[CE][grid, nt](dx[i % count], dy, w, -100, 0.0, float(c), 1.0 / n,
                                            True, tpr, loss, grad),
                    k["reduce_sum"][1, nt](loss, total)), "forward+backward"),
                ("cestudy forward+grad inplace", 2 * size, lambda i: (
                    k[CE][grid, nt](dx[i % count], dy, w, -100, 0.0, float(c), 1.0 / n,
                                            True, tpr, loss, dx[i % count]),
                    k["reduce_sum"][1, nt](loss, total)), "forward+backward"),
            )
            for label, nbytes, fn, peer in cases:
                med, _ = _time(fn, repeats)
                ref = torch_t.get(peer)
                row = {"kernel": label, "n": n, "c": c, "dtype": np.dtype(dtype).name,
                       "threads": nt, "ms": 1e3 * med, "gb_per_s": nbytes / med / 1e9,
                       "frac_copy_bw": nbytes / med / 1e9 / bw,
                       "vs_torch": None if ref is None else ref / med,
                       "ulp": err, "grad_ulp": gerr}
                result["rows"].append(row)
                _print(row)
        xs = dx = grad = None  # free this shape's buffers before the next
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)
    return 0


def _print(r):
    vs = "" if r.get("vs_torch") is None else f"{r['vs_torch']:.2f}x"
    ulp = "" if r.get("ulp") is None else f"{r['ulp']:.2g}"
    print(f"{r['kernel']:28s} {r['n']:>6d}x{r['c']:<7d} {r['dtype']:8s} "
          f"{'' if r['threads'] is None else r['threads']:>7} {r['ms']:9.3f} "
          f"{r['gb_per_s']:8.0f} {100 * r['frac_copy_bw']:9.1f}% {vs:>9s} {ulp:>6s}", flush=True)
