"""``python -m cestudy bench``: the interleaved CPU benchmark (and ``--backend cuda`` on a GPU).

Prints one table (kernel, shape, dtype, ms, GB/s, fraction of bandwidth, ratio vs torch) and
stores every row in the results store as study ``bench`` (kind ``performance``), with the run's
manifest, so the performance report shows it. Also measured: cold start (import to first result
with an empty and with a warm compile cache), scaling with N, C and threads, and the worst case
(every row confident).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .. import variants as registry
from ..reference import peers
from ..study import manifest as info
from . import ceiling
from . import cpu as bench

FULL_SHAPES = "256x10,256x1000,2048x1000,2048x32768,4096x131072"
QUICK_SHAPES = "256x10,256x1000,512x8192"
# numpy/scipy formulations allocate several full-size temporaries: keep them to <= 2^26 elements
NUMPY_LIMIT = 1 << 26
# float64 beyond 2^28 elements (2 GiB of logits, as much again for the gradient, more inside
# torch's autograd) does not fit a 24 GiB machine with torch beside it
FLOAT64_LIMIT = 1 << 28
# calls on at most this many elements take milliseconds or less: each of their cells takes at
# least SMALL_CALL_SAMPLES samples (a median of 4 single calls of 20 us moved by 30% from one
# run to the next); larger calls take --repeats
SMALL_CALL_ELEMENTS = 1 << 21
SMALL_CALL_SAMPLES = 31


def samples_for(n: int, c: int, repeats: int) -> int:
    """How many timed calls a cell of n x c takes: ``repeats``, and at least
    :data:`SMALL_CALL_SAMPLES` for small calls."""
    return max(repeats, SMALL_CALL_SAMPLES) if n * c <= SMALL_CALL_ELEMENTS else repeats


def add_arguments(parser, default_results: str = "") -> None:
    """The ``bench`` subcommand's arguments (``cestudy.cli`` builds the parser)."""
    b = parser
    b.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    b.add_argument("--shapes", help="comma-separated NxC list, e.g. 256x10,2048x32768")
    b.add_argument(
        "--variants",
        default=",".join(bench.VARIANTS),
        help="registry names (cestudy.variants); old names are migrated",
    )
    b.add_argument("--dtypes", default="float32,float64")
    b.add_argument("--modes", default="forward,forward_grad")
    b.add_argument(
        "--repeats",
        type=int,
        default=7,
        help=f"timed calls per cell (at least {SMALL_CALL_SAMPLES} for calls on at most "
        f"{SMALL_CALL_ELEMENTS} elements)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for cestudy (numba) and torch alike; 0 leaves both as they are "
        "(1 gives ratios that survive a loaded machine)",
    )
    b.add_argument("--json", help="also write the table as JSON here")
    b.add_argument(
        "--validate-only",
        action="store_true",
        help="--backend cuda: run the correctness checks, time nothing",
    )
    b.add_argument(
        "--results",
        default=default_results,
        help="store the bench cells here (study 'bench'); '' to skip",
    )


def _shapes(text):
    out = []
    for item in text.split(","):
        n, c = item.lower().split("x")
        out.append((int(n), int(c)))
    return out


def _impls(variant, n, c):
    """(cestudy's calls, torch and the numpy formulations, interleaved in one group; the other
    frameworks, each timed in a group of its own beside torch). Above :data:`NUMPY_LIMIT`
    elements only cestudy and torch: the numpy formulations and the other frameworks hold
    several full-size temporaries (scikit-learn's log_loss two float64 copies), more than a
    24 GiB machine has beside the gradient at 4096 x 131072."""
    core = ["numba", *bench.GRAD_BUFFERS, "torch"]
    if n * c > NUMPY_LIMIT:
        return core, []
    core += ["lse", "accurate"] + (["scipy"] if variant == bench.CE else [])
    others = [p for p, timed in peers.TIMED.items() if variant in timed and peers.available(p)[0]]
    return core, others


def time_shape(variant, dtype, mode, n, c, repeats):
    """{implementation: metrics} for one variant, dtype, mode and shape. The other frameworks
    are timed apart, each in a group of its own right after cestudy's group, their ratio taken
    against that group's torch: their thread pools keep spinning after a call and slowed
    whatever ran next (torch by up to 5x at 256 x 1000) when they shared a group."""
    core, others = _impls(variant, n, c)
    res = bench.time_group(variant, dtype, mode, n, c, core, repeats=repeats)
    for peer in others:
        r = bench.time_group(variant, dtype, mode, n, c, [peer], repeats=repeats)[peer]
        torch_s = res.get("torch", {}).get("median_s")  # torch may be missing or skipped
        if "median_s" in r and torch_s:
            r["speedup_vs_torch"] = torch_s / r["median_s"]
        res[peer] = r
    return res


