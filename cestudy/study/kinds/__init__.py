"""The study kinds, one module each; ``spec``, ``compute`` and ``runner`` enumerate ``KINDS``.

A kind module declares:

- ``NAME``: the ``kind = "..."`` of a study part;
- ``KEYS``: ``{key: cestudy.study.keys.Key}``, the keys a part of this kind takes, with their
  types, defaults and allowed values (and how old values migrate);
- ``SEED_FIELDS``: the cell fields that seed its random inputs (``inputs.rng``);
- ``normalise(cell) -> cell | None``: resets keys that do not apply and returns None for a
  combination that does not exist (the grid drops it);
- ``compute(cell) -> dict``: the cell's metrics; raises ``cestudy.backends.Skip`` when it cannot
  run here (a missing package, no GPU, no data);
- ``estimate_seconds(cell) -> float``: for ``run --dry-run``.

Adding a kind is one module here and one line below (and a report section).
"""

from __future__ import annotations

from types import ModuleType

from . import accuracy, higham, imbalance, linear, performance, training

KINDS: dict[str, ModuleType] = {
    m.NAME: m for m in (accuracy, imbalance, performance, training, higham, linear)
}


def get(name: str) -> ModuleType:
    """The kind module called ``name``; ValueError listing the kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown cell kind {name!r}; allowed: {', '.join(KINDS)}") from None


def migrate(kind: str, params: dict) -> dict:
    """``params`` with values used before a rename (legacy variant names) migrated; params of
    kinds this version does not know (the benchmark's) are returned as they are."""
    module = KINDS.get(kind)
    keys = module.KEYS if module is not None else {"variant": _VARIANT}
    out = dict(params)
    for k, v in params.items():
        key = keys.get(k)
        if key is not None and key.migrate is not None and isinstance(v, str):
            out[k] = key.migrate(v)
    return out


_VARIANT = accuracy.KEYS["variant"]
