"""The study runner: grid expansion, metrics with known answers, bad study files, the results
store, resume after a real kill -9, the process pool and a real dask LocalCluster."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cestudy.study import inputs, metrics, runner, spec
from cestudy.study.store import Store

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
description = "tiny test study"

[[part]]
kind = "accuracy"
variant = ["cross_entropy", "binary_cross_entropy_with_logits"]
implementation = ["lse", "numba", "scipy"]
dtype = ["float32", "float16"]
family = ["gaussian"]
scale = [1.0, 100.0]
classes = [10]
batch = 16
label_smoothing = [0.0, 0.1]

[[part]]
kind = "imbalance"
classes = [4]
imbalance = [1.0, 100.0]
batch = 256
"""


def write(tmp_path, text, name="study.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "cestudy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_grid_expansion_drops_inapplicable_combinations(tmp_path):
    s = spec.load(str(write(tmp_path, TINY)))
    cells = s.cells()
    acc = [c for c in cells if c["kind"] == "accuracy"]
    # scipy only implements cross_entropy; label smoothing only applies to cross_entropy
    bce = "binary_cross_entropy_with_logits"
    assert not any(c["implementation"] == "scipy" and c["variant"] == bce for c in acc)
    assert all(c["label_smoothing"] == 0.0 for c in acc if c["variant"] == bce)
    # cross_entropy: 3 impls x 2 dtypes x 2 scales x 2 smoothing; bce: 2 x 2 x 2
    assert len(acc) == 3 * 2 * 2 * 2 + 2 * 2 * 2
    assert len([c for c in cells if c["kind"] == "imbalance"]) == 2
    keys = [json.dumps(c, sort_keys=True) for c in cells]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    "text,words",
    [
        ("name='x'\n[[part]]\nkind='accuracy'\nvariantt=['cross_entropy']\n", "part[0].variantt"),
        ("name='x'\n[[part]]\nkind='accuracy'\nclasses=['ten']\n", "expected a number"),
        ("name='x'\n[[part]]\nkind='accuracy'\nclasses=[]\n", "empty list"),
        ("name='x'\n[[part]]\nkind='accuracy'\nimplementation=['fast']\n", "allowed: naive"),
        ("name='x'\n[[part]]\nkind='accuracy'\ndtype=['float8']\n", "unknown value 'float8'"),
        ("name='x'\n[[part]]\nkind='accuracy'\nclasses=[1]\n", "must be >= 2"),
        ("name='x'\n[[part]]\nkind='trianing'\n", "unknown kind"),
        ("name='x'\n", "at least one [[part]]"),
        ("name='x'\nextra=1\n[[part]]\nkind='accuracy'\n", "unknown top-level key"),
        (
            "name='x'\n[[part]]\nkind='accuracy'\nvariant=['binary_cross_entropy']\n"
            "implementation=['scipy']\n",
            "no applicable cells",
        ),
        ("this is not toml [", "not valid TOML"),
    ],
)
def test_bad_study_file_names_file_and_key_and_exits_2_writing_nothing(tmp_path, text, words):
    path = write(tmp_path, text, "bad.toml")
    store = tmp_path / "results.sqlite"
    proc = run_cli("run", str(path), "--results", str(store), "--quiet", "--no-report")
    assert proc.returncode == 2
    assert str(path) in proc.stderr and words in proc.stderr
    assert not store.exists()


def test_metrics_on_known_answers():
    exact = np.array([1.0, 2.0, 1e-30, np.nan], dtype=np.longdouble)
    value = np.array([1.0, np.nextafter(np.float32(2), np.float32(3)), 0.0, np.nan], np.float32)
    m = metrics.forward_metrics(value, exact, np.float32)
    assert m["fwd_max_ulp"] > 1e6  # 1e-30 returned as 0: a 100% error in float32 ulps
    assert m["fwd_median_ulp"] == 1.0  # errors 0, 1, huge -> median 1
    assert m["fwd_frac_over_4ulp"] == pytest.approx(1 / 3)
    assert m["fwd_nan_rows_kept"] is True
    assert m["fwd_frac_nan"] == 0 and m["fwd_frac_inf"] == 0
    m = metrics.forward_metrics(
        np.array([np.inf, np.nan, 1.0]), np.array([1.0, 1.0, 1.0]), np.float64
    )
    assert m["fwd_frac_inf"] == pytest.approx(1 / 3) and m["fwd_frac_nan"] == pytest.approx(1 / 3)
    g = metrics.gradient_metrics(
        np.array([[0.0, 0.5]]), np.array([[-1e-9, 0.5]]), np.float32, target=np.array([0])
    )
    assert g["grad_true_frac_vanished"] == 1.0 and g["grad_frac_vanished"] == 0.5
    c = metrics.clipping_metrics(np.array([-np.log(1e-7), 0.1]), None, np.array([40.0, 0.1]), 1e-7)
    assert c["clip_frac_engaged"] == 0.5
    assert c["clip_bias_nats"] == pytest.approx(-np.log(1e-7) - 40.0)
    prior = inputs.class_prior(4, 100.0, "step")
    assert prior[0] / prior[-1] == pytest.approx(100.0)
    mask = inputs.minority_mask(prior)
    im = metrics.imbalance_metrics(
        np.array([1.0, 3.0]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 3]), mask
    )
    assert im["minority_loss_share"] == 0.75 and im["minority_grad_share"] == 0.5
    w = inputs.class_weights("effective", prior, 1000, beta=0.999)
    assert w[-1] > w[0] and np.mean(w) == pytest.approx(1.0)


