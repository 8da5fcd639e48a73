"""The GPU benchmark page, from ``reports/data/cuda_bench.json`` (written by
``python -m cestudy bench --backend cuda``).

Every shape, ratio and verdict is read from the benchmark's rows. A benchmark that also measured
the read bandwidth (``read_bandwidth_gbs``, ``frac_read_bw`` per row) has its forward kernels
judged against that ceiling (they only read the logits) and its fused kernels against the copy
bandwidth (they read the logits and write the gradient); an older one, with the copy bandwidth
alone, has every kernel judged against the copy bandwidth. bfloat16 rows get findings of their
own, and the host cost per call (``call_overhead``) a table, where the benchmark recorded them.
"""

from __future__ import annotations

from .. import figures
from ..markdown import Context, Part, fmt_pct, fmt_shape, fmt_ulp, table, with_findings

PAGE = "cuda"
TARGET = 0.8
"""The share of their ceiling (read or copy bandwidth, see ``ceiling``) the kernels aim at."""
KERNELS = ("cestudy forward", "cestudy forward+grad")
PEERS = {"cestudy forward": "forward", "cestudy forward+grad": "forward+backward"}


FINDING_DTYPES = ("float32", "bfloat16")
"""The dtypes whose largest shape gets a finding, in this order."""


def timed(doc):
    """The rows with a timing (a check-only run, in the simulator, records ``ms`` None)."""
    return [r for r in doc.get("rows", []) if r.get("ms") is not None]


def is_forward(r) -> bool:
    """A forward-only kernel: it reads the logits and writes nothing of their size."""
    return r["kernel"].endswith(" forward")


def ceiling(r):
    """("read" or "copy", the row's fraction of that bandwidth): a forward row against the read
    bandwidth where the benchmark measured it, any other against the copy bandwidth."""
    if is_forward(r) and r.get("frac_read_bw") is not None:
        return "read", r["frac_read_bw"]
    return "copy", r.get("frac_copy_bw")


def best(doc, dtype="float32"):
    """{(kernel, n, c): the fastest row over block sizes} for cestudy's kernels."""
    out = {}
    for r in timed(doc):
        if r["kernel"].startswith("cestudy") and r["dtype"] == dtype:
            key = (r["kernel"], r["n"], r["c"])
            if key not in out or r["ms"] < out[key]["ms"]:
                out[key] = r
    return out


def largest(doc, dtype="float32"):
    """cestudy's forward and forward+grad rows at the largest shape of ``dtype``, or []."""
    b = best(doc, dtype)
    big = max((n * c for (_, n, c) in b), default=0)
    return [
        b[k]
        for k in sorted(b)
        if k[1] * k[2] == big and k[0] in KERNELS and b[k].get("vs_torch") is not None
    ]


def forward_against_torch(doc, dtype="float32"):
    """``(slower, timed)``: the shapes where cestudy's forward (its fastest block size) is slower
    than torch's, as ``(n, c, ratio)`` by class count, and how many shapes were timed against
    torch."""
    fwd = [
        (n, c, r["vs_torch"])
        for (kernel, n, c), r in best(doc, dtype).items()
        if kernel == KERNELS[0] and r.get("vs_torch") is not None
    ]
    return sorted((s for s in fwd if s[2] < 1), key=lambda s: s[1]), len(fwd)


def speed_clause(doc):
    """ "on an H200 at 8192 x 131072 float32 it is 1.77x torch's forward and ..." (and the
    shapes where its forward is slower than torch's), or None."""
    rows = largest(doc)
    if not rows:
        return None
    r0 = rows[0]
    ratios = " and ".join(f"{r['vs_torch']:.2f}x torch's {PEERS[r['kernel']]}" for r in rows)
    shares = [ceiling(r) for r in rows]
    if len({which for which, _ in shares}) == 1:
        at = " and ".join(fmt_pct(v) for _, v in shares) + f" of the {shares[0][0]} bandwidth"
    else:
        at = " and ".join(f"{fmt_pct(v)} of the {which} bandwidth" for which, v in shares)
    slow, timed_shapes = forward_against_torch(doc)
    caveat = ""
    if slow:
        qs = [q for _, _, q in slow]
        caveat = (
            f"; its forward is slower than torch's at {len(slow)} of the {timed_shapes} "
            f"float32 shapes timed ({min(qs):.2f}x to {max(qs):.2f}x)"
        )
    return (
        f"on an {doc.get('device', 'unknown GPU')} at {fmt_shape(r0['n'], r0['c'])} "
        f"{r0['dtype']} it is {ratios} (its fastest block size), at {at}{caveat}"
    )


def host_cost_table(doc) -> str:
    """The host's microseconds per call (``call_overhead``), or "" where none was measured."""
    rows = [r for r in doc.get("call_overhead", []) if r.get("host_us_per_call") is not None]
    if not rows:
        return ""
    return (
        "## Host cost per call\n\n"
        "Microseconds of host time per call, calls issued back to back without "
        "synchronisation at a small shape, where the GPU work is shorter than the launch.\n\n"
        + table(
            ["kernel", "shape", "dtype", "host us per call"],
            [
                (r["kernel"], fmt_shape(r["n"], r["c"]), r["dtype"], f"{r['host_us_per_call']:.1f}")
                for r in rows
            ],
        )
    )


def render(ctx: Context, doc) -> Part:
    m = doc.get("machine", {})
    bw = doc.get("copy_bandwidth_gbs")
    read_bw = doc.get("read_bandwidth_gbs")
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
    if read_bw:
        parts.append(
            "Read bandwidth (bytes read, the larger of a numba kernel's and torch's sum of a "
            f"float32 buffer): **{read_bw:.0f} GB/s**; the forward kernels, which only read the "
            "logits, are judged against it, the fused ones against the copy bandwidth.\n"
        )
    with_read = any(r.get("frac_read_bw") is not None for r in timed(doc))
    rows = []
    for r in timed(doc):
        vs = r.get("vs_torch")
        read = []
        if with_read:
            read = [fmt_pct(r["frac_read_bw"]) if is_forward(r) and "frac_read_bw" in r else ""]
        rows.append(
            (
                r["kernel"],
                fmt_shape(r["n"], r["c"]),
                r["dtype"],
                "" if r.get("threads") is None else r["threads"],
                f"{r['ms']:.3f}",
                f"{r['gb_per_s']:.0f}",
                *read,
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
                *(["of read bandwidth (forward)"] if with_read else []),
                "of copy bandwidth",
                "vs torch",
                "ulp (fwd)",
            ],
            rows,
        )
    )
    host = host_cost_table(doc)
    if host:
        parts.append(host)
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
    for r in (r for dtype in FINDING_DTYPES for r in largest(doc, dtype)):
        which, frac = ceiling(r)
        met = "met" if frac >= TARGET else "not met"
        findings.append(
            ctx.finding(
                f"{r['kernel']}, {fmt_shape(r['n'], r['c'])} {r['dtype']}: {r['ms']:.2f} ms, "
                f"{fmt_pct(frac)} of the {which} bandwidth (target {TARGET:.0%}: {met}), "
                f"{r['vs_torch']:.2f}x the speed of torch's eager {PEERS[r['kernel']]} "
                f"({r['threads']} threads per block).",
                rel,
            )
        )
    slow, _ = forward_against_torch(doc)
    if slow:
        findings.append(
            ctx.finding(
                "cestudy's forward is slower than torch's eager forward at "
                + ", ".join(f"{fmt_shape(n, c)} ({q:.2f}x)" for n, c, q in slow)
                + "; what bounds it there was not measured.",
                rel,
            )
        )
    return with_findings(parts, findings, level=2)
