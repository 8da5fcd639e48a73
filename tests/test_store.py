"""The results store and the code version: files that are not stores are refused untouched,
legacy names migrate, skipped cells are no results and are retried, the code version walks the
package and fails loudly."""

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cestudy import backends
from cestudy.study import compute, higham, runner, spec, training
from cestudy.study.kinds import imbalance
from cestudy.study.store import Store, StoreError, cell_key

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name = "tiny"
[[part]]
kind = "accuracy"
variant = ["ce_index"]
implementation = ["lse", "numba"]
dtype = ["float32"]
scale = [1.0, 100.0]
batch = 8
"""


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cestudy", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "content", [b"not a database at all\n" * 50, b"SQLite format 3\x00" + b"\x07" * 3000]
)
@pytest.mark.parametrize("command", ["run", "export", "report"])
def test_a_file_that_is_no_store_is_named_exit_2_and_left_unchanged(tmp_path, content, command):
    bad = tmp_path / "results.sqlite"
    bad.write_bytes(content)
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    args = {
        "run": ["run", str(study), "--no-report", "--quiet"],
        "export": ["export"],
        "report": ["report", "--out", str(tmp_path / "rep")],
    }[command]
    proc = run_cli(*args, "--results", str(bad))
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert bad.read_bytes() == content
    assert not (tmp_path / "results.sqlite-wal").exists()


def test_another_programs_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes(x)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a cestudy results store"):
        Store(path)
    assert path.read_bytes() == before


def test_legacy_names_and_skipped_rows_migrate_on_open(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path):
        pass
    old = {"kind": "accuracy", "variant": "ce_index", "implementation": "torch"}
    with sqlite3.connect(path) as db:
        for status, params in (("ok", old), ("skipped", dict(old, variant="bce_logits"))):
            db.execute(
                "INSERT INTO cells VALUES (?, 'default', 'accuracy', ?, 'v0', ?, ?, ?, 1,"
                " '2024-01-01T00:00:00+00:00')",
                (
                    cell_key("default", params, "v0"),
                    json.dumps(params, sort_keys=True),
                    status,
                    "torch is not installed" if status == "skipped" else None,
                    json.dumps({"fwd_max_ulp": 1.0}) if status == "ok" else None,
                ),
            )
    with Store(path) as st:
        cells = st.cells()
        skipped = st.skipped()
    new = dict(old, variant="cross_entropy")
    assert [c["params"] for c in cells] == [new]
    assert cells[0]["cell_key"] == cell_key("default", new, "v0")  # results keep matching
    assert [s["params"]["variant"] for s in skipped] == ["binary_cross_entropy_with_logits"]
    assert skipped[0]["reason"] == "torch is not installed"


def test_skipped_cells_are_no_results_and_are_retried(tmp_path, monkeypatch):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    s = spec.load(str(study))
    real = compute.compute_cell
    missing = {"yes": True}

    def sometimes(cell):
        if cell["implementation"] == "numba" and missing["yes"]:
            raise backends.Skip("numba is away (pip install numba)")
        return real(cell)

    monkeypatch.setattr(compute, "compute_cell", sometimes)
    with Store(tmp_path / "s.sqlite") as st:
        first = runner.run_study(s, st, quiet=True)
        assert first.skipped == 2 and first.done == 2
        assert "2 cells: numba is away (pip install numba)" in first.format()
        assert {c["params"]["implementation"] for c in st.cells()} == {"lse"}  # no result row
        assert len(st.skipped()) == 2
        missing["yes"] = False  # the dependency is there now: the next run computes them
        second = runner.run_study(s, st, quiet=True)
        assert second.done == 2 and second.skipped_existing == 2
        assert len(st.cells()) == 4 and st.skipped() == []


def test_one_skip_exception():
    assert compute.Skip is backends.Skip
    assert training.Skip is backends.Skip and higham.Skip is backends.Skip


def test_missing_higham_data_skips_without_naming_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CESTUDY_HIGHAM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(backends.Skip) as info:
        higham.load_vectors()
    assert str(tmp_path) not in str(info.value) and "CESTUDY_HIGHAM_DATA" in str(info.value)


def test_the_higham_data_ships_with_the_package():
    folder = Path(higham.DEFAULT_DATA)
    assert folder.is_relative_to(ROOT / "cestudy")
    for name in ("data_presoftmax.mat", "license.txt", "README.md"):
        assert (folder / name).is_file()
    assert higham.load_vectors().shape == (2500, 10)


def test_code_version_walks_the_package_and_fails_on_an_unreadable_file(tmp_path):
    sources = {p.relative_to(runner.PACKAGE).as_posix() for p in runner.result_sources()}
    assert {
        "study/kinds/accuracy.py",
        "kernels/cpu.py",
        "bench/cpu.py",
        "variants.py",
        "data/higham2021/data_presoftmax.mat",
    } <= sources
    assert not any(s.startswith("report/") or s in ("cli.py", "__main__.py") for s in sources)
    pkg = tmp_path / "pkg"
    shutil.copytree(runner.PACKAGE / "study", pkg / "study")
    v1 = runner.code_version(pkg)
    (pkg / "report").mkdir()
    (pkg / "report" / "build.py").write_text("# reports do not change results\n")
    assert runner.code_version(pkg) == v1
    (pkg / "study" / "new_module.py").write_text("X = 1\n")  # a new file changes the version
    assert runner.code_version(pkg) != v1
    (pkg / "study" / "gone.py").symlink_to(tmp_path / "missing.py")
    with pytest.raises(RuntimeError, match="cannot read study/gone.py"):
        runner.code_version(pkg)


def test_code_version_ignores_formatting_comments_and_docstrings_not_code(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "study").mkdir(parents=True)
    mod = pkg / "study" / "m.py"
    mod.write_text("def f(x):\n    return x + 1\n")
    v1 = runner.code_version(pkg)
    mod.write_text(
        '"""Docs."""\n\n\ndef f(x):  # a comment\n    """More docs."""\n'
        "    return (x\n            + 1)\n"
    )
    assert runner.code_version(pkg) == v1
    mod.write_text("def f(x):\n    return x + 2\n")
    assert runner.code_version(pkg) != v1


def test_every_class_gets_a_sample_at_any_imbalance():
    s = spec.load("default")
    cells = [c for c in s.cells() if c["kind"] == "imbalance" and c["imbalance"] == 1e4]
    assert cells
    for cell in cells[:4]:
        out = compute.compute_cell(dict(cell))
        assert out["minority_sample_share"] > 0 and out["minority_loss_share"] > 0
        assert out["forced_samples"] >= 1  # a 4096 batch draws none of the rarest classes
    y, forced = imbalance.every_class_sampled(np.array([0, 0, 0, 1, 0, 0]), 4)
    assert forced == 2 and set(np.bincount(y, minlength=4)) >= {1} and min(np.bincount(y)) >= 1


def test_a_second_store_in_one_process_keeps_the_first_ones_locks(tmp_path):
    """Guards the corruption of a shared store: SQLite's locks are POSIX locks of the whole
    process, so a second Store in the same process (a runner's heartbeat thread) that opened
    and closed the file to check its header dropped the runner's locks; another process
    closing its connection then found the database unused and removed the write-ahead log
    under the runner ('database disk image is malformed' with two runners on one store)."""
    import subprocess
    import sys

    path = tmp_path / "locks.sqlite"
    first = Store(path)
    first.start_run("s", {})  # a write: the WAL file exists while a connection is open
    wal = Path(str(path) + "-wal")
    assert wal.exists()
    second = Store(path)  # in the same process, as the heartbeat's
    code = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('SELECT COUNT(*) FROM runs').fetchone(); c.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    # the other process must have seen this one using the file, and left its log alone
    assert wal.exists()
    second.close()
    first.close()
    with Store(path) as st:
        assert len(st.runs()) == 1


_OPEN_AT_ONCE = """
import sys, time
from cestudy.study.store import Store
start = float(sys.argv[2])
while time.time() < start:
    pass
Store(sys.argv[1]).close()
"""


def test_processes_opening_a_new_store_at_the_same_instant_all_get_it(tmp_path):
    """SQLite answers "database is locked" at once, without its busy timeout, when two processes
    switch a new file to WAL together; a second runner started beside the first exited on it."""
    for attempt in range(2):
        path = tmp_path / f"race{attempt}.sqlite"
        start = f"{__import__('time').time() + 3.0}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN_AT_ONCE, str(path), start], stderr=subprocess.PIPE
            )
            for _ in range(6)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()


def test_finishing_a_run_adds_what_only_its_end_knows_to_the_manifest(tmp_path):
    """The bench measures its memory ceilings again during the run; the passes of every one are
    known only at its end, so ``finish_run`` sets them in the manifest ``start_run`` wrote,
    keeping the rest of it."""
    st = Store(tmp_path / "s.sqlite")
    run = st.start_run("bench", {"machine": "m", "ceiling_samples_gbs": {"read f32": [1.0]}})
    st.finish_run(run, {"ceiling_samples_gbs": {"read f32": [1.0], "read f32 #2": [np.float64(2)]}})
    other = st.start_run("s", {"machine": "n"})
    st.finish_run(other)
    runs = {r["run_id"]: r for r in st.runs()}
    assert runs[run]["manifest"] == {
        "machine": "m",
        "ceiling_samples_gbs": {"read f32": [1.0], "read f32 #2": [2.0]},
    }
    assert runs[other]["manifest"] == {"machine": "n"}
    assert runs[run]["finished"] and runs[other]["finished"]
    st.close()
