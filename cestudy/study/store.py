"""The results store: one embedded SQLite file (WAL mode), a row per cell, a manifest per run.

Each finished cell is committed at once, so a run killed at any point (Ctrl-C, kill -9, a crash)
loses no finished cell; the primary key (study, parameters, code version) makes a resumed run skip
what is done and makes duplicates impossible. Only the runner's main process writes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import sqlite3
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
"""


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


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # runs -----------------------------------------------------------------------------------
    def start_run(self, study: str, manifest: dict) -> int:
        cur = self.db.execute("INSERT INTO runs(study, started, manifest) VALUES (?, ?, ?)",
                              (study, _now(), json.dumps(json_safe(manifest), sort_keys=True)))
        self.db.commit()
        return cur.lastrowid

    def finish_run(self, run_id: int):
        self.db.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (_now(), run_id))
        self.db.commit()

    def runs(self):
        rows = self.db.execute("SELECT run_id, study, started, finished, manifest FROM runs "
                               "ORDER BY run_id").fetchall()
        return [dict(run_id=r[0], study=r[1], started=r[2], finished=r[3],
                     manifest=json.loads(r[4])) for r in rows]

    # cells ----------------------------------------------------------------------------------
    def done_keys(self, keys) -> set:
        """Keys already stored with status ok or skipped (errors are retried on resume)."""
        keys = list(keys)
        found = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = ("SELECT cell_key FROM cells WHERE status != 'error' AND cell_key IN (%s)"
                 % ",".join("?" * len(chunk)))
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    def put(self, key, study, params, code_version, status, message, metrics, run_id):
        """Insert or replace one cell and commit at once."""
        self.db.execute(
            "INSERT OR REPLACE INTO cells(cell_key, study, kind, params, code_version, status, "
            "message, metrics, run_id, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, study, params["kind"], canonical(params), code_version, status, message,
             None if metrics is None else json.dumps(json_safe(metrics), sort_keys=True), run_id,
             _now()))
        self.db.commit()

    def cells(self, study=None, kind=None):
        """All stored cells as dicts (params and metrics decoded), in key order."""
        q = "SELECT cell_key, study, kind, params, code_version, status, message, metrics, " \
            "run_id, finished FROM cells"
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
            out.append(dict(cell_key=r[0], study=r[1], kind=r[2], params=json.loads(r[3]),
                            code_version=r[4], status=r[5], message=r[6],
                            metrics=load_metrics(r[7]), run_id=r[8], finished=r[9]))
        return out

    def count(self, study=None):
        if study is None:
            return self.db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM cells WHERE study = ?",
                               (study,)).fetchone()[0]
