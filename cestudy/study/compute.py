"""Computing one cell: its kind's ``compute`` (``cestudy.study.kinds``), timed.

``compute_cell(cell) -> dict`` is a top-level, picklable function: the serial runner, the local
process pool and Dask workers all call it. It never touches the results store. A cell that cannot
run here raises ``Skip`` (``cestudy.backends.Skip``, the package's one skip exception).
"""

from __future__ import annotations

import time

from ..backends import Skip
from . import kinds

__all__ = ["Skip", "compute_cell"]


def compute_cell(cell: dict) -> dict:
    kind = kinds.get(cell["kind"])
    t0 = time.perf_counter()
    out = kind.compute(cell)
    out["cell_seconds"] = time.perf_counter() - t0
    return out
