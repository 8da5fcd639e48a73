"""The keys a study part may hold: element type, default, allowed values, migration of old names.

Each kind in ``cestudy.study.kinds`` declares its keys with these; ``spec`` validates study files
against them and ``store`` migrates stored parameters with them. Nothing here knows a kind.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Key:
    """One allowed key of a part: its element type, default and allowed values."""

    kind: type
    default: object
    choices: tuple | None = None
    minimum: float | None = None
    migrate: Callable[[object], object] | None = None
    """Maps a value used before a rename (e.g. a legacy variant name) to today's value."""


def number(default: float, minimum: float | None = None) -> Key:
    return Key(float, default, None, minimum)


def integer(default: int, minimum: int = 1) -> Key:
    return Key(int, default, None, minimum)


def choice(default: str, choices, migrate=None) -> Key:
    return Key(str, default, tuple(choices), None, migrate)


SEED = {"seed": integer(0, 0)}
"""Every kind takes ``seed``."""
