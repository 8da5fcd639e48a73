"""Study files: TOML grids, validated strictly and expanded into cells.

A study file is data (read with ``tomllib``; nothing in it is executed)::

    name = "stability"
    description = "what is swept and why"

    [[part]]
    kind = "accuracy"                 # accuracy | imbalance | performance | higham
    variant = ["ce_index", "bce_logits"]
    implementation = ["lse", "numba", "torch"]
    dtype = ["float32"]
    family = ["gaussian"]
    scale = [1.0, 100.0]
    classes = [10, 1000]

Every key of a part is a list (a scalar means a one-element list) and the part's cells are the
Cartesian product of its lists, minus combinations that do not apply (an implementation the
registry lacks for a variant; options a variant does not take are reset to their default and the
duplicates dropped). Any unknown key, wrong type, empty list or unknown name is a ``StudyError``
naming the file, the key and what is allowed.
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

from .. import dtypes
from ..reference.implementations import IMPLEMENTATION_NAMES, for_variant
from ..variants import LEGACY_NAMES, canonical_name

VARIANTS = tuple(LEGACY_NAMES)  # migrated to the registry names by the study rewrite

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
FAMILIES = ("gaussian", "equal_offset", "dominant", "masked", "near_overflow", "nan_inf")
PROFILES = ("step", "exp")
CLASS_WEIGHTS = ("none", "inverse", "effective")
MODES = ("forward", "forward_grad")
HIGHAM_FORMULATIONS = ("basic", "shifted")


class StudyError(ValueError):
    """A study file is malformed; the message names the file, the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One allowed key of a part: its element type, allowed values and default."""

    kind: type
    default: object
    choices: tuple | None = None
    minimum: float | None = None


def _num(default, minimum=None):
    return Key(float, default, None, minimum)


def _int(default, minimum=1):
    return Key(int, default, None, minimum)


COMMON = {"seed": _int(0, 0)}
KINDS = {
    "accuracy": {
        "variant": Key(str, "ce_index", tuple(VARIANTS)),
        "implementation": Key(str, "numba", IMPLEMENTATION_NAMES),
        "dtype": Key(str, "float32", dtypes.DTYPE_NAMES),
        "family": Key(str, "gaussian", FAMILIES),
        "scale": _num(1.0, 0.0),
        "classes": _int(10, 2),
        "batch": _int(64),
        "label_smoothing": _num(0.0, 0.0),
        "class_weight": Key(str, "none", CLASS_WEIGHTS),
        "clip_eps": _num(1e-7, 0.0),
        "gamma": _num(2.0, 0.0),
        "imbalance": _num(1.0, 1.0),
        "profile": Key(str, "step", PROFILES),
        "ignore_fraction": _num(0.0, 0.0),
        **COMMON,
    },
    "imbalance": {
        "variant": Key(str, "ce_index", ("ce_index", "focal_softmax")),
        "class_weight": Key(str, "none", CLASS_WEIGHTS),
        "classes": _int(10, 2),
        "imbalance": _num(1.0, 1.0),
        "profile": Key(str, "step", PROFILES),
        "gamma": _num(2.0, 0.0),
        "beta": _num(0.999, 0.0),
        "batch": _int(4096),
        **COMMON,
    },
    "performance": {
        "variant": Key(str, "ce_index", ("ce_index", "ce_prob", "bce_logits")),
        "implementation": Key(str, "numba", IMPLEMENTATION_NAMES),
        "dtype": Key(str, "float32", ("float32", "float64")),
        "mode": Key(str, "forward", MODES),
        "batch": _int(256),
        "classes": _int(1000, 2),
        "repeats": _int(5),
        **COMMON,
    },
    "training": {
        "dataset": Key(str, "digits", ("digits", "breast_cancer")),
        "model": Key(str, "logreg", ("logreg", "mlp")),
        "optimizer": Key(str, "lbfgs", ("gd", "lbfgs")),
        "loss": Key(str, "ce", ("ce", "ce_inverse", "ce_effective", "focal1", "focal2", "smooth",
                                "naive", "clipped", "sklearn", "sklearn_balanced")),
        "dtype": Key(str, "float32", dtypes.DTYPE_NAMES),
        "imbalance": _num(1.0, 1.0),
        "profile": Key(str, "step", PROFILES),
        "epochs": _int(30),
        "lr": _num(0.5, 0.0),
        "batch": _int(64),
        "C": _num(1.0, 0.0),
        **COMMON,
    },
    "higham": {
        "dtype": Key(str, "float16", ("float16", "bfloat16")),
        "formulation": Key(str, "basic", HIGHAM_FORMULATIONS),
        "data": Key(str, "", None),
        **COMMON,
    },
}
TOP_KEYS = {"name", "description", "part"}
# options that only some variants take; elsewhere they are reset to their default
VARIANT_OPTIONS = {
    "label_smoothing": ("ce_index", "ce_prob"),
    "class_weight": ("ce_index", "ce_prob", "focal_softmax"),
    "gamma": ("focal_softmax", "focal_sigmoid"),
    "ignore_fraction": ("ce_index", "focal_softmax"),
    "imbalance": ("ce_index", "focal_softmax", "bce_logits", "focal_sigmoid"),
    "profile": ("ce_index", "focal_softmax", "bce_logits", "focal_sigmoid"),
}


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
    """Drop combinations that do not apply; reset options the variant does not take."""
    kind = cell["kind"]
    if kind in ("accuracy", "performance"):
        if cell["implementation"] not in for_variant(canonical_name(cell["variant"])):
            return None
    if kind == "accuracy":
        for opt, variants in VARIANT_OPTIONS.items():
            if cell["variant"] not in variants:
                cell[opt] = KINDS["accuracy"][opt].default
        if cell["implementation"] != "clipped":
            cell["clip_eps"] = KINDS["accuracy"]["clip_eps"].default
        if cell["family"] in ("near_overflow", "nan_inf", "masked"):
            cell["scale"] = cell["scale"] if cell["family"] == "masked" else 1.0
    if kind == "training":
        if cell["loss"].startswith("sklearn"):
            cell.update(model="logreg", optimizer="lbfgs", dtype="float64")
        if cell["model"] == "mlp" and cell["optimizer"] == "lbfgs":
            return None
        if cell["optimizer"] == "lbfgs":
            cell.update(lr=KINDS["training"]["lr"].default,
                        batch=KINDS["training"]["batch"].default)
    if kind in ("training", "imbalance") and cell["imbalance"] == 1.0:
        cell["profile"] = "step"  # with no imbalance the profiles coincide
    return cell


def _err(path, key, msg):
    return StudyError(f"{path}: key {key!r}: {msg}")


def _check_value(path, key, spec: Key, v):
    if spec.kind is str:
        if not isinstance(v, str):
            raise _err(path, key, f"expected a string, got {type(v).__name__} {v!r}")
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
        raise _err(path, sorted(unknown)[0], f"unknown top-level key; allowed: "
                   f"{', '.join(sorted(TOP_KEYS))}")
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
            raise _err(path, f"{where}.kind", f"unknown kind {kind!r}; allowed: "
                       f"{', '.join(KINDS)}")
        allowed = KINDS[kind]
        clean = {"kind": kind}
        for key, raw in part.items():
            if key == "kind":
                continue
            if key not in allowed:
                raise _err(path, f"{where}.{key}", f"unknown key for kind {kind!r}; allowed: "
                           f"{', '.join(sorted(allowed))}")
            values = raw if isinstance(raw, list) else [raw]
            if not values:
                raise _err(path, f"{where}.{key}", "empty list: the grid would have no cells")
            clean[key] = [_check_value(path, f"{where}.{key}", allowed[key], v) for v in values]
        for key, spec in allowed.items():
            clean.setdefault(key, [spec.default])
        out.append(clean)
    study = Study(name=name, description=description, path=str(path), parts=out)
    if not study.cells():
        raise _err(path, "part", "the grid has no applicable cells (no implementation in the "
                   "registry for any listed variant)")
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
