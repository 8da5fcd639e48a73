"""Results as flat rows: export from the store, and load from a store or an export.

A row is one cell: study, kind, status, message, code_version, run_id, every parameter under
``p_<name>`` and every metric under its own name. When the same cell was computed by several code
versions, only the most recently finished is kept.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .. import variants
from ..study.store import Store, canonical, json_safe


def canonical_row(row: dict) -> dict:
    """``row`` with its variant under the registry's name (results stored before the registry
    existed call ``cross_entropy`` ``ce_index``, and so on)."""
    v = row.get("p_variant")
    if isinstance(v, str) and variants.canonical_name(v) != v:
        row = dict(row, p_variant=variants.canonical_name(v))
    return row


def torch_speedup(row: dict, torch_median_s: float | None) -> float:
    """torch's median time over ``row``'s (above 1: ``row`` is faster): from the torch timing
    interleaved with the row's own when it has one (``speedup_vs_torch``: the bench's groups,
    the performance study's paired cells), else from ``torch_median_s``, torch's own cell of
    the same shape, timed apart (NaN without either)."""
    paired = row.get("speedup_vs_torch")
    if paired is not None and paired == paired:
        return float(paired)
    return torch_median_s / row["median_s"] if torch_median_s else math.nan


def _shape_and_run(row: dict) -> tuple:
    return (
        row["p_variant"],
        row["p_dtype"],
        row["p_mode"],
        row["p_batch"],
        row["p_classes"],
        row.get("run_id"),
    )


def torch_medians(rows) -> dict:
    """torch's median time of each timed shape, by shape and run (:func:`vs_torch`'s table)."""
    return {_shape_and_run(r): r["median_s"] for r in rows if r["p_implementation"] == "torch"}


def vs_torch(row: dict, medians: dict) -> float:
    """:func:`torch_speedup` of ``row``: its paired ratio, else torch's cell of the same shape
    from the same run (``medians``, :func:`torch_medians`), never one timed in another run: a
    row re-run on a busy machine against torch's row from a quiet one would give a ratio
    neither run saw."""
    return torch_speedup(row, medians.get(_shape_and_run(row)))


def export_rows(store: Store, study=None) -> list[dict]:
    latest = {}
    for c in store.cells(study=study):
        ident = (c["study"], canonical(c["params"]))
        if ident not in latest or c["finished"] >= latest[ident]["finished"]:
            latest[ident] = c
    rows = []
    for (study_name, _), c in sorted(latest.items()):
        row = {
            "study": c["study"],
            "kind": c["kind"],
            "status": c["status"],
            "message": (c["message"] or "").splitlines()[0] if c["message"] else "",
            "run_id": c["run_id"],
            "code_version": c["code_version"],
        }
        row.update({f"p_{k}": v for k, v in c["params"].items() if k != "kind"})
        for k, v in c["metrics"].items():
            row[k] = v
        rows.append(row)
    return rows


def export_document(store: Store) -> dict:
    """Everything the reports need: rows and the manifests of the runs they come from."""
    rows = export_rows(store)
    used = {r["run_id"] for r in rows}
    runs = [r for r in store.runs() if r["run_id"] in used]
    return {"format": "cestudy-results-1", "runs": runs, "cells": rows}


SETTINGS = ("p_repeats",)
"""Cell parameters that say how a result was measured rather than what: ignored when an export
is merged into an earlier one."""


def merge_documents(previous: dict, local: dict) -> dict:
    """The union of an earlier export and the local store's export: local cells replace the same
    (study, parameters) from before, so running one study never drops the others' committed
    results. Earlier runs keep their manifests under run ids moved past the local ones."""
    offset = max([r["run_id"] for r in local["runs"]] + [0]) + 1000
    ids = {r["run_id"]: r["run_id"] + offset for r in previous.get("runs", [])}

    def key(row):
        # what was measured, not how often: a timing re-run with another repeat count replaces
        # the earlier one instead of standing beside it
        row = canonical_row(row)
        return (
            row["study"],
            canonical({k: v for k, v in row.items() if k.startswith("p_") and k not in SETTINGS}),
            row["kind"],
        )

    local_keys = {key(r) for r in local["cells"]}
    kept = []
    for row in previous.get("cells", []):
        if key(row) not in local_keys:
            row = dict(row)
            row["run_id"] = ids.get(row["run_id"], row["run_id"])
            kept.append(row)
    used = {r["run_id"] for r in kept}
    runs = [
        dict(r, run_id=ids[r["run_id"]])
        for r in previous.get("runs", [])
        if ids[r["run_id"]] in used
    ]
    cells = sorted(local["cells"] + kept, key=lambda r: (r["study"], key(r)[1]))
    return {"format": local["format"], "runs": local["runs"] + runs, "cells": cells}


def write_export(store: Store, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json_safe(export_document(store))
    if path.exists():
        doc = merge_documents(json.loads(path.read_text()), doc)
    # one cell per line keeps diffs readable
    text = json.dumps(
        doc, sort_keys=True, allow_nan=False, default=str, indent=None, separators=(",", ":")
    )
    path.write_text(text.replace('},{"', '},\n{"') + "\n")
    return path


def load_document(source) -> dict:
    """Load rows and runs from a SQLite store or a JSON export, variants under their registry
    names."""
    source = Path(source)
    if source.suffix == ".json":
        doc = json.loads(source.read_text())
        for row in doc["cells"]:
            for k, v in list(row.items()):
                if v in ("inf", "-inf", "nan") and not k.startswith("p_"):
                    row[k] = float(v)
    else:
        with Store(source) as store:
            doc = export_document(store)
    doc["cells"] = [canonical_row(r) for r in doc["cells"]]
    return doc


def rows_to_csv(rows) -> str:
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()