def _row(res, variant, impl, mode, n, c, dtype):
    r = res
    ratio = r.get("speedup_vs_torch")
    return (
        f"{variant:32s} {impl:13s} {mode:12s} {n:>5d}x{c:<7d} {dtype:8s} "
        f"{1e3 * r['median_s']:9.3f} {r['gb_per_s']:7.2f} {100 * r['frac_bandwidth']:6.1f}% "
        f"{'' if ratio is None else f'{ratio:7.2f}x':>8s} "
        f"{r.get('check_ulp', float('nan')):8.3g}"
    )


HEADER = (
    f"{'variant':32s} {'kernel':13s} {'mode':12s} {'shape':13s} {'dtype':8s} "
    f"{'ms':>9s} {'GB/s':>7s} {'of ceil':>7s} {'vs torch':>8s} {'ulp':>8s}"
)


def cold_start(repeats=1):
    """Seconds from a fresh ``python -c 'import cestudy; ...first result'`` to the result, with
    an empty Numba cache and then with the cache it left (two subprocesses each)."""
    code = (
        "import time; t=time.perf_counter(); import numpy as np, cestudy; "
        "x=np.ones((4,10),np.float32); y=np.zeros(4,np.int64); "
        "cestudy.cross_entropy(x,y); cestudy.cross_entropy_with_grad(x,y); "
        "print(time.perf_counter()-t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        times = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            times.append(float(out.stdout.strip().splitlines()[-1]))
    return {"cold_s": times[0], "warm_cache_s": times[1]}


def main(args):
    if args.backend == "cuda":
        from . import cuda as bench_cuda

        return bench_cuda.main(args)
    if args.threads:
        set_threads(args.threads)
    shapes = _shapes(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES))
    variants = [registry.get(v).name for v in args.variants.split(",")]
    dtypes = args.dtypes.split(",")
    modes = args.modes.split(",")
    bw = {}
    for dtype in dtypes:
        got = {mode: ceiling.measured(mode, dtype) for mode in ("forward", "forward_grad")}
        bw[dtype] = {m["kind"]: m["gbs"] for m in got.values()}
        print(
            f"ceiling, {dtype}: "
            + ", ".join(f"{ceiling.LABELS[m['kind']]} {m['gbs']:.2f} GB/s" for m in got.values())
            + f" (medians of {got['forward']['passes']} vectorised parallel passes over "
            f"{ceiling.fmt_bytes(got['forward']['buffer_bytes'])}; forward is judged against "
            f"{ceiling.label('forward')}, fused against {ceiling.label('forward_grad')}; "
            f"measured again when over {ceiling.MAX_AGE_S:g} s old)"
        )
    store = run_id = None
    if args.results:
        from ..study.runner import code_version
        from ..study.store import Store, cell_key

        store = Store(args.results)
        manifest = info.manifest()
        manifest["study_description"] = (
            "python -m cestudy bench: interleaved timings of cestudy's CPU kernels against torch, "
            "the numpy formulations and scipy, with cold start, scaling and the worst case."
        )
        manifest["bandwidth_gbs"] = bw[dtypes[0]]["read"]
        manifest["ceiling_gbs"] = bw
        manifest["ceiling_samples_gbs"] = ceiling.samples()
        manifest["ceiling_measure"] = ceiling.description()
        run_id = store.start_run("bench", manifest)
        version = code_version()
    table = []
    print(HEADER)

    def put(params, metrics):
        if store is not None:
            store.put(
                cell_key("bench", params, version),
                "bench",
                params,
                version,
                "ok",
                None,
                metrics,
                run_id,
            )

    for variant in variants:
        for dtype in dtypes:
            for mode in modes:
                for n, c in shapes:
                    if dtype == "float64" and n * c > FLOAT64_LIMIT:
                        continue
                    if variant != bench.CE and n * c > NUMPY_LIMIT:
                        continue  # the largest shape is for the headline kernel only
                    res = time_shape(variant, dtype, mode, n, c, samples_for(n, c, args.repeats))
                    for impl, r in res.items():
                        if "skipped" in r:
                            continue
                        print(_row(r, variant, impl, mode, n, c, dtype), flush=True)
                        params = {
                            "kind": "performance",
                            "variant": variant,
                            "implementation": impl,
                            "dtype": dtype,
                            "mode": mode,
                            "batch": n,
                            "classes": c,
                            "repeats": args.repeats,
                            "seed": 0,
                        }
                        if args.threads:  # a run on fixed threads is a cell of its own
                            params["threads"] = args.threads
                        put(params, r)
                        table.append({**params, **{k: v for k, v in r.items() if k != "samples_s"}})
    print_ratios(table)
    extras = {}
    if not args.quick and bench.CE in variants and "float32" in dtypes:
        extras = extra_measurements(args.repeats, put)
    print("ceilings measured during the run (GB/s, medians of passes, in order):")
    for name, medians in ceiling.spread().items():
        print(f"  {name}: " + ", ".join(f"{v:.2f}" for v in medians))
    if store is not None:
        # the passes of every ceiling the rows were judged against, not only the first ones
        # (ceiling_gbs stays the first measurement of each, as the run started)
        store.finish_run(
            run_id,
            {"ceiling_samples_gbs": ceiling.samples(), "ceiling_medians_gbs": ceiling.spread()},
        )
        store.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bandwidth_gbs": bw[dtypes[0]]["read"],
                    "ceiling_gbs": bw,
                    "ceiling_samples_gbs": ceiling.samples(),
                    "ceiling_medians_gbs": ceiling.spread(),
                    "ceiling_measure": ceiling.description(),
                    "rows": table,
                    "extras": extras,
                    "machine": info.manifest(),
                },
                f,
                indent=1,
                sort_keys=True,
            )
    return 0


