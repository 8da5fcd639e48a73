"""The GPU benchmark page from a benchmark JSON in the newer format (read bandwidth, bfloat16,
in-place fused rows, host cost per call): the rows are built by the benchmark's own ``row`` so
that the key names are the ones it writes; the committed old-format page is checked byte for byte
by the report build itself."""

import json

from cestudy.bench import cuda as bench
from cestudy.report import headline
from cestudy.report.markdown import Context
from cestudy.report.sections import cuda

BW = {"read": 4000.0, "copy": 3000.0}
SHAPE = (8192, 32768)


def _rows(dtype, torch_fwd, torch_fb, ours):
    """torch's two rows and cestudy's three (forward, fused, fused in place) at 256 threads."""
    n, c = SHAPE
    size = n * c * (4 if dtype == "float32" else 2)
    out = [
        bench.row("torch forward", n, c, dtype, None, torch_fwd, size, BW, vs_torch=1.0),
        bench.row(
            "torch forward+backward", n, c, dtype, None, torch_fb, 2 * size, BW, vs_torch=1.0
        ),
    ]
    for label, factor, seconds, ref in zip(
        ("cestudy forward", "cestudy forward+grad", "cestudy forward+grad inplace"),
        (1, 2, 2),
        ours,
        (torch_fwd, torch_fb, torch_fb),
    ):
        out.append(
            bench.row(
                label,
                n,
                c,
                dtype,
                256,
                seconds,
                factor * size,
                BW,
                vs_torch=ref / seconds,
                ulp=0.5,
                grad_ulp=0.4,
            )
        )
    return out


def _doc():
    rows = _rows("float32", 4.5e-4, 1.05e-3, (4.3e-4, 7.5e-4, 7.2e-4))
    rows += _rows("bfloat16", 2.4e-4, 6.0e-4, (2.25e-4, 3.9e-4, 3.75e-4))
    rows.append(
        {"kernel": "launch failure", "n": 16, "c": 300, "dtype": "bfloat16", "threads": 1024}
    )
    overhead = [
        {"kernel": k, "n": 64, "c": 128, "dtype": dt, "host_us_per_call": us}
        for dt in bench.DTYPES
        for k, us in (
            ("cestudy forward", 21.5),
            ("cestudy forward+grad", 23.0),
            ("torch forward", 12.4),
            ("torch forward+backward", 60.0),
        )
    ]
    return {
        "device": "NVIDIA H200",
        "device_description": "synthetic",
        "machine": {"numba": "0", "numba_cuda": "0", "torch": "0"},
        "source_commit": "abc1234",
        "date": "2026-11-29 00:00:00 UTC",
        "timed": True,
        "read_bandwidth_gbs": BW["read"],
        "read_bandwidth_numba_gbs": BW["read"],
        "read_bandwidth_torch_gbs": 3900.0,
        "copy_bandwidth_gbs": BW["copy"],
        "rows": rows,
        "call_overhead": overhead,
    }


def _render(tmp_path):
    src = tmp_path / "cuda_bench.json"
    src.write_text(json.dumps(_doc(), indent=1, sort_keys=True))
    doc = json.loads(src.read_text())
    (tmp_path / "figures").mkdir()
    return doc, cuda.render(Context(tmp_path, cuda.PAGE), doc)


def _table_row(md, kernel, dtype):
    return next(
        line
        for line in md.splitlines()
        if line.startswith(f"| {kernel} |") and f" {dtype} " in line
    )


def test_read_bandwidth_fraction_for_forward_kernels(tmp_path):
    doc, part = _render(tmp_path)
    md = part.markdown
    assert "**4000 GB/s**" in md  # the read bandwidth is stated
    assert "of read bandwidth (forward)" in md
    fwd = next(r for r in doc["rows"] if r["kernel"] == "cestudy forward")
    assert f"| {cuda.fmt_pct(fwd['frac_read_bw'])} | {cuda.fmt_pct(fwd['frac_copy_bw'])} |" in (
        _table_row(md, "cestudy forward", "float32")
    )
    # a fused kernel is not judged against the read bandwidth: its cell is empty
    assert "|  | " in _table_row(md, "cestudy forward+grad", "float32")
    texts = [f.text for f in part.findings]
    forward = next(t for t in texts if t.startswith("cestudy forward, ") and "float32" in t)
    assert f"{cuda.fmt_pct(fwd['frac_read_bw'])} of the read bandwidth" in forward
    fused = next(t for t in texts if t.startswith("cestudy forward+grad, ") and "float32" in t)
    assert "of the copy bandwidth" in fused
    clause = cuda.speed_clause(doc)
    assert "of the read bandwidth" in clause and "of the copy bandwidth" in clause


def test_bfloat16_in_place_and_host_cost_rows(tmp_path):
    doc, part = _render(tmp_path)
    md = part.markdown
    for kernel in ("cestudy forward", "cestudy forward+grad", "cestudy forward+grad inplace"):
        assert _table_row(md, kernel, "bfloat16")
    texts = [f.text for f in part.findings]
    assert any(t.startswith("cestudy forward, ") and " bfloat16: " in t for t in texts)
    assert any(t.startswith("cestudy forward+grad, ") and " bfloat16: " in t for t in texts)
    assert "## Host cost per call" in md
    assert "| cestudy forward | 64 x 128 | bfloat16 | 21.5 |" in md
    assert "| torch forward | 64 x 128 | float32 | 12.4 |" in md
    assert "launch failure" not in md  # untimed rows stay out of the timings table
    assert headline.findings({}, set(), doc, "x") is not None


def test_check_only_run_has_no_timings(tmp_path):
    """A simulator or --validate-only run records every timing as None: no table row, no
    finding, no crash."""
    doc = _doc()
    doc["rows"] = [
        bench.row("cestudy forward", 16, 300, "float32", 8, None, 16 * 300 * 4, {}, ulp=0.5)
    ]
    doc["read_bandwidth_gbs"] = doc["copy_bandwidth_gbs"] = None
    doc["call_overhead"] = [dict(r, host_us_per_call=None) for r in doc["call_overhead"]]
    (tmp_path / "figures").mkdir()
    part = cuda.render(Context(tmp_path, cuda.PAGE), doc)
    assert part.findings == []
    assert "| cestudy forward |" not in part.markdown
    assert "Host cost per call" not in part.markdown