def test_run_store_export_and_instant_resume(tmp_path):
    path = write(tmp_path, TINY)
    store_path = tmp_path / "r.sqlite"
    proc = run_cli(
        "run",
        str(path),
        "--results",
        str(store_path),
        "--quiet",
        "--out",
        str(tmp_path / "reports"),
    )
    assert proc.returncode == 0, proc.stderr
    n = len(spec.load(str(path)).cells())
    # every cell of TINY runs here (numpy, Numba and scipy are dependencies): all computed
    assert f"study tiny: {n} cells, {n} computed, 0 already stored" in proc.stdout, proc.stdout
    assert " 0 skipped" in proc.stdout and " 0 failed" in proc.stdout
    with Store(store_path) as st:
        assert st.count() == n
        manifest = st.runs()[0]["manifest"]
    assert manifest["cpu_count"] and manifest["numba"] and manifest["git_commit"]
    assert (tmp_path / "reports" / "tiny.md").exists()
    assert (tmp_path / "reports" / "data" / "results.json").exists()
    t0 = time.perf_counter()
    again = run_cli("run", str(path), "--results", str(store_path), "--quiet", "--no-report")
    assert again.returncode == 0
    assert f"{n} already stored" in again.stdout and "0 computed" in again.stdout
    assert time.perf_counter() - t0 < 60
    with Store(store_path) as st:
        assert st.count() == n
    csv = run_cli("export", "--format", "csv", "--results", str(store_path))
    assert csv.returncode == 0 and csv.stdout.count("\n") == n + 1
    js = json.loads(run_cli("export", "--format", "json", "--results", str(store_path)).stdout)
    assert len(js) == n and all(
        "fwd_max_ulp" in r for r in js if r["kind"] == "accuracy" and r["status"] == "ok"
    )


SLOW = """
name = "slow"
[[part]]
kind = "accuracy"
variant = ["cross_entropy"]
implementation = ["lse", "accurate", "naive", "clipped"]
dtype = ["float32", "float64"]
family = ["gaussian"]
scale = [0.5, 1.0, 2.0, 4.0, 8.0]
classes = [2000]
batch = 400
"""


def test_resume_after_kill_9_loses_and_duplicates_nothing(tmp_path):
    path = write(tmp_path, SLOW)
    store_path = tmp_path / "k.sqlite"
    total = len(spec.load(str(path)).cells())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cestudy",
            "run",
            str(path),
            "--results",
            str(store_path),
            "--quiet",
            "--no-report",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline:
        if store_path.exists():
            try:
                with sqlite3.connect(store_path, timeout=5) as db:
                    done = db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 5:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store(store_path) as st:
        before = {c["cell_key"]: c["finished"] for c in st.cells()}
    assert 5 <= len(before) < total, "the kill should land in the middle of the sweep"
    again = run_cli("run", str(path), "--results", str(store_path), "--quiet", "--no-report")
    assert again.returncode == 0, again.stderr
    with Store(store_path) as st:
        after = {c["cell_key"]: c["finished"] for c in st.cells()}
        runs = st.runs()
    assert len(after) == total
    assert all(after[k] == v for k, v in before.items()), "finished cells were recomputed"
    assert f"{len(before)} already stored" in again.stdout
    assert len(runs) == 2


def test_local_process_pool(tmp_path):
    path = write(tmp_path, TINY)
    s = spec.load(str(path))
    with Store(tmp_path / "p.sqlite") as st:
        summary = runner.run_study(s, st, jobs=2, quiet=True)
        assert summary.failed == 0 and st.count() == len(s.cells())


