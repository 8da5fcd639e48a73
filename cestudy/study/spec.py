"""Study files: TOML grids, validated strictly and expanded into cells.

A study file is data (read with ``tomllib``; nothing in it is executed)::

    name = "stability"
    description = "what is swept and why"

    [[part]]
    kind = "accuracy"        # accuracy | imbalance | performance | training | higham | linear
    variant = ["cross_entropy", "binary_cross_entropy_with_logits"]
    implementation = ["lse", "numba", "torch"]
    dtype = ["float32"]
    family = ["gaussian"]
    scale = [1.0, 100.0]
    classes = [10, 1000]

Every key of a part is a list (a scalar means a one-element list) and the part's cells are the
Cartesian product of its lists, minus combinations that do not apply (an implementation the
registry lacks for a variant; options a variant does not take are reset to their default and the
duplicates dropped). The keys of each kind, and what applies, are declared by its module in
``cestudy.study.kinds``. Variant names used before the registry (``ce_index``, ``bce_logits``,
...) are migrated to today's (``cestudy.variants.canonical_name``). Any unknown key, wrong type,
empty list or unknown name is a ``StudyError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import kinds
from .keys import Key

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
KINDS = {name: module.KEYS for name, module in kinds.KINDS.items()}
"""The keys of each kind, as the kind modules declare them."""
TOP_KEYS = {"name", "description", "part"}


class StudyError(ValueError):
    """A study file is malformed; the message names the file, the key and what is allowed."""


@dataclasses.dataclass
class Study:
    name: str
    description: str
    path: str
    parts: list[dict]

    def cells(self) -> list[dict]:
        """All cells of the study, in a stable order, without duplicates."""
        seen = set()
        out = []
        for part in self.parts:
            keys = sorted(k for k in part if k != "kind")
            for combo in itertools.product(*(part[k] for k in keys)):
                cell = {"kind": part["kind"], **dict(zip(keys, combo))}
                cell = _normalise(cell)
                if cell is None:
                    continue
                ident = tuple(sorted(cell.items()))
                if ident not in seen:
                    seen.add(ident)
                    out.append(cell)
        return out


def _normalise(cell):
    """Drop combinations that do not apply; reset options the variant does not take (each kind
    says how)."""
    return kinds.get(cell["kind"]).normalise(cell)


def _err(path, key, msg):
    return StudyError(f"{path}: key {key!r}: {msg}")


def _check_value(path, key, spec: Key, v):
    if spec.kind is str:
        if not isinstance(v, str):
            raise _err(path, key, f"expected a string, got {type(v).__name__} {v!r}")
        if spec.migrate is not None:
            v = spec.migrate(v)  # names used before a rename (ce_index -> cross_entropy)
        if spec.choices is not None and v not in spec.choices:
            raise _err(path, key, f"unknown value {v!r}; allowed: {', '.join(spec.choices)}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(path, key, f"expected a number, got {type(v).__name__} {v!r}")
    if spec.kind is int:
        if not float(v).is_integer():
            raise _err(path, key, f"expected an integer, got {v!r}")
        v = int(v)
    else:
        v = float(v)
        if not math.isfinite(v):
            raise _err(path, key, f"expected a finite number, got {v!r}")
    if spec.minimum is not None and v < spec.minimum:
        raise _err(path, key, f"must be >= {spec.minimum}, got {v!r}")
    return v


def parse(data: dict, path: str = "<study>") -> Study:
    """Validate a parsed TOML document and return the Study."""
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise _err(
            path,
            sorted(unknown)[0],
            f"unknown top-level key; allowed: {', '.join(sorted(TOP_KEYS))}",
        )
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str) or not name:
        raise _err(path, "name", "expected a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(path, "description", "expected a string")
    parts = data.get("part")
    if not isinstance(parts, list) or not parts:
        raise _err(path, "part", "expected at least one [[part]] table")
    out = []
    for i, part in enumerate(parts):
        where = f"part[{i}]"
        if not isinstance(part, dict):
            raise _err(path, where, "expected a table")
        kind = part.get("kind")
        if kind not in KINDS:
            raise _err(path, f"{where}.kind", f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        allowed = KINDS[kind]
        clean = {"kind": kind}
        for key, raw in part.items():
            if key == "kind":
                continue
            if key not in allowed:
                raise _err(
                    path,
                    f"{where}.{key}",
                    f"unknown key for kind {kind!r}; allowed: {', '.join(sorted(allowed))}",
                )
            values = raw if isinstance(raw, list) else [raw]
            if not values:
                raise _err(path, f"{where}.{key}", "empty list: the grid would have no cells")
            clean[key] = [_check_value(path, f"{where}.{key}", allowed[key], v) for v in values]
        for key, spec in allowed.items():
            clean.setdefault(key, [spec.default])
        out.append(clean)
    study = Study(name=name, description=description, path=str(path), parts=out)
    if not study.cells():
        raise _err(
            path,
            "part",
            "the grid has no applicable cells (no implementation in the "
            "registry for any listed variant)",
        )
    return study


def load(name_or_path: str) -> Study:
    """Load a study by name (a file in ``studies/``) or by the path of a TOML file."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = STUDIES_DIR / f"{name_or_path}.toml"
    if not p.exists():
        raise StudyError(f"{name_or_path}: no such study; known: {', '.join(list_names())}")
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, str(p))


def list_names() -> list[str]:
    if not STUDIES_DIR.is_dir():
        return []
    return sorted(f[:-5] for f in os.listdir(STUDIES_DIR) if f.endswith(".toml"))
