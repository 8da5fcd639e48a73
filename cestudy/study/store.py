"""The results store: one embedded SQLite file (WAL mode), a row per cell, a manifest per run.

Each finished cell is committed at once, so a run killed at any point (Ctrl-C, kill -9, a crash)
loses no finished cell; the primary key (study, parameters, code version) makes a resumed run skip
what is done and makes duplicates impossible.

Three tables besides the runs:

- ``cells``: results (status ``ok``, or ``error`` with its message: errors are retried);
- ``skipped``: cells that could not run here (no torch, no GPU, no data), with the reason and
  the command that would enable them. They are not results: exports and reports never see them,
  so a run without torch never replaces committed torch results, and each run retries them;
- ``claims``: which runner is computing which cell, with a lease. Several runners on one store
  split the remaining cells: each claims a cell before computing it and renews its claims while
  it lives; a claim whose lease has expired (its runner died) can be taken by another runner.

A file that is not a cestudy store (not SQLite, truncated, another program's database) raises
``StoreError`` naming it and is never written to.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import math
import random
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    study      TEXT NOT NULL,
    started    TEXT NOT NULL,
    finished   TEXT,
    manifest   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    cell_key     TEXT PRIMARY KEY,
    study        TEXT NOT NULL,
    kind         TEXT NOT NULL,
    params       TEXT NOT NULL,
    code_version TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('ok', 'error', 'skipped')),
    message      TEXT,
    metrics      TEXT,
    run_id       INTEGER REFERENCES runs(run_id),
    finished     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_by_study ON cells(study, kind);
CREATE TABLE IF NOT EXISTS skipped (
    cell_key     TEXT PRIMARY KEY,
    study        TEXT NOT NULL,
    kind         TEXT NOT NULL,
    params       TEXT NOT NULL,
    code_version TEXT NOT NULL,
    reason       TEXT NOT NULL,
    run_id       INTEGER,
    finished     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    cell_key TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,
    expires  REAL NOT NULL
);
"""
TABLES = {"runs", "cells", "skipped", "claims", "sqlite_sequence"}


class StoreError(Exception):
    """The results file cannot be used as a store; the message names it."""


def canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def cell_key(study: str, params: dict, code_version: str) -> str:
    blob = canonical({"study": study, "params": params, "code": code_version})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def json_safe(obj):
    """JSON-safe metrics: non-finite floats become the strings 'inf', '-inf', 'nan' so the
    exports are standard JSON; ``load_metrics`` turns them back."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def load_metrics(text):
    if text is None:
        return {}
    d = json.loads(text)
    return {k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in d.items()}


# the columns that name a stored cell, first in every row read back, then a result's or a
# skip's own columns
_CELL_COLUMNS = ("cell_key", "study", "kind", "params", "code_version")
_RESULT_COLUMNS = ("status", "message", "metrics", "run_id", "finished")
_SKIP_COLUMNS = ("reason", "run_id", "finished")


def _columns(own) -> str:
    """The SELECT list of a cell's columns and then ``own``."""
    return ", ".join(_CELL_COLUMNS + own)


def _cell_dict(row, own) -> dict:
    """A row selected with ``_columns(own)`` as a dict in column order, params decoded."""
    d = dict(zip(_CELL_COLUMNS + own, row))
    d["params"] = json.loads(d["params"])
    return d


def migrate_params(kind: str, params: dict) -> dict:
    """Stored parameters with names used before a rename migrated (legacy variant names)."""
    from .kinds import migrate

    return migrate(kind, params)