def set_threads(n):
    """numba and torch on ``n`` threads each (numba at most NUMBA_NUM_THREADS)."""
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    print(f"threads: numba {numba.get_num_threads()}, torch {n}")


def print_ratios(table):
    """cestudy's speed relative to torch (torch's median time / cestudy's; > 1 is faster), one
    line per variant, mode and gradient buffer, one column per dtype and shape."""
    cells = {}
    for r in table:
        ratio = r.get("speedup_vs_torch")
        if ratio is None or not r["implementation"].startswith("numba"):
            continue
        cells[
            (r["variant"], r["mode"], r["implementation"]), (r["dtype"], r["batch"], r["classes"])
        ] = ratio
    cols = sorted({c for _, c in cells}, key=lambda c: (c[0], c[1] * c[2], c[1]))
    rows = sorted({r for r, _ in cells})
    if not cols:
        return
    print("\ncestudy / torch speed ratio (torch median time / cestudy median time):")
    print(f"{'':56s}" + "".join(f"{d[:7]:>9s}" for d, _, _ in cols))
    print(f"{'':56s}" + "".join(f"{f'{n}x{c}':>9s}" for _, n, c in cols))
    for row in rows:
        name = f"{row[0]} {row[1]} {row[2]}"
        print(
            f"{name:56s}"
            + "".join(
                f"{cells[row, col]:8.2f}x" if (row, col) in cells else f"{'':9s}" for col in cols
            )
        )


def extra_measurements(repeats, put):
    """Cold start, 1 vs 2 threads and the all-confident worst case at 2048 x 32768 float32."""
    import numba

    out = {}
    cs = cold_start()
    print(
        f"cold start (import + first forward and fused call): {cs['cold_s']:.2f} s with an "
        f"empty compile cache, {cs['warm_cache_s']:.2f} s with a warm one"
    )
    put({"kind": "coldstart", "variant": bench.CE, "dtype": "float32"}, cs)
    out["cold_start"] = cs
    n, c = 2048, 32768
    threads = numba.get_num_threads()
    for t in sorted({1, threads}):
        numba.set_num_threads(t)
        try:
            import torch

            torch_threads = torch.get_num_threads()
            torch.set_num_threads(t)
        except ImportError:
            torch = None
        for mode in ("forward", "forward_grad"):
            res = bench.time_group(
                bench.CE, "float32", mode, n, c, ["numba", "torch"], repeats=repeats
            )
            for impl, r in res.items():
                if "skipped" in r:
                    continue
                print(f"threads={t}: " + _row(r, bench.CE, impl, mode, n, c, "float32"))
                put(
                    {
                        "kind": "scaling",
                        "variant": bench.CE,
                        "implementation": impl,
                        "dtype": "float32",
                        "mode": mode,
                        "batch": n,
                        "classes": c,
                        "threads": t,
                    },
                    r,
                )
                out[f"threads{t}_{impl}_{mode}"] = r["median_s"]
        if torch is not None:
            torch.set_num_threads(torch_threads)
    numba.set_num_threads(threads)
    # worst case: every row confident-correct (the true logit 50 above the rest)
    x, y = bench.make_inputs(bench.CE, "float32", n, c)
    x[np.arange(n), y] += 50
    import cestudy as cs_

    for mode, fn in (
        ("forward", lambda: cs_.cross_entropy(x, y)),
        ("forward_grad", lambda: cs_.cross_entropy_with_grad(x, y)),
    ):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        med = float(np.median(ts))
        print(f"all rows confident, numba {mode}: {1e3 * med:.2f} ms")
        put(
            {
                "kind": "worstcase",
                "variant": bench.CE,
                "implementation": "numba",
                "dtype": "float32",
                "mode": mode,
                "batch": n,
                "classes": c,
            },
            {"median_s": med, "samples_s": ts},
        )
        out[f"confident_{mode}_s"] = med
    return out
