"""A worker's cache of stage archives, by sha256: a stage moved back to a device that held it ships nothing.

Every archive a worker is sent (`Load` with its bytes, or `Stash` for a standby copy) is kept here
under its sha256 after the digest is checked. A later `Load` that carries only the digest loads
from the cache. The cache is bounded by the worker's memory: it holds at most `budget()` bytes
(the worker's capacity less what its loaded stages take), and evicts the least recently used
archives first when a new one, or a newly loaded stage, needs the room. An archive larger than
the whole budget is not kept.

The cache holds bytes only: nothing is deserialized until a stage is loaded from it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from partita.errors import WorkerError


class ArchiveCache:
    """Stage archives by sha256, least recently used evicted first (see the module docstring).

    `budget()` is the number of bytes the cache may hold now (read at every change).
    """

    def __init__(self, budget: Callable[[], float]) -> None:
        self._budget = budget
        self._archives: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(len(data) for data in self._archives.values())

    def digests(self) -> list[str]:
        """The sha256 of every archive held, least recently used first."""
        with self._lock:
            return list(self._archives)

    def get(self, sha256: str) -> bytes | None:
        """The archive with this digest (now the most recently used), or None when it is not held."""
        with self._lock:
            data = self._archives.get(sha256)
            if data is not None:
                self._archives.move_to_end(sha256)
            return data

    def put(self, data: bytes, sha256: str) -> bool:
        """Keep `data` under `sha256` (WorkerError when the digest is wrong); False when it does not fit at all."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise WorkerError(f"archive sha256 mismatch: expected {sha256}, got {actual}; it was damaged on the way")
        with self._lock:
            self._archives.pop(sha256, None)
            if len(data) > self._budget():
                self._shrink()
                return False
            self._archives[sha256] = data
            self._shrink()
            return sha256 in self._archives

    def shrink(self) -> None:
        """Evict least recently used archives until the cache fits its budget (after a stage was loaded)."""
        with self._lock:
            self._shrink()

    def _shrink(self) -> None:
        budget = self._budget()
        total = sum(len(data) for data in self._archives.values())
        while self._archives and total > budget:
            _, data = self._archives.popitem(last=False)
            total -= len(data)
