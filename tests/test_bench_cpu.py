"""The CPU benchmark times what it claims: every variant it times computes, in every
implementation, the same mean loss and gradient as the oracle (a wrong semantics, e.g. a torch
expression summing where cestudy averages, would show as a huge ulp error here). No timing is
asserted: speed is measured by ``python -m cestudy bench``, never by tests."""

import time

import numpy as np
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


def _cell(impl):
    return dict(
        variant=bench.CE,
        implementation=impl,
        dtype="float32",
        mode="forward",
        batch=8,
        classes=5,
        repeats=3,
        seed=0,
    )


def test_a_performance_cell_of_cestudy_times_torch_beside_it(monkeypatch):
    """cestudy's cells time torch interleaved with them and record its median and the ratio;
    torch's own cell and the other implementations' are timed alone."""
    groups = []
    real = bench.time_group

    def spy(variant, dtype, mode, n, c, impls, **kw):
        groups.append(list(impls))
        return real(variant, dtype, mode, n, c, impls, **kw)

    monkeypatch.setattr(bench, "time_group", spy)
    r = bench.performance_cell(_cell("numba"))
    assert groups[-1] == ["numba", "torch"]
    assert r["speedup_vs_torch"] == r["torch_median_s"] / r["median_s"]
    assert r["check_ulp"] <= 8
    bench.performance_cell(_cell("lse"))
    assert groups[-1] == ["lse"]
    t = bench.performance_cell(_cell("torch"))
    assert groups[-1] == ["torch"] and "torch_median_s" not in t
    assert set(bench.PAIRED_WITH_TORCH).isdisjoint(("jax", "tensorflow", "sklearn", "torch"))


def test_a_performance_cell_without_torch_keeps_its_time_and_no_ratio(monkeypatch):
    real = bench.make_callable

    def no_torch(variant, impl, mode, x, t):
        if impl == "torch":
            raise ImportError("torch is not installed")
        return real(variant, impl, mode, x, t)

    monkeypatch.setattr(bench, "make_callable", no_torch)
    r = bench.performance_cell(_cell("numba"))
    assert r["median_s"] > 0
    assert "speedup_vs_torch" not in r and "torch_median_s" not in r


def test_the_memory_ceiling_is_a_median_over_a_buffer_of_distinct_pages(monkeypatch):
    """The ceiling that bandwidth fractions divide by: a buffer of ones once gave a float32
    read twice the float64 one (68 against 38 GB/s, the best of five passes), which halved every
    fraction of that run. The buffer now holds no two pages alike, and the ceiling is the median
    of the passes, each of which the manifest records; a second call reuses the measurement
    instead of building the buffer again."""
    import numpy as np

    from cestudy.bench import ceiling

    monkeypatch.setattr(ceiling, "_SAMPLES", {})
    monkeypatch.setattr(ceiling, "_HISTORY", [])
    built = []
    real_buffer = ceiling._buffer
    monkeypatch.setattr(ceiling, "_buffer", lambda *a: built.append(a) or real_buffer(*a))
    buf = real_buffer("float32", 1 << 22)
    pages = buf.reshape(-1, 1024)  # 4 KiB pages of float32
    assert len({p.tobytes() for p in pages}) == len(pages)

    def median(kind_, **kw):
        return float(
            np.median(ceiling.measurement(kind_, "float32", nbytes=1 << 22, **kw)["rates"])
        )

    rate = median("read", repeats=5)
    rw = median("read_write", repeats=5)
    assert median("read") == rate
    assert len(built) == 2  # one buffer per kind, not one per call
    with pytest.raises(ValueError, match="kind"):
        ceiling.measurement("write", "float32", nbytes=1 << 22)
    assert len(built) == 2  # an unknown kind builds no buffer
    got = ceiling.samples()
    assert len(got["read float32 4 MiB"]) == len(got["read_write float32 4 MiB"]) == 5
    assert rate == pytest.approx(np.median(got["read float32 4 MiB"]), rel=1e-3)
    assert rw == pytest.approx(np.median(got["read_write float32 4 MiB"]), rel=1e-3)
    assert 0 < min(got["read float32 4 MiB"]) and np.isfinite(rate) and np.isfinite(rw)


