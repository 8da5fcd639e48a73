"""Running a study: expand cells, skip finished ones, compute the rest, store each at once.

Execution is serial in-process by default; ``jobs > 1`` uses a local process pool and
``executor="dask"`` (or ``"dask-local"``) a dask.distributed cluster through
``Client.get_executor()``. In every mode results come back to this process, the only one that
writes the store, one committed cell at a time.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .. import info
from . import compute, spec
from .store import Store, cell_key

# Source files whose change changes results: the cell key includes their hash, so a resumed run
# after such a change recomputes, and one after a report-only change does not.
RESULT_SOURCES = ("api.py", "dtypes.py", "oracle.py", "formulations.py", "bench.py",
                  "kernels/cpu.py", "kernels/scalar.py", "kernels/cuda.py",
                  "study/compute.py", "study/inputs.py", "study/metrics.py", "study/higham.py",
                  "study/training.py", "kernels/cpu_fast.py")


def code_version() -> str:
    from .. import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for rel in RESULT_SOURCES:
        p = root / rel
        if p.exists():
            h.update(rel.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _guarded(cell):
    """compute_cell wrapped so that a failing cell becomes a record, never a crash."""
    try:
        return "ok", None, compute.compute_cell(cell)
    except compute.Skip as exc:
        return "skipped", str(exc), None
    except Exception as exc:  # noqa: BLE001 - a cell's failure is data for the report
        tb = traceback.format_exc(limit=3)
        return "error", f"{type(exc).__name__}: {exc}\n{tb}", None


@dataclass
class Summary:
    study: str
    total: int = 0
    done: int = 0
    skipped_existing: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    worst: dict = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"study {self.study}: {self.total} cells, {self.done} computed, "
                 f"{self.skipped_existing} already stored, {self.skipped} skipped "
                 f"(unavailable), {self.failed} failed, {self.seconds:.1f} s"]
        if self.worst:
            lines.append("  worst formulation per dtype (max forward ulp error, accuracy cells):")
            for dt, (impl, err) in sorted(self.worst.items()):
                lines.append(f"    {dt:9s} {impl:9s} {err:.3g} ulp")
        return "\n".join(lines)


def estimate_seconds(cells) -> float:
    """A rough time estimate for --dry-run, from per-kind costs measured on a 2-core machine."""
    t = 0.0
    for c in cells:
        if c["kind"] == "accuracy":
            t += 0.004 + 2.5e-7 * c["batch"] * c["classes"] * (
                4 if c["implementation"] in ("naive", "clipped", "lse", "accurate") else 2)
        elif c["kind"] == "performance":
            t += 0.3 + 2.5e-9 * c["batch"] * c["classes"] * (c["repeats"] + 3) * 3
        elif c["kind"] == "imbalance":
            t += 0.01 + 2e-7 * c["batch"] * c["classes"]
        elif c["kind"] == "training":
            t += 0.3 if c["optimizer"] == "lbfgs" else 0.02 * c["epochs"]
        else:
            t += 0.5
    return t


def _exit_with_parent(parent_pid, interval=1.0):
    """Pool-worker initializer: a daemon thread ends the worker when its parent is gone (a
    killed runner would otherwise leave its spawned workers running)."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _executor(executor, jobs, scheduler):
    if executor == "dask" or executor == "dask-local":
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise SystemExit("--executor dask needs dask.distributed: pip install "
                             "'cestudy[dask]'") from None
        if executor == "dask":
            if not scheduler:
                raise SystemExit("--executor dask needs --scheduler ADDRESS")
            client = Client(scheduler)
            return client.get_executor(), client.close
        cluster = LocalCluster(n_workers=max(jobs, 1), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)

        def close():
            client.close()
            cluster.close()
        return client.get_executor(), close
    if jobs > 1:
        pool = cf.ProcessPoolExecutor(max_workers=jobs,
                                      mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_exit_with_parent, initargs=(os.getpid(),))
        return pool, pool.shutdown
    return None, lambda: None


def run_study(study: spec.Study, store: Store, *, jobs=1, executor="local", scheduler=None,
              force=False, quiet=False) -> Summary:
    cells = study.cells()
    version = code_version()
    keys = [cell_key(study.name, c, version) for c in cells]
    done = set() if force else store.done_keys(keys)
    todo = [(k, c) for k, c in zip(keys, cells) if k not in done]
    summary = Summary(study=study.name, total=len(cells), skipped_existing=len(cells) - len(todo))
    t0 = time.perf_counter()
    if todo:
        manifest = info.manifest()
        manifest["study_description"] = " ".join(study.description.split())
        manifest["study_file"] = Path(study.path).name
        run_id = store.start_run(study.name, manifest)
        _execute(study, store, todo, version, run_id, summary, jobs, executor, scheduler, quiet)
        store.finish_run(run_id)
    summary.seconds = time.perf_counter() - t0
    summary.worst = _worst(store, study.name, version)
    return summary


def _progress(total, quiet, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="cell", disable=quiet, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.05)


def _record(store, study, key, cell, version, run_id, result, summary):
    status, message, metrics = result
    store.put(key, study.name, cell, version, status, message, metrics, run_id)
    if status == "ok":
        summary.done += 1
    elif status == "skipped":
        summary.skipped += 1
    else:
        summary.failed += 1


def _execute(study, store, todo, version, run_id, summary, jobs, executor, scheduler, quiet):
    pool, close = _executor(executor, jobs, scheduler)
    bar = _progress(len(todo), quiet, study.name)
    try:
        if pool is None:
            for key, cell in todo:
                _record(store, study, key, cell, version, run_id, _guarded(cell), summary)
                bar.update()
        else:
            futures = {pool.submit(_guarded, cell): (key, cell) for key, cell in todo}
            for fut in cf.as_completed(futures):
                key, cell = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:  # a worker died: record and go on
                    result = ("error", f"worker failure: {type(exc).__name__}: {exc}", None)
                _record(store, study, key, cell, version, run_id, result, summary)
                bar.update()
    finally:
        bar.close()
        close()


def _worst(store, study, version):
    worst = {}
    for c in store.cells(study=study, kind="accuracy"):
        if c["status"] != "ok" or c["code_version"] != version:
            continue
        err = c["metrics"].get("fwd_max_ulp")
        if err is None:
            continue
        dt = c["params"]["dtype"]
        if dt not in worst or err > worst[dt][1]:
            worst[dt] = (c["params"]["implementation"], err)
    return worst
