"""Federated tasks: built-ins (`quadratic`, `synthetic`, `digits`) and the `Task` base for your own."""

from partita.fl.tasks.base import LocalData, Task
from partita.fl.tasks.registry import BUILTIN, get_task

__all__ = ["BUILTIN", "LocalData", "Task", "get_task"]
