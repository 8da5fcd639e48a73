"""The speed finding quotes every shape and dtype timed, not only the largest: counts, ranges
and each cell where cestudy is slower than torch, read from the rows."""

from cestudy.report.sections import performance


def _row(impl, mode, n, c, seconds, dtype="float32", variant="cross_entropy"):
    return {
        "kind": "performance",
        "status": "ok",
        "p_variant": variant,
        "p_implementation": impl,
        "p_mode": mode,
        "p_dtype": dtype,
        "p_batch": n,
        "p_classes": c,
        "median_s": seconds,
    }


ROWS = [
    _row("torch", "forward", 256, 10, 2.0),
    _row("numba", "forward", 256, 10, 1.0),  # 2x faster
    _row("torch", "forward", 2048, 1000, 1.0),
    _row("numba", "forward", 2048, 1000, 4.0),  # 4x slower
    _row("torch", "forward_grad", 256, 10, 3.0),
    _row("numba", "forward_grad", 256, 10, 1.0),
    _row("numba_out", "forward_grad", 256, 10, 0.5),
    _row("lse", "forward", 256, 10, 0.1),  # not cestudy's kernel: left out
]


def test_ratios_are_torch_time_over_cestudy_time_for_each_kernel_and_shape():
    r = performance.torch_ratios(ROWS)
    assert r[("cross_entropy", "forward", "numba")] == {
        ("float32", 256, 10): 2.0,
        ("float32", 2048, 1000): 0.25,
    }
    assert r[("cross_entropy", "forward_grad", "numba_out")] == {("float32", 256, 10): 6.0}
    assert all(k[2] in performance.RATIO_KERNELS for k in r)


def test_the_sentence_counts_every_cell_and_names_the_slower_ones():
    text = performance.cases_sentence(ROWS)
    assert "forward in 1 of 2 (0.25x to 2.00x)" in text
    assert "fused forward and gradient in 1 of 1 (3.00x to 3.00x)" in text
    assert "reused gradient buffer in 1 of 1 (6.00x to 6.00x)" in text
    assert "slower than torch: cross_entropy forward 2048 x 1000 float32 0.25x" in text


def test_the_table_has_a_column_per_shape_and_a_row_per_call():
    md = performance.ratio_table(ROWS)
    head = md.splitlines()[0]
    assert "256 x 10 float32" in head and "2048 x 1000 float32" in head
    assert "| cross_entropy | forward | 2.00x | 0.25x |" in md
    assert "| cross_entropy | fused, reused buffer | 6.00x |  |" in md


def test_no_torch_timing_means_no_sentence():
    assert performance.cases_sentence([r for r in ROWS if r["p_implementation"] != "torch"]) is None


def test_the_frameworks_sentence_times_each_peer_against_cestudy():
    rows = ROWS + [
        _row("jax", "forward", 2048, 1000, 2.0),
        _row("sklearn", "forward", 2048, 1000, 40.0),
    ]
    text = performance.frameworks_sentence(rows)
    assert "at 2048 x 1000 float32" in text
    assert "cestudy 4000 ms" in text
    assert "optax (JAX) 2000 ms (0.50x cestudy's time)" in text
    assert "scikit-learn 40000 ms (10.00x cestudy's time)" in text
    assert performance.frameworks_sentence(ROWS) is None  # no other framework timed


def test_a_ratio_timed_side_by_side_wins_over_torchs_own_cell():
    """A cell timed interleaved with torch (``speedup_vs_torch``) is quoted by that pair, not by
    torch's cell of the same shape, timed minutes apart on a machine whose speed moves; a cell
    without a pair falls back to torch's cell, and one with neither has no ratio."""
    from cestudy.report.data import torch_speedup

    paired = dict(_row("numba", "forward", 2048, 1000, 4.0), speedup_vs_torch=1.25)
    rows = [r for r in ROWS if r["median_s"] != 4.0] + [paired]
    assert performance.torch_ratios(rows)[("cross_entropy", "forward", "numba")] == {
        ("float32", 256, 10): 2.0,
        ("float32", 2048, 1000): 1.25,
    }
    assert "slower than torch" not in performance.cases_sentence(rows)
    assert torch_speedup(paired, None) == 1.25
    assert torch_speedup(_row("numba", "forward", 1, 1, 2.0), 3.0) == 1.5
    unpaired = torch_speedup(_row("numba", "forward", 1, 1, 2.0), None)
    assert unpaired != unpaired  # NaN: no ratio
    nan_pair = dict(_row("numba", "forward", 1, 1, 2.0), speedup_vs_torch=float("nan"))
    assert torch_speedup(nan_pair, 4.0) == 2.0


def test_the_largest_shape_needs_only_a_paired_ratio():
    """Without a torch cell of its own, the largest shape is still quoted when cestudy's cell
    was timed beside torch."""
    rows = [
        dict(_row("numba", "forward", 4096, 4096, 1.0), speedup_vs_torch=3.0, frac_bandwidth=0.5)
    ]
    assert performance.largest(rows)[0]["p_batch"] == 4096
    assert "3.00x the speed of torch's forward" in performance.speed_sentence(rows)
