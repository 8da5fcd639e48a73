"""Running a study: expand cells, skip finished ones, compute the rest, store each at once.

Execution is serial in-process by default; ``jobs > 1`` uses a local process pool and
``executor="dask"`` (or ``"dask-local"``) a dask.distributed cluster through
``Client.get_executor()``. In every mode results come back to this process, which writes them to
the store one committed cell at a time.

Several runners may share one store: each claims a cell (``Store.claim``) before it computes it,
so that they split the remaining cells; a heartbeat thread renews this runner's claims, and a
claim whose runner died (kill -9) expires after ``LEASE_S`` seconds and is taken over. A runner
returns once every cell of its study is stored, whoever computed it.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures as cf
import hashlib
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import compute, kinds, manifest, spec
from .store import Store, cell_key, now

PACKAGE = Path(__file__).resolve().parents[1]
# What does not change results: the reports and the command line (and caches).
NOT_RESULT_SOURCES = ("report", "cli.py", "__main__.py")
LEASE_S = float(os.environ.get("CESTUDY_LEASE_S", "60"))
"""Seconds a claim lives without renewal (the heartbeat renews every LEASE_S / 4)."""


def result_sources(package: Path = PACKAGE) -> list[Path]:
    """Every file of the package that produces results: its Python sources and shipped data,
    found by walking the package (the reports, the command line and caches excluded)."""
    out = []
    for p in sorted(package.rglob("*")):
        rel = p.relative_to(package)
        if (
            p.is_dir()
            or "__pycache__" in rel.parts
            or rel.parts[0] in NOT_RESULT_SOURCES
            or p.name.startswith(".")
            or p.suffix in (".pyc", ".nbi", ".nbc")
        ):
            continue
        if p.suffix == ".py" or "data" in rel.parts[:1]:
            out.append(p)
    return out


def _code_of(source: bytes, name) -> bytes:
    """The syntax tree of a module without its docstrings: formatting, comments and docs do not
    make results stale, any change to what the code does does."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise RuntimeError(f"code version: cannot parse {name}: {exc}") from exc
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def code_version(package: Path = PACKAGE) -> str:
    """A hash of every result-producing file of the package (``result_sources``): the cell key
    includes it, so a resumed run after such a change recomputes, and one after a report-only
    change does not. A file that cannot be read is an error, never skipped."""
    from .. import __version__

    h = hashlib.sha256(__version__.encode())
    files = result_sources(package)
    if not files:
        raise RuntimeError(f"code version: no source files found under {package}")
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise RuntimeError(
                f"code version: cannot read {p.relative_to(package)}: {exc}"
            ) from exc
        if p.suffix == ".py":
            data = _code_of(data, p.relative_to(package))
        h.update(p.relative_to(package).as_posix().encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _relative_paths(text: str) -> str:
    """A message without this machine's paths (it may end up in a tracked report)."""
    for root, name in (
        (str(PACKAGE.parent), "."),
        (str(Path.home()), "~"),
        (sys.prefix, "<python>"),
    ):
        text = text.replace(root + os.sep, name + "/")
    return text


def _guarded(cell):
    """compute_cell wrapped so that a failing cell becomes a record, never a crash."""
    try:
        return "ok", None, compute.compute_cell(cell)
    except compute.Skip as exc:
        return "skipped", _relative_paths(str(exc)), None
    except Exception as exc:  # noqa: BLE001 - a cell's failure is data for the report
        tb = traceback.format_exc(limit=3)
        return "error", _relative_paths(f"{type(exc).__name__}: {exc}\n{tb}"), None


@dataclass
class Summary:
    study: str
    total: int = 0
    done: int = 0
    skipped_existing: int = 0
    by_others: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    worst: dict = field(default_factory=dict)
    skip_reasons: collections.Counter = field(default_factory=collections.Counter)

    def format(self) -> str:
        lines = [
            f"study {self.study}: {self.total} cells, {self.done} computed, "
            f"{self.skipped_existing} already stored, "
            + (f"{self.by_others} computed by another runner, " if self.by_others else "")
            + f"{self.skipped} skipped (unavailable here), {self.failed} failed, "
            f"{self.seconds:.1f} s"
        ]
        if self.skip_reasons:
            lines.append("  skipped, and retried by the next run once what is missing is there:")
            for reason, n in self.skip_reasons.most_common():
                lines.append(f"    {n:5d} cells: {reason}")
        if self.worst:
            lines.append("  worst formulation per dtype (max forward ulp error, accuracy cells):")
            for dt, (impl, err) in sorted(self.worst.items()):
                lines.append(f"    {dt:9s} {impl:9s} {err:.3g} ulp")
        return "\n".join(lines)


def estimate_seconds(cells) -> float:
    """A rough time estimate for --dry-run, from per-kind costs measured on a 2-core machine."""
    return sum(kinds.get(c["kind"]).estimate_seconds(c) for c in cells)


def _exit_with_parent(parent_pid, interval=1.0):
    """Pool-worker initializer: a daemon thread ends the worker when its parent is gone (a
    killed runner would otherwise leave its spawned workers running)."""

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
            raise SystemExit(
                "--executor dask needs dask.distributed: pip install 'cestudy[dask]'"
            ) from None
        if executor == "dask":
            if not scheduler:
                raise SystemExit("--executor dask needs --scheduler ADDRESS")
            client = Client(scheduler)
            return (
                client.get_executor(),
                client.close,
                max(jobs, len(client.scheduler_info().get("workers", {})), 1),
            )
        cluster = LocalCluster(
            n_workers=max(jobs, 1), threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)

        def close():
            client.close()
            cluster.close()

        return client.get_executor(), close, max(jobs, 1)
    if jobs > 1:
        pool = cf.ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        )
        return pool, pool.shutdown, jobs
    return None, lambda: None, 1