def now() -> str:
    """The time stored with rows (UTC, ISO 8601, microseconds: runs of one second are told
    apart)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


# SQLite locks a database with POSIX advisory locks, which belong to the process: closing *any*
# descriptor of the file in this process drops every lock its connections hold, and another
# process's writer can then corrupt the file (sqlite.org/howtocorrupt.html, 2.2). So the header
# check, which opens and closes the file, runs only while this process has no connection to it
# (a runner's heartbeat thread opens a second one beside the runner's).
_CONNECTIONS: collections.Counter = collections.Counter()
_CONNECTIONS_LOCK = threading.Lock()


# How long opening a store retries a lock before it gives up (see Store._open).
_OPEN_RETRY_S = 30.0


class _OpenLocked(Exception):
    """Raised inside Store._open_once for a lock that a retry may clear."""


class Store:
    def __init__(self, path):
        self.path = Path(path)
        self._key = None
        with _CONNECTIONS_LOCK:
            key = self.path.resolve()
            if _CONNECTIONS[key] == 0:
                self._check_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
            self._key = key
            _CONNECTIONS[key] += 1

    def _open(self):
        """Open (creating if new) with retries: SQLite answers "database is locked" at once,
        without waiting on its busy timeout, when two processes switch a new file to WAL at the
        same instant, so a lock met while opening is retried for up to ``_OPEN_RETRY_S``."""
        deadline = time.monotonic() + _OPEN_RETRY_S
        while True:
            try:
                return self._open_once()
            except _OpenLocked as locked:
                if getattr(self, "db", None) is not None:
                    self.db.close()
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{self.path}: locked by another process ({locked.__cause__})"
                    ) from None
                time.sleep(0.05 + 0.1 * random.random())

    def _open_once(self):
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60)
            tables = {
                r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if tables and "cells" not in tables:
                self.db.close()
                raise StoreError(
                    f"{self.path}: an SQLite database, but not a cestudy results "
                    f"store (tables: {', '.join(sorted(tables))}); left unchanged"
                )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # in one transaction: a process opening the store meanwhile sees all the tables or
            # none (it took a half-made schema for another program's database)
            self.db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
            self.db.commit()
            self._migrate()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise _OpenLocked() from exc
            raise StoreError(f"{self.path}: cannot be opened ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path}: not a readable cestudy results store ({exc}); "
                f"left unchanged: move it away or pass another --results"
            ) from None

    def _check_file(self):
        """Refuse, before SQLite opens it, a file that is not an SQLite database."""
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a results store")
        with open(self.path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise StoreError(
                f"{self.path}: not an SQLite file, so not a cestudy results store; "
                f"left unchanged: move it away or pass another --results"
            )

    def _migrate(self):
        """Stores written before this version: legacy variant names become today's (with the
        cell key recomputed, so results keep matching), and cells stored as skipped move to the
        ``skipped`` table (they are retried, not results)."""
        with self.db:
            # the write lock first: a deferred transaction that reads, then writes after another
            # process committed, gets SQLITE_BUSY at once instead of waiting its turn
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT OR IGNORE INTO skipped(cell_key, study, kind, params, "
                "code_version, reason, run_id, finished) SELECT cell_key, study, "
                "kind, params, code_version, COALESCE(message, ''), run_id, finished "
                "FROM cells WHERE status = 'skipped'"
            )
            self.db.execute("DELETE FROM cells WHERE status = 'skipped'")
            for table in ("cells", "skipped"):
                rows = self.db.execute(
                    f"SELECT cell_key, study, kind, params, code_version FROM {table}"
                ).fetchall()
                for key, study, kind, params, version in rows:
                    p = json.loads(params)
                    new = migrate_params(kind, p)
                    if new != p:
                        self.db.execute(
                            f"UPDATE OR REPLACE {table} SET cell_key = ?, params = ? "
                            f"WHERE cell_key = ?",
                            (cell_key(study, new, version), canonical(new), key),
                        )

    def close(self):
        if self._key is None:  # closed already
            return
        self.db.close()
        with _CONNECTIONS_LOCK:
            _CONNECTIONS[self._key] -= 1
            if _CONNECTIONS[self._key] <= 0:
                del _CONNECTIONS[self._key]
        self._key = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # runs -----------------------------------------------------------------------------------
    def start_run(self, study: str, manifest: dict) -> int:
        cur = self.db.execute(
            "INSERT INTO runs(study, started, manifest) VALUES (?, ?, ?)",
            (study, now(), json.dumps(json_safe(manifest), sort_keys=True)),
        )
        self.db.commit()
        return cur.lastrowid

    def finish_run(self, run_id: int, manifest: dict | None = None):
        """Mark run ``run_id`` finished; ``manifest``'s keys, when given, are set in (or added to)
        the manifest :meth:`start_run` recorded (what only the run's end knows)."""
        if manifest:
            (text,) = self.db.execute(
                "SELECT manifest FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            merged = {**json.loads(text), **json_safe(manifest)}
            self.db.execute(
                "UPDATE runs SET manifest = ? WHERE run_id = ?",
                (json.dumps(merged, sort_keys=True), run_id),
            )
        self.db.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (now(), run_id))
        self.db.commit()

    def runs(self):
        rows = self.db.execute(
            "SELECT run_id, study, started, finished, manifest FROM runs ORDER BY run_id"
        ).fetchall()
        return [
            dict(run_id=r[0], study=r[1], started=r[2], finished=r[3], manifest=json.loads(r[4]))
            for r in rows
        ]

    # cells ----------------------------------------------------------------------------------
    def done_keys(self, keys) -> set:
        """Keys stored with status ok (errors and skipped cells are retried on resume)."""
        keys = list(keys)
        found = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = "SELECT cell_key FROM cells WHERE status = 'ok' AND cell_key IN (%s)" % ",".join(
                "?" * len(chunk)
            )
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    def put(self, key, study, params, code_version, status, message, metrics, run_id, owner=None):
        """Store one cell's outcome and release its claim, in one transaction: ``ok`` and
        ``error`` go to ``cells``, ``skipped`` (with its reason) to ``skipped``."""
        with self.db:
            if status == "skipped":
                self.db.execute(
                    "INSERT OR REPLACE INTO skipped(cell_key, study, kind, params, code_version, "
                    "reason, run_id, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        study,
                        params["kind"],
                        canonical(params),
                        code_version,
                        message or "",
                        run_id,
                        now(),
                    ),
                )
            else:
                self.db.execute(
                    "INSERT OR REPLACE INTO cells(cell_key, study, kind, params, code_version, "
                    "status, message, metrics, run_id, finished) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        study,
                        params["kind"],
                        canonical(params),
                        code_version,
                        status,
                        message,
                        None if metrics is None else json.dumps(json_safe(metrics), sort_keys=True),
                        run_id,
                        now(),
                    ),
                )
                self.db.execute("DELETE FROM skipped WHERE cell_key = ?", (key,))
            if owner is not None:
                self.db.execute("DELETE FROM claims WHERE cell_key = ? AND owner = ?", (key, owner))

    def cells(self, study=None, kind=None):
        """All stored results as dicts (params and metrics decoded), in key order."""
        q = f"SELECT {_columns(_RESULT_COLUMNS)} FROM cells"
        cond, args = [], []
        if study is not None:
            cond.append("study = ?")
            args.append(study)
        if kind is not None:
            cond.append("kind = ?")
            args.append(kind)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        q += " ORDER BY study, cell_key"
        out = []
        for r in self.db.execute(q, args):
            d = _cell_dict(r, _RESULT_COLUMNS)
            d["metrics"] = load_metrics(d["metrics"])
            out.append(d)
        return out

    def skipped(self, study=None):
        """Cells that could not run here, with their reasons (not results)."""
        q = f"SELECT {_columns(_SKIP_COLUMNS)} FROM skipped"
        args = []
        if study is not None:
            q += " WHERE study = ?"
            args.append(study)
        return [
            _cell_dict(r, _SKIP_COLUMNS)
            for r in self.db.execute(q + " ORDER BY study, cell_key", args)
        ]

    def count(self, study=None):
        if study is None:
            return self.db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM cells WHERE study = ?", (study,)).fetchone()[0]

    # claims ---------------------------------------------------------------------------------
    def settled_keys(self, keys, since: str, force: bool = False) -> set:
        """Of ``keys``, those with an outcome this run need not compute again: stored ``ok``
        (unless ``force``), or stored in any way (ok, error, skipped) at or after ``since``
        (by another runner of the same moment)."""
        keys = list(keys)
        found = set()
        ok = "0" if force else "status = 'ok'"
        for i in range(0, len(keys), 400):
            chunk = keys[i : i + 400]
            marks = ",".join("?" * len(chunk))
            q = (
                f"SELECT cell_key FROM cells WHERE cell_key IN ({marks}) AND ({ok} OR "
                f"finished >= ?) UNION SELECT cell_key FROM skipped WHERE cell_key IN "
                f"({marks}) AND finished >= ?"
            )
            found.update(r[0] for r in self.db.execute(q, [*chunk, since, *chunk, since]))
        return found

    def claim(self, key: str, owner: str, lease_s: float, since: str, force: bool = False) -> bool:
        """Claim cell ``key`` for ``owner`` unless it is settled (``settled_keys``) or another
        live runner holds it. Atomic across processes (one write transaction)."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            held = self.db.execute(
                "SELECT owner, expires FROM claims WHERE cell_key = ?", (key,)
            ).fetchone()
            if (held and held[0] != owner and held[1] > now) or self.settled_keys(
                [key], since, force
            ):
                self.db.execute("COMMIT")
                return False
            self.db.execute(
                "INSERT OR REPLACE INTO claims(cell_key, owner, expires) VALUES (?, ?, ?)",
                (key, owner, now + lease_s),
            )
            self.db.execute("COMMIT")
            return True
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def claimed_by_others(self, keys, owner: str) -> set:
        """Of ``keys``, those another runner holds under a live lease."""
        keys = list(keys)
        now = time.time()
        found = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = (
                "SELECT cell_key FROM claims WHERE owner != ? AND expires > ? AND cell_key IN "
                "(%s)" % ",".join("?" * len(chunk))
            )
            found.update(r[0] for r in self.db.execute(q, [owner, now, *chunk]))
        return found

    def renew(self, owner: str, lease_s: float):
        """Extend every claim of ``owner`` (its heartbeat)."""
        with self.db:
            self.db.execute(
                "UPDATE claims SET expires = ? WHERE owner = ?", (time.time() + lease_s, owner)
            )

    def release(self, owner: str, key: str | None = None):
        with self.db:
            if key is None:
                self.db.execute("DELETE FROM claims WHERE owner = ?", (owner,))
            else:
                self.db.execute("DELETE FROM claims WHERE owner = ? AND cell_key = ?", (owner, key))