def test_a_ceiling_is_measured_again_once_older_than_its_max_age(monkeypatch):
    """The VM the reports come from once read float32 at 29.9 GB/s where the run before had
    37.4: a ceiling measured once at a 45-minute bench's start judges every row against whatever
    the memory did in those seconds. A measurement older than ``max_age_s`` is taken again (a new
    buffer), every one is kept for the manifest under its own name, and the spread shows how far
    the medians moved; a younger one, or no age limit, reuses it."""
    from cestudy.bench import ceiling

    monkeypatch.setattr(ceiling, "_SAMPLES", {})
    monkeypatch.setattr(ceiling, "_HISTORY", [])
    built = []
    real_buffer = ceiling._buffer
    monkeypatch.setattr(ceiling, "_buffer", lambda *a: built.append(a) or real_buffer(*a))
    first = ceiling.measurement("read", "float32", nbytes=1 << 22, repeats=3)
    assert ceiling.measurement("read", "float32", nbytes=1 << 22, max_age_s=60) is first
    assert ceiling.measurement("read", "float32", nbytes=1 << 22) is first
    assert len(built) == 1
    first["at"] -= 61  # as if measured 61 s ago
    assert ceiling.measurement("read", "float32", nbytes=1 << 22) is first  # no age limit
    again = ceiling.measurement("read", "float32", nbytes=1 << 22, repeats=3, max_age_s=60)
    assert again is not first and len(built) == 2
    assert ceiling.measurement("read", "float32", nbytes=1 << 22, max_age_s=60) is again
    got = ceiling.samples()
    assert list(got) == ["read float32 4 MiB", "read float32 4 MiB #2"]
    assert got["read float32 4 MiB #2"] == [round(v, 3) for v in again["rates"]]
    assert ceiling.spread() == {
        "read float32 4 MiB": [float(np.median(first["rates"])), float(np.median(again["rates"]))]
    }
    size = ceiling.buffer_bytes()
    ceiling._SAMPLES[("read", "float32", size)] = {
        "rates": [2.0],
        "buffer_bytes": size,
        "at": time.monotonic() - 30,
    }
    row = ceiling.measured("forward", "float32")  # a row records how old its ceiling was
    assert row["max_age_s"] is None
    assert row["kind"] == "read" and row["gbs"] == 2.0 and 30 <= row["age_s"] < 40


def test_a_ceiling_is_measured_on_all_threads_whatever_the_caller_set(monkeypatch):
    """The bench's scaling rows run numba on one thread; a ceiling measured then would be a
    single core's and, as the latest, judge the next rows on all threads. The passes run on
    NUMBA_NUM_THREADS and the caller's setting comes back, also when a pass raises."""
    import numba

    from cestudy.bench import ceiling

    seen = []

    def counting_pass(a):
        return (lambda: seen.append(numba.get_num_threads())), a.nbytes

    def failing_pass(a):
        def fn():
            raise RuntimeError("pass failed")

        return fn, a.nbytes

    monkeypatch.setattr(ceiling, "_SAMPLES", {})
    monkeypatch.setattr(ceiling, "_HISTORY", [])
    monkeypatch.setattr(ceiling, "_PASSES", {"read": counting_pass, "read_write": failing_pass})
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        ceiling.measurement("read", "float32", nbytes=1 << 20, repeats=2)
        assert seen == [numba.config.NUMBA_NUM_THREADS] * 3
        assert numba.get_num_threads() == 1
        with pytest.raises(RuntimeError, match="pass failed"):
            ceiling.measurement("read_write", "float32", nbytes=1 << 20)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(threads)
    assert ceiling.description()["threads"] == numba.config.NUMBA_NUM_THREADS