class _Heartbeat:
    """Renews this runner's claims every lease / 4 seconds, on its own connection."""

    def __init__(self, path, owner, lease_s):
        self.path, self.owner, self.lease_s = path, owner, lease_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        store = Store(self.path)
        try:
            while not self.stop.wait(self.lease_s / 4):
                store.renew(self.owner, self.lease_s)
        finally:
            store.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_study(
    study: spec.Study,
    store: Store,
    *,
    jobs=1,
    executor="local",
    scheduler=None,
    force=False,
    quiet=False,
    lease_s: float | None = None,
) -> Summary:
    lease_s = LEASE_S if lease_s is None else lease_s
    cells = study.cells()
    version = code_version()
    keys = [cell_key(study.name, c, version) for c in cells]
    done = set() if force else store.done_keys(keys)
    todo = [(k, c) for k, c in zip(keys, cells) if k not in done]
    summary = Summary(study=study.name, total=len(cells), skipped_existing=len(cells) - len(todo))
    t0 = time.perf_counter()
    if todo:
        m = manifest.manifest()
        m["study_description"] = " ".join(study.description.split())
        m["study_file"] = Path(study.path).name
        run_id = store.start_run(study.name, m)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        since = now()
        run = _Run(study, store, version, run_id, summary, owner, lease_s, force, since)
        try:
            with _Heartbeat(store.path, owner, lease_s):
                _execute(run, todo, jobs, executor, scheduler, quiet)
        finally:
            store.release(owner)
        store.finish_run(run_id)
    summary.seconds = time.perf_counter() - t0
    summary.worst = _worst(store, study.name, version)
    return summary


def _progress(total, quiet, desc):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="cell",
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
    )


@dataclass
class _Run:
    """What every cell of one ``run_study`` call shares: where and as whom it is claimed and
    stored, and the summary its outcomes are counted in."""

    study: spec.Study
    store: Store
    version: str
    run_id: int
    summary: Summary
    owner: str
    lease_s: float
    force: bool
    since: str


def _record(run, key, cell, result):
    status, message, metrics = result
    run.store.put(key, run.study.name, cell, run.version, *result, run.run_id, owner=run.owner)
    summary = run.summary
    if status == "ok":
        summary.done += 1
    elif status == "skipped":
        summary.skipped += 1
        summary.skip_reasons[message.splitlines()[0] if message else "no reason given"] += 1
    else:
        summary.failed += 1


def _execute(run, todo, jobs, executor, scheduler, quiet):
    """Claim, compute and store the cells of ``todo`` until every one has an outcome (from this
    runner or another), keeping at most two cells per worker in flight."""
    pool, close, width = _executor(executor, jobs, scheduler)
    bar = _progress(len(todo), quiet, run.study.name)
    pending = collections.deque(todo)  # cells this runner has not claimed
    held = []  # cells another live runner holds: looked at again later
    futures = {}

    def claim_next():
        """The next cell this runner may compute, claimed; None if none is free now."""
        while pending:
            key, cell = pending.popleft()
            if run.store.claim(key, run.owner, run.lease_s, run.since, run.force):
                return key, cell
            if run.store.settled_keys([key], run.since, run.force):
                run.summary.by_others += 1  # another runner stored it meanwhile
                bar.update()
            else:
                held.append((key, cell))
        return None

    try:
        while True:
            while len(futures) < (2 * width if pool is not None else 1):
                nxt = claim_next()
                if nxt is None:
                    break
                key, cell = nxt
                if pool is None:
                    _record(run, key, cell, _guarded(cell))
                    bar.update()
                else:
                    futures[pool.submit(_guarded, cell)] = (key, cell)
            if futures:
                finished, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    key, cell = futures.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as exc:  # a worker died: record and go on
                        result = ("error", f"worker failure: {type(exc).__name__}: {exc}", None)
                    _record(run, key, cell, result)
                    bar.update()
            elif not held:
                break
            else:
                # only cells other runners hold are left: wait until they store them, or until
                # their leases expire (their runner died) and they can be claimed here
                time.sleep(min(1.0, run.lease_s / 10))
            pending.extend(held)
            held.clear()
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