def test_dask_local_cluster_with_two_workers(tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    path = write(tmp_path, TINY)
    s = spec.load(str(path))
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        with Store(tmp_path / "d.sqlite") as st:
            summary = runner.run_study(
                s, st, executor="dask", scheduler=cluster.scheduler_address, quiet=True
            )
            cells = st.cells()
    assert summary.failed == 0 and summary.done + summary.skipped == len(s.cells())
    assert len(cells) == len(s.cells())
    serial_store = Store(tmp_path / "s.sqlite")
    runner.run_study(s, serial_store, quiet=True)
    serial = {c["cell_key"]: c["metrics"].get("fwd_max_ulp") for c in serial_store.cells()}
    serial_store.close()
    assert {c["cell_key"]: c["metrics"].get("fwd_max_ulp") for c in cells} == serial


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from cestudy.study import compute

    s = spec.load(str(write(tmp_path, TINY)))
    real = compute.compute_cell

    def flaky(cell):
        if cell["kind"] == "imbalance" and cell["imbalance"] == 100.0:
            raise RuntimeError("boom")
        return real(cell)

    monkeypatch.setattr(compute, "compute_cell", flaky)
    with Store(tmp_path / "f.sqlite") as st:
        summary = runner.run_study(s, st, quiet=True)
        errors = [c for c in st.cells() if c["status"] == "error"]
    assert summary.failed == 1 and len(errors) == 1 and "boom" in errors[0]["message"]
    assert summary.done + summary.skipped == len(s.cells()) - 1


def test_list_and_dry_run():
    out = run_cli("list")
    assert out.returncode == 0
    for word in (
        "default",
        "stability",
        "precision",
        "imbalance",
        "performance",
        "higham",
        "cross_entropy",
        "numba",
        "torch",
    ):
        assert word in out.stdout
    dry = run_cli("run", "--dry-run")
    assert dry.returncode == 0 and "default:" in dry.stdout and "estimated" in dry.stdout


def test_pool_workers_exit_when_the_runner_is_killed(tmp_path):
    path = write(tmp_path, SLOW)
    store_path = tmp_path / "w.sqlite"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cestudy",
            "run",
            str(path),
            "--results",
            str(store_path),
            "--quiet",
            "--no-report",
            "--jobs",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def children():
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2:
        workers = children()
        time.sleep(0.2)
    assert workers, "the pool did not start"
    time.sleep(2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    alive = workers
    while time.time() < deadline and alive:
        alive = [w for w in alive if _alive(w)]
        time.sleep(0.5)
    assert not alive, f"orphaned workers still running: {alive}"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _summary_counts(stdout):
    """(computed, already stored, computed by another runner) from a run's summary line."""
    import re

    m = re.search(
        r"(\d+) computed, (\d+) already stored, (?:(\d+) computed by another "
        r"runner, )?",
        stdout,
    )
    assert m, stdout
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _same_code(cells):
    if len({c["code_version"] for c in cells}) > 1:  # a shared working tree being edited
        pytest.skip("the package's sources changed between the two runners' starts")


def _start_runner(path, store_path, lease_s="3"):
    env = dict(os.environ, CESTUDY_LEASE_S=lease_s)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cestudy",
            "run",
            str(path),
            "--results",
            str(store_path),
            "--quiet",
            "--no-report",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _count(store_path, sql):
    """One COUNT over the store, retried while another process holds a write lock (a busy
    store must not read as an empty one); 0 before the store and its table exist."""
    deadline = time.time() + 30
    while True:
        try:
            with sqlite3.connect(store_path, timeout=5) as db:
                return db.execute(sql).fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc) or time.time() > deadline:
                return 0
            time.sleep(0.1)


def _stored(store_path):
    return _count(store_path, "SELECT COUNT(*) FROM cells") if store_path.exists() else 0


def _storing_runs(store_path):
    """How many distinct runs have stored at least one cell."""
    if not store_path.exists():
        return 0
    return _count(store_path, "SELECT COUNT(DISTINCT run_id) FROM cells")


BIG = SLOW.replace(
    "scale = [0.5, 1.0, 2.0, 4.0, 8.0]",
    "scale = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]",
)


def _wait_stored(store_path, at_least, procs, timeout=300, runs=1):
    """Wait until `at_least` cells are stored, by at least `runs` different runners.

    Waiting on the runners count matters on a loaded machine: the second runner can take
    longer to import and compile than the first needs for many cells.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (
            store_path.exists()
            and _stored(store_path) >= at_least
            and _storing_runs(store_path) >= runs
        ):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(
                f"a runner ended before {at_least} cells were stored by {runs} runners "
                f"({_stored(store_path)} by {_storing_runs(store_path)}): "
                f"{[p.communicate() for p in procs]}"
            )
        time.sleep(0.25)
    raise AssertionError(f"fewer than {at_least} cells stored after {timeout} s")


def test_two_runners_on_one_store_split_the_cells(tmp_path):
    path = write(tmp_path, BIG)
    store_path = tmp_path / "two.sqlite"
    total = len(spec.load(str(path)).cells())
    a = _start_runner(path, store_path)
    _wait_stored(store_path, 1, [a])
    b = _start_runner(path, store_path)
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    done_a, _, _ = _summary_counts(out_a)
    done_b, before_b, _ = _summary_counts(out_b)
    with Store(store_path) as st:
        cells = st.cells()
        runs = {r["run_id"] for r in st.runs()}
    _same_code(cells)
    assert len(cells) == total and all(c["status"] == "ok" for c in cells)
    # each cell computed once: the two runners' counts add up to the study
    assert done_a + done_b == total, (out_a, out_b)
    assert done_b > 0 and before_b < total, "the second runner should have taken some cells"
    assert {c["run_id"] for c in cells} <= runs


@pytest.mark.parametrize("victim", ["first", "second"])
def test_two_runners_and_kill_9_of_one_lose_and_duplicate_nothing(tmp_path, victim):
    path = write(tmp_path, BIG)
    store_path = tmp_path / "kill2.sqlite"
    total = len(spec.load(str(path)).cells())
    # both start at once: a runner started later can find the other one done on a loaded machine
    a = _start_runner(path, store_path)
    b = _start_runner(path, store_path)
    _wait_stored(store_path, 8, [a, b], runs=2)  # both have stored cells
    killed, survivor = (a, b) if victim == "first" else (b, a)
    assert killed.poll() is None, "the runner to kill had already finished"
    os.kill(killed.pid, signal.SIGKILL)  # its claimed cell expires after the 3 s lease
    killed.communicate()
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    with Store(store_path) as st:
        cells = st.cells()
        runs = st.runs()
    _same_code(cells)
    assert len(cells) == total and all(c["status"] == "ok" for c in cells)
    survivor_run = next(
        r["run_id"] for r in runs if r["manifest"].get("study_file") and r["finished"]
    )
    by_survivor = sum(c["run_id"] == survivor_run for c in cells)
    by_killed = len(cells) - by_survivor
    done, before, _ = _summary_counts(out)
    # the survivor computed exactly the cells the killed runner had not stored
    assert done == by_survivor and by_killed + by_survivor == total
    assert by_killed > 0 and by_survivor > 0


def test_kinds_declare_keys_normalisation_seed_fields_and_compute():
    from cestudy.study import kinds
    from cestudy.study.keys import Key

    assert set(kinds.KINDS) == {
        "accuracy",
        "imbalance",
        "performance",
        "training",
        "higham",
        "linear",
    }
    for name, kind in kinds.KINDS.items():
        assert kind.NAME == name and "seed" in kind.KEYS
        assert all(isinstance(k, Key) for k in kind.KEYS.values())
        assert set(kind.SEED_FIELDS) <= set(kind.KEYS)
        for attr in ("normalise", "compute", "estimate_seconds"):
            assert callable(getattr(kind, attr))
    assert spec.KINDS == {n: k.KEYS for n, k in kinds.KINDS.items()}


def test_accuracy_cells_exist_for_every_registry_variant(tmp_path):
    from cestudy import variants

    text = (
        "name='all'\n[[part]]\nkind='accuracy'\nvariant=[%s]\nimplementation=['numba']\n"
        % ", ".join(f"'{v}'" for v in variants.VARIANTS)
    )
    cells = spec.load(str(write(tmp_path, text))).cells()
    assert {c["variant"] for c in cells} == set(variants.VARIANTS)
    from cestudy.study import compute

    for cell in cells:  # each is computed and scored (logits, probabilities, log-probabilities)
        out = compute.compute_cell(dict(cell))
        assert out["n_samples"] > 0 and np.isfinite(out["fwd_max_ulp"]), cell
        if variants.get(cell["variant"]).input != "probs":
            assert out["fwd_max_ulp"] <= 4, (cell["variant"], out["fwd_max_ulp"])


def test_study_files_with_legacy_variant_names_load_under_todays_names(tmp_path):
    old = TINY.replace(
        '"cross_entropy", "binary_cross_entropy_with_logits"', '"ce_index", "bce_logits"'
    )
    assert "ce_index" in old
    new_cells = spec.load(str(write(tmp_path, TINY, "new.toml"))).cells()
    assert spec.load(str(write(tmp_path, old, "old.toml"))).cells() == new_cells
