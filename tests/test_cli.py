"""The command line: --version, argument checks, export by study and kind with NaN as CSV readers
expect, and every command in cestudy.cli."""

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cestudy import __version__, cli
from cestudy.study.store import Store

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cestudy", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cestudy {__version__}"


@pytest.mark.parametrize("jobs", ["0", "-3", "two"])
def test_jobs_must_be_at_least_one(jobs, tmp_path):
    proc = run_cli("run", "--jobs", jobs, "--results", str(tmp_path / "r.sqlite"))
    assert proc.returncode == 2 and "--jobs" in proc.stderr
    assert not (tmp_path / "r.sqlite").exists()


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--shapes", "10by10"], "--shapes"),
        (["--shapes", "0x10"], "--shapes"),
        (["--variants", "ce_indx"], "--variants"),
        (["--dtypes", "float8"], "--dtypes"),
        (["--modes", "fwd"], "--modes"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bench_arguments_are_checked_and_named(argv, named, tmp_path):
    """Bad bench arguments end in a message naming the argument and exit 2, before any timing
    (a typo once ran and printed torch-only rows; '10by10' ended in a traceback)."""
    store = tmp_path / "r.sqlite"
    proc = run_cli("bench", *argv, "--results", str(store))
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()


def test_bench_quick_is_not_stored_unless_asked(monkeypatch):
    from cestudy.bench import command as bench_command

    monkeypatch.setattr(bench_command, "main", lambda args: args.results)
    args = cli.build_parser().parse_args(["bench", "--quick"])
    assert cli.cmd_bench(args) == ""
    args = cli.build_parser().parse_args(["bench", "--quick", "--results", "x.sqlite"])
    assert cli.cmd_bench(args) == "x.sqlite"


def test_every_command_is_in_cli_and_main_only_calls_it():
    assert set(cli.COMMANDS) == {"run", "list", "export", "report", "bench", "info"}
    main_src = (ROOT / "cestudy" / "__main__.py").read_text()
    assert "from .cli import main" in main_src and "add_parser" not in main_src
    assert not (ROOT / "cestudy" / "info.py").exists()
    proc = run_cli("info")
    assert proc.returncode == 0 and "numba" in proc.stdout and "cpu_model" in proc.stdout


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "r.sqlite"
    acc = {
        "kind": "accuracy",
        "variant": "cross_entropy",
        "implementation": "naive",
        "dtype": "float32",
    }
    with Store(path) as st:
        run = st.start_run("s", {})
        st.put("a1", "s", acc, "v", "ok", None, {"fwd_max_ulp": math.nan, "n_samples": 3}, run)
        st.put(
            "a2",
            "s",
            dict(acc, implementation="lse"),
            "v",
            "ok",
            None,
            {"fwd_max_ulp": math.inf, "n_samples": 3},
            run,
        )
        st.put(
            "t1",
            "s",
            {"kind": "training", "loss": "ce"},
            "v",
            "ok",
            None,
            {"balanced_accuracy": 0.5, "curve_test_bacc": [0.1, math.nan]},
            run,
        )
        st.put(
            "o1", "other", dict(acc, dtype="float64"), "v", "ok", None, {"fwd_max_ulp": 0.5}, run
        )
    return path


def test_export_csv_by_kind_fits_and_writes_nan_as_readers_expect(store_path):
    proc = run_cli(
        "export",
        "--format",
        "csv",
        "--kind",
        "accuracy",
        "--study",
        "s",
        "--results",
        str(store_path),
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 2 and {r["kind"] for r in rows} == {"accuracy"}
    assert "p_loss" not in rows[0] and "balanced_accuracy" not in rows[0]
    by_impl = {r["p_implementation"]: r for r in rows}
    assert by_impl["naive"]["fwd_max_ulp"] == "NaN" and by_impl["lse"]["fwd_max_ulp"] == "inf"
    assert math.isnan(float(by_impl["naive"]["fwd_max_ulp"]))


def test_export_csv_leaves_list_columns_to_json(store_path):
    proc = run_cli("export", "--format", "csv", "--kind", "training", "--results", str(store_path))
    assert proc.returncode == 0 and "curve_test_bacc" not in proc.stdout
    assert "curve_test_bacc" in proc.stderr
    js = run_cli("export", "--format", "json", "--kind", "training", "--results", str(store_path))
    rows = json.loads(js.stdout)  # standard JSON: no NaN literal
    assert "NaN" not in js.stdout and rows[0]["curve_test_bacc"] == [0.1, "nan"]


def test_export_of_nothing_says_so(store_path):
    proc = run_cli("export", "--kind", "higham", "--results", str(store_path))
    assert proc.returncode == 2 and "of kind 'higham'" in proc.stderr
