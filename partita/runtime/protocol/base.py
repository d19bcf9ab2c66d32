"""What every control message shares: the `Command` and `Reply` base classes and the field checks.

Each check names the message kind and the field it refuses, so a malformed header becomes one
`WorkerError` that the worker answers with an `error` reply (see `partita.runtime.protocol`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from partita.errors import WorkerError

FL_TRAIN = "fl-train"
FL_UPDATE = "fl-update"


# -- field checks: each names the command and the field it refuses ----------------------------------
def check_int(kind: str, name: str, value: object, *, low: int | None = None) -> int:
    if type(value) is not int or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise WorkerError(f"{kind} needs integer {name!r}{bound}, got {value!r}")
    return value


def check_number(kind: str, name: str, value: object, *, optional: bool = False, positive: bool = False) -> float | None:
    if value is None and optional:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
        sign = "> 0" if positive else ">= 0"
        raise WorkerError(f"{kind}'s {name!r} must be a number {sign}{' or null' if optional else ''}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_str(kind: str, name: str, value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise WorkerError(f"{kind} needs string {name!r}, got {value!r}")
    return value


def check_strs(kind: str, name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WorkerError(f"{kind}'s {name!r} must be a list of strings, got {value!r}")
    return tuple(value)


def check_map(kind: str, name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise WorkerError(f"{kind}'s {name!r} must be a map, got {value!r}")
    return value


# -- the base classes -------------------------------------------------------------------------------
class Command:
    """A control command. `header()` and `tensors()` are what goes on the wire; `parse` checks a message."""

    KIND: ClassVar[str]

    def header(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Command:
        return cls()


class Reply(Command):
    """A reply to a command: the same shape (a kind, a header, tensors)."""


def check_named_arrays(
    kind: str, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...], section: str
) -> tuple[tuple[str, ...], Mapping[str, Any], dict[str, Any]]:
    """An FL message's parts: `arrays` (one name per tensor), its `section` map, and the other header keys."""
    arrays = check_strs(kind, "arrays", header.get("arrays", []))
    if len(arrays) != len(tensors):
        raise WorkerError(f"{kind} names {len(arrays)} arrays but carries {len(tensors)} tensors")
    extra = {k: v for k, v in header.items() if k not in ("arrays", section, "id")}
    return arrays, check_map(kind, section, header.get(section, {})), extra