def test_fmt_bytes_names_sizes_in_mib_and_gib():
    from cestudy.bench.ceiling import fmt_bytes

    assert fmt_bytes(4 << 20) == "4 MiB"
    assert fmt_bytes(256 << 20) == "256 MiB"
    assert fmt_bytes(1 << 30) == "1 GiB"
    assert fmt_bytes(3 << 29) == "1.5 GiB"


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
    monkeypatch.setattr(ceiling, "MAX_AGE_S", float("inf"))  # however long compiling takes
    for m in ceiling._SAMPLES.values():
        m["at"] = time.monotonic()
    for mode, gbs, buffer in (("forward", 2.0, size - 8), ("forward_grad", 6.0, size)):
        res = bench_cpu.time_group("cross_entropy", "float64", mode, 4, 8, ["numba"], repeats=1)
        row = res["numba"]
        assert row["ceiling_kind"] == ceiling.kind(mode)
        assert row["bandwidth_gbs"] == gbs  # the median of that kind's passes
        assert row["frac_bandwidth"] == pytest.approx(row["gb_per_s"] / gbs)
        assert row["ceiling_passes"] == 3
        assert row["ceiling_buffer_bytes"] == buffer
        assert row["ceiling_llc_bytes"] == ceiling.last_level_cache_bytes()
        assert row["ceiling_age_s"] >= 0 and row["ceiling_max_age_s"] == float("inf")


def test_a_row_whose_ceiling_is_stale_is_judged_against_a_new_measurement(monkeypatch):
    """The bench measures the ceiling again, after a row's timing, once the latest is over
    MAX_AGE_S old; a row is never judged against the stale one."""
    from cestudy.bench import ceiling
    from cestudy.bench import cpu as bench_cpu

    size = ceiling.buffer_bytes()
    stale = {"rates": [1e-3], "buffer_bytes": size, "at": time.monotonic() - 1e6}
    monkeypatch.setattr(ceiling, "_SAMPLES", {("read", "float32", size): stale})
    monkeypatch.setattr(ceiling, "_HISTORY", [])
    built = []
    real_buffer = ceiling._buffer
    small = lambda dtype, nbytes: built.append(nbytes) or real_buffer(dtype, 1 << 22)  # noqa: E731
    monkeypatch.setattr(ceiling, "_buffer", small)
    row = bench_cpu.time_group("cross_entropy", "float32", "forward", 4, 8, ["numba"], 1)["numba"]
    assert built == [size]  # measured again, once
    assert (
        row["bandwidth_gbs"] > 1e-3
        and row["bandwidth_gbs"] == ceiling.spread()["read float32 4 MiB"][0]
    )
    assert row["ceiling_age_s"] < ceiling.MAX_AGE_S
    assert row["ceiling_max_age_s"] == ceiling.MAX_AGE_S


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


def test_the_report_says_how_far_the_rows_ceilings_ranged_and_how_old_they_were():
    from cestudy.report.sections.performance import ceiling_spread

    def row(kind_, dtype, gbs, age, limit=60.0):
        return {
            "ceiling_kind": kind_,
            "p_dtype": dtype,
            "bandwidth_gbs": gbs,
            "ceiling_age_s": age,
            "ceiling_max_age_s": limit,
        }

    rows = [
        row("read", "float32", 29.9, 0.0),
        row("read", "float32", 34.6, 59.2),
        row("read_write", "float32", 35.0, 12.0),
        row("read", "float64", 54.2, 3.0),
    ]
    text = ceiling_spread(rows)
    assert text.startswith(" Each row is judged against the latest ceiling")
    assert "read float32 29.9 to 34.6 GB/s" in text
    assert "read+write float32 35.0 GB/s" in text
    assert "read float64 54.2 GB/s" in text
    assert "had been measured 59 s before the row's timing ended" in text
    assert "when older than 60 s" in text
    older = {"bandwidth_gbs": 30.0, "p_dtype": "float32", "ceiling_kind": "read"}
    assert ceiling_spread([older]) == ""
    mixed = ceiling_spread(rows + [older, row("read", "float32", 30.0, 1.0, limit=30.0)])
    assert mixed.startswith(" Each row that records its ceiling's age is judged")
    assert "when older than 30 s or 60 s" in mixed
