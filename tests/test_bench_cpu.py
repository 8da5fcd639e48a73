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


def test_the_memory_ceiling_is_a_median_over_a_buffer_of_distinct_pages(monkeypatch):
    """The ceiling that bandwidth fractions divide by: a buffer of ones once gave a float32
    read twice the float64 one (68 against 38 GB/s, the best of five passes), which halved every
    fraction of that run. The buffer now holds no two pages alike, and the ceiling is the median
    of the passes, each of which the manifest records; a second call reuses the measurement
    instead of building the buffer again."""
    import numpy as np

    from cestudy.bench import ceiling

    monkeypatch.setattr(ceiling, "_SAMPLES", {})
    built = []
    real_buffer = ceiling._buffer
    monkeypatch.setattr(ceiling, "_buffer", lambda *a: built.append(a) or real_buffer(*a))
    buf = real_buffer("float32", 1 << 22)
    pages = buf.reshape(-1, 1024)  # 4 KiB pages of float32
    assert len({p.tobytes() for p in pages}) == len(pages)
    rate = ceiling.bandwidth("read", "float32", nbytes=1 << 22, repeats=5)
    rw = ceiling.bandwidth("read_write", "float32", nbytes=1 << 22, repeats=5)
    assert ceiling.bandwidth("read", "float32", nbytes=1 << 22) == rate
    assert len(built) == 2  # one buffer per kind, not one per call
    with pytest.raises(ValueError, match="kind"):
        ceiling.bandwidth("write", "float32", nbytes=1 << 22)
    assert len(built) == 2  # an unknown kind builds no buffer
    got = ceiling.samples()
    assert len(got["read float32 4 MiB"]) == len(got["read_write float32 4 MiB"]) == 5
    assert rate == pytest.approx(np.median(got["read float32 4 MiB"]), rel=1e-3)
    assert rw == pytest.approx(np.median(got["read_write float32 4 MiB"]), rel=1e-3)
    assert 0 < min(got["read float32 4 MiB"]) and np.isfinite(rate) and np.isfinite(rw)


def test_each_mode_is_judged_against_its_own_ceiling_and_rows_say_how_it_was_measured(
    monkeypatch,
):
    """A fused kernel writes the gradient, so it is judged against read+write; a forward kernel
    only reads. Each row records which ceiling, over how large a buffer, sized from which cache,
    and how many passes it is the median of, as measured (here 3, not the default), so the
    report states what was measured instead of text that can drift from the code."""
    from cestudy.bench import ceiling
    from cestudy.bench import cpu as bench_cpu

    assert ceiling.kind("forward") == "read"
    assert ceiling.kind("forward_grad") == "read_write"
    assert ceiling.label("forward_grad") == "read+write"
    with pytest.raises(ValueError, match="mode"):
        ceiling.kind("backward")
    how = ceiling.description()
    assert how["repeats"] == ceiling.REPEATS
    assert ceiling.MIN_BUFFER_BYTES <= how["buffer_bytes"] <= ceiling.MAX_BUFFER_BYTES
    assert how["buffer_bytes"] >= min(
        ceiling.LLC_FACTOR * how["last_level_cache_bytes"], ceiling.MAX_BUFFER_BYTES
    )
    size = ceiling.buffer_bytes()
    monkeypatch.setattr(
        ceiling,
        "_SAMPLES",
        {
            ("read", "float64", size): {"rates": [1.0, 3.0, 2.0], "buffer_bytes": size - 8},
            ("read_write", "float64", size): {"rates": [7.0, 5.0, 6.0], "buffer_bytes": size},
        },
    )
    for mode, gbs, buffer in (("forward", 2.0, size - 8), ("forward_grad", 6.0, size)):
        res = bench_cpu.time_group("cross_entropy", "float64", mode, 4, 8, ["numba"], repeats=1)
        row = res["numba"]
        assert row["ceiling_kind"] == ceiling.kind(mode)
        assert row["bandwidth_gbs"] == gbs  # the median of that kind's passes
        assert row["frac_bandwidth"] == pytest.approx(row["gb_per_s"] / gbs)
        assert row["ceiling_passes"] == 3
        assert row["ceiling_buffer_bytes"] == buffer
        assert row["ceiling_llc_bytes"] == ceiling.last_level_cache_bytes()


def test_the_report_says_how_the_ceiling_of_its_rows_was_measured():
    from cestudy.report.sections.performance import ceiling_how

    row = {"ceiling_buffer_bytes": 256 << 20, "ceiling_llc_bytes": 32 << 20, "ceiling_passes": 7}
    assert ceiling_how([row, dict(row)]) == (
        "of 256 MiB (8 times the last-level cache cpu0 reports, at least 256 MiB and at most "
        "1 GiB: 32 MiB here), the median of 7 passes"
    )
    assert ceiling_how([{}]) == (
        "of 8 times the last-level cache cpu0 reports, at least 256 MiB and at most 1 GiB"
    )
