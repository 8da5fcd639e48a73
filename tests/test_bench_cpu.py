"""The CPU benchmark times what it claims: every variant it times computes, in every
implementation, the same mean loss and gradient as the oracle (a wrong semantics, e.g. a torch
expression summing where cestudy averages, would show as a huge ulp error here). No timing is
asserted: speed is measured by ``python -m cestudy bench``, never by tests."""

import pytest

from cestudy import variants
from cestudy.bench import cpu as bench

pytest.importorskip("torch")


def test_the_benchmark_times_every_variant_of_logits_with_a_gradient():
    timed = {v.name for v in variants.VARIANTS.values() if v.input == "logits" and v.has_grad}
    assert set(bench.VARIANTS) == timed


@pytest.mark.parametrize("variant", bench.VARIANTS)
@pytest.mark.parametrize("mode", ["forward", "forward_grad"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_timed_implementation_agrees_with_the_oracle(variant, mode, dtype):
    impls = ["numba", "torch", "lse"]
    if mode == "forward_grad":
        impls += list(bench.GRAD_BUFFERS)
    res = bench.time_group(variant, dtype, mode, 16, 7, impls, repeats=1)
    for impl in impls:
        r = res[impl]
        if "skipped" in r:
            assert impl == "lse" and "no gradient" in r["skipped"], (impl, r)
            continue
        # the mean loss within a few ulp of the exact mean, and the gradient too
        assert r["check_ulp"] <= 8, (impl, r)
        if mode == "forward_grad":
            assert r["grad_check_ulp"] <= 8, (impl, r)


def test_other_frameworks_are_timed_without_torch(monkeypatch):
    """Without torch (skipped in cestudy's group) the other frameworks' times are kept, with no
    ratio against it; a KeyError ended the whole bench before."""
    from cestudy.bench import command

    monkeypatch.setattr(command, "_impls", lambda variant, n, c: (["numba", "torch"], ["jax"]))

    def fake_group(variant, dtype, mode, n, c, impls, repeats):
        if impls == ["jax"]:
            return {"jax": {"median_s": 2e-3}}
        return {"numba": {"median_s": 1e-3}, "torch": {"skipped": "torch is not installed"}}

    monkeypatch.setattr(bench, "time_group", fake_group)
    res = command.time_shape(bench.CE, "float32", "fwd", 4, 8, 1)
    assert res["jax"] == {"median_s": 2e-3}
    assert "speedup_vs_torch" not in res["jax"]


def test_the_memory_ceiling_is_a_median_over_a_buffer_of_distinct_pages():
    """The ceiling that bandwidth fractions divide by: a buffer of ones once gave a float32
    read twice the float64 one (68 against 38 GB/s, the best of five passes), which halved every
    fraction of that run. The buffer now holds no two pages alike, and the ceiling is the median
    of the passes, each of which the manifest records."""
    import numpy as np

    from cestudy.bench import ceiling

    buf = ceiling._buffer("float32", 1 << 22)
    pages = buf.reshape(-1, 1024)  # 4 KiB pages of float32
    assert len({p.tobytes() for p in pages}) == len(pages)
    rate = ceiling.read_bandwidth("float32", nbytes=1 << 22, repeats=5)
    rw = ceiling.read_write_bandwidth("float32", nbytes=1 << 22, repeats=5)
    got = ceiling.samples()
    assert len(got["read float32"]) == len(got["read_write float32"]) == 5
    assert rate == pytest.approx(np.median(ceiling._SAMPLES[("read", "float32", 1 << 22)]))
    assert rw == pytest.approx(np.median(ceiling._SAMPLES[("read_write", "float32", 1 << 22)]))
    assert 0 < min(got["read float32"]) and np.isfinite(rate) and np.isfinite(rw)


def test_each_mode_is_judged_against_its_own_ceiling_and_rows_say_which():
    """A fused kernel writes the gradient, so it is judged against read+write; a forward kernel
    only reads. The row records which ceiling, over how large a buffer and how many passes, so
    the report states what was measured instead of text that can drift from the code."""
    from cestudy.bench import ceiling
    from cestudy.bench import cpu as bench_cpu

    assert ceiling.kind("forward") == "read"
    assert ceiling.kind("forward_grad") == "read_write"
    with pytest.raises(ValueError, match="mode"):
        ceiling.kind("backward")
    how = ceiling.description()
    assert how["repeats"] == ceiling.REPEATS
    assert 256 << 20 <= how["buffer_bytes"] <= 1 << 30
    assert how["buffer_bytes"] >= min(8 * how["last_level_cache_bytes"], 1 << 30)
    for mode in ("forward", "forward_grad"):
        ceiling._SAMPLES[(ceiling.kind(mode), "float64", ceiling.buffer_bytes())] = [7.0, 5.0, 6.0]
    try:
        res = bench_cpu.time_group(
            "cross_entropy", "float64", "forward_grad", 4, 8, ["numba"], repeats=1
        )["numba"]
    finally:
        for mode in ("forward", "forward_grad"):
            ceiling._SAMPLES.pop((ceiling.kind(mode), "float64", ceiling.buffer_bytes()))
    assert res["ceiling"] == "read_write"
    assert res["bandwidth_gbs"] == 6.0  # the median of the recorded passes
    assert res["ceiling_passes"] == ceiling.REPEATS
    assert res["ceiling_buffer_bytes"] == ceiling.buffer_bytes()


def test_the_report_says_how_the_ceiling_of_its_rows_was_measured():
    from cestudy.report.sections.performance import ceiling_how

    rows = [{"ceiling_buffer_bytes": 512 << 20, "ceiling_passes": 7}] * 2
    assert ceiling_how(rows) == (
        "of 512 MiB, several times the last-level cache (the median of 7 passes)"
    )
    assert ceiling_how([{}]) == "several times the last-level cache"
