"""Resolve a task name: a built-in (`quadratic`, `synthetic`, `digits`) or `package.module:Attr`.

`Attr` is a `Task` subclass (or any callable returning a `Task`) importable on every client; it is called
with the task options (`num_clients`, `seed`, and its own, e.g. `alpha`).
"""

from __future__ import annotations

import importlib

from partita.errors import FLError
from partita.fl.tasks.base import Task

BUILTIN = {
    "quadratic": "partita.fl.tasks.quadratic:Quadratic",
    "synthetic": "partita.fl.tasks.synthetic:Synthetic",
    "digits": "partita.fl.tasks.digits:Digits",
}


def _import(ref: str):
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise FLError(
            f"Task {ref!r} is neither a built-in ({', '.join(BUILTIN)}) nor of the form package.module:Task."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # name the module the user must install on every client
        raise FLError(
            f"Task {ref!r}: cannot import {module_name!r} ({exc}); install it where clients run."
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:  # a typo in the attribute; say which module was searched
        raise FLError(f"Task {ref!r}: module {module_name!r} has no attribute {attr!r}.") from exc


def get_task(name: str, **options) -> Task:
    """Build the task `name` with `options`; FLError for unknown names, bad options or a non-Task result."""
    factory = _import(BUILTIN.get(name, name))
    try:
        task = factory(**options)
    except TypeError as exc:  # unknown option names surface here; report them with the task name
        raise FLError(f"Task {name!r} does not accept options {sorted(options)}: {exc}") from exc
    if not isinstance(task, Task):
        raise FLError(f"Task {name!r} built a {type(task).__name__}, not a partita.fl.tasks.Task.")
    return task
