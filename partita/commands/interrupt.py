"""Ctrl-C for the commands that run a cluster: say what is being stopped, stop soon, exit 130.

The first Ctrl-C prints one line — what is being stopped, from `describe()`, e.g. "stopping:
draining 12 requests, stopping 3 workers… (Ctrl-C again to stop at once)" — and raises
KeyboardInterrupt in the main thread, so the command leaves its `with` blocks: the pipeline is
drained for at most `DRAIN_S` and closed, the workers this machine started are stopped, and the
command exits with 130 (128 + SIGINT, what a shell expects of a program stopped by Ctrl-C;
`exit_interrupted`).
A second Ctrl-C stops at once: `kill()` ends the workers this machine started, and the process
exits 130 without any further clean-up.

The workers a LocalCluster starts are in process groups of their own, so a terminal's Ctrl-C
reaches only the command, which stops them in order (partita.runtime.local).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from partita.errors import PartitaError

#: Exit status of a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
#: How long the requests in flight may take to come back after the first Ctrl-C (seconds).
DRAIN_S = 2.0


class Stopping:
    """What a command running on a cluster holds, so a Ctrl-C can say what it stops and stop it."""

    def __init__(self) -> None:
        self.cluster: Any = None  # the cluster handle (its workers are counted and, at need, killed)
        self.pipe: Any = None  # the running Pipeline, if any (its requests in flight are counted)

    def describe(self) -> str:
        parts = []
        in_flight = getattr(self.pipe, "in_flight", None) if self.pipe is not None else None
        if in_flight is not None:
            parts.append(f"draining {in_flight} request{'s' if in_flight != 1 else ''}")
        workers = len(_processes(self.cluster))
        if workers:
            parts.append(f"stopping {workers} worker{'s' if workers != 1 else ''}")
        return "stopping: " + (", ".join(parts) if parts else "closing the cluster") + "…"

    def kill(self) -> None:
        """End every worker process this machine started, at once (SIGKILL), and remove their throwaway keys."""
        for proc in _processes(self.cluster):
            if proc.poll() is None:
                proc.kill()
        local = getattr(self.cluster, "local", self.cluster)
        try:
            workdir = local.workdir
        except (AttributeError, PartitaError):  # no cluster of this machine's, or it is not running
            return
        shutil.rmtree(workdir, ignore_errors=True)


def exit_interrupted() -> None:
    """End this process with EXIT_INTERRUPTED now that it has cleaned up.

    `os._exit`, not `sys.exit`: the interpreter's exit would walk torch's object graph once more,
    seconds on a loaded host, between the user's Ctrl-C and the prompt.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _processes(cluster: Any) -> list[Any]:
    """The worker processes this machine started for `cluster` (a LocalCluster's, or a MixedCluster's local ones)."""
    local = getattr(cluster, "local", cluster)
    processes = getattr(local, "processes", None)
    return list(processes.values()) if isinstance(processes, dict) else []


@contextmanager
def interruptible(stopping: Stopping, say: Callable[[str], None] | None = None) -> Iterator[Stopping]:
    """Handle Ctrl-C as the module docstring says while the block runs; the caller exits with EXIT_INTERRUPTED.

    Outside the main thread (where Python cannot install signal handlers) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            say(stopping.describe() + " (Ctrl-C again to stop at once)")
            raise KeyboardInterrupt
        # Straight to the file descriptor: this handler may run inside the command's own print (Rich
        # buffers a print while a progress bar ends), and os._exit below would drop what sits in a
        # buffer; flushing a buffered stream from here could itself fail as a reentrant call.
        os.write(sys.stderr.fileno(), b"stopping at once\n")
        stopping.kill()
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGINT, previous)
