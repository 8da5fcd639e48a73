"""The GPU benchmark page, from ``reports/data/cuda_bench.json`` (written by
``python -m cestudy bench --backend cuda``).

Every shape, ratio and verdict is read from the benchmark's rows.
"""

from __future__ import annotations

from .. import figures
from ..markdown import Context, Part, fmt_pct, fmt_shape, fmt_ulp, table, with_findings

PAGE = "cuda"
TARGET = 0.8
"""The share of the copy bandwidth the kernels aim at."""
KERNELS = ("cestudy forward", "cestudy forward+grad")
PEERS = {"cestudy forward": "forward", "cestudy forward+grad": "forward+backward"}


def timed(doc):
    return [r for r in doc.get("rows", []) if "ms" in r]


def best(doc, dtype="float32"):
    """{(kernel, n, c): the fastest row over block sizes} for cestudy's kernels."""
    out = {}
    for r in timed(doc):
        if r["kernel"].startswith("cestudy") and r["dtype"] == dtype:
            key = (r["kernel"], r["n"], r["c"])
            if key not in out or r["ms"] < out[key]["ms"]:
                out[key] = r
    return out


def largest(doc):
    """cestudy's forward and forward+grad rows at the largest float32 shape, or []."""
    b = best(doc)
    big = max((n * c for (_, n, c) in b), default=0)
    return [
        b[k]
        for k in sorted(b)
        if k[1] * k[2] == big and k[0] in KERNELS and b[k].get("vs_torch") is not None
    ]


def speed_clause(doc):
    """ "on an H200 at 8192 x 131072 float32 it is 1.77x torch's forward and ..." or None."""
    rows = largest(doc)
    if not rows:
        return None
    r0 = rows[0]
    ratios = " and ".join(f"{r['vs_torch']:.2f}x torch's {PEERS[r['kernel']]}" for r in rows)
    shares = " and ".join(fmt_pct(r["frac_copy_bw"]) for r in rows)
    return (
        f"on an {doc.get('device', 'unknown GPU')} at {fmt_shape(r0['n'], r0['c'])} "
        f"{r0['dtype']} it is {ratios}, at {shares} of the copy bandwidth"
    )


def render(ctx: Context, doc) -> Part:
    m = doc.get("machine", {})
    bw = doc.get("copy_bandwidth_gbs")
    commit = doc.get("source_commit", m.get("git_commit", "unknown"))
    parts = [
        "# CUDA kernels on a GPU\n",
        f"Measured by `python -m cestudy bench --backend cuda` on an **{doc.get('device')}** "
        f"({doc.get('device_description')}) on {doc.get('date')}, from commit "
        f"`{commit}`; numba {m.get('numba')}, numba-cuda {m.get('numba_cuda')}, torch "
        f"{m.get('torch')}. Raw log: [data/cuda_bench.log](data/cuda_bench.log); the kernel "
        "tests (`tests/cudasim`, the simulator suite) run on the GPU: "
        "[data/cuda_gpu_tests.log](data/cuda_gpu_tests.log).\n",
        "## Code version\n",
        f"These timings come from commit `{commit}`; the GPU benchmark records a commit, "
        "not the studies' code version, so this page cannot tell whether the kernels "
        "changed since: rerun the command above on a GPU to refresh it.\n",
        "## Timings\n",
        "Timings are CUDA-event medians after warm-up, inputs rotated over several buffers "
        "(at least three times the L2) so that they do not sit in L2. GB/s counts the logits "
        "read plus, for the fused kernels, the gradient written (the kernels themselves read "
        "the row a second time for the gradient). Every kernel was first checked against the "
        "oracle (per-sample losses of the first rows, gradients of the first four rows; "
        "`ulp` column). CUDA simulator timings are never recorded.\n",
        f"Device-to-device copy bandwidth (bytes read + written): **{bw:.0f} GB/s**.\n"
        if bw
        else "",
    ]
    rows = []
    for r in timed(doc):
        vs = r.get("vs_torch")
        rows.append(
            (
                r["kernel"],
                fmt_shape(r["n"], r["c"]),
                r["dtype"],
                "" if r.get("threads") is None else r["threads"],
                f"{r['ms']:.3f}",
                f"{r['gb_per_s']:.0f}",
                fmt_pct(r["frac_copy_bw"]),
                "" if vs is None else f"{vs:.2f}x",
                "" if r.get("ulp") is None else fmt_ulp(r["ulp"]),
            )
        )
    parts.append(
        table(
            [
                "kernel",
                "shape",
                "dtype",
                "threads/block",
                "ms",
                "GB/s",
                "of copy bandwidth",
                "vs torch",
                "ulp (fwd)",
            ],
            rows,
        )
    )
    rel = ctx.add_figure(
        parts,
        "throughput",
        figures.fig_cuda,
        doc,
        alt="GPU throughput",
        caption="float32 throughput per shape (cestudy at its best block size), with the "
        f"measured copy bandwidth and {TARGET:.0%} of it as dotted lines.",
    )
    findings = []
    for r in largest(doc):
        met = "met" if r["frac_copy_bw"] >= TARGET else "not met"
        findings.append(
            ctx.finding(
                f"{r['kernel']}, {fmt_shape(r['n'], r['c'])} {r['dtype']}: {r['ms']:.2f} ms, "
                f"{fmt_pct(r['frac_copy_bw'])} of the copy bandwidth (target {TARGET:.0%}: {met}), "
                f"{r['vs_torch']:.2f}x the speed of torch's eager {PEERS[r['kernel']]} "
                f"({r['threads']} threads per block).",
                rel,
            )
        )
    b = best(doc)
    slow = sorted(
        {
            (n, c)
            for (kernel, n, c), r in b.items()
            if kernel == KERNELS[0] and r.get("vs_torch") is not None and r["vs_torch"] < 1
        },
        key=lambda s: s[1],
    )
    if slow:
        findings.append(
            ctx.finding(
                "cestudy's forward is slower than torch's eager forward at "
                + ", ".join(
                    f"{fmt_shape(n, c)} ({b[(KERNELS[0], n, c)]['vs_torch']:.2f}x)" for n, c in slow
                )
                + "; what bounds it there was not measured.",
                rel,
            )
        )
    return with_findings(parts, findings, level=2)
