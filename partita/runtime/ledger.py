"""The coordinator's book of requests: every accepted request is kept until its answer is delivered.

All changes go through `Ledger.apply(event)`, called only from the coordinator's I/O thread, so
the whole life of a request can be read in one place:

    Accepted ──► Dispatched(epoch) ──► Delivered | Failed
                     ▲        │
                     └────────┘  Replayed(epoch): a new deployment resends what was in flight

A result is delivered once: a second answer for the same request (a replay racing the original)
is counted as a duplicate and dropped. An answer from another epoch than the one the request was
last dispatched in is stale and dropped too. Timestamps are `time.monotonic()` seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from partita.errors import RequestError


@dataclass(frozen=True)
class Accepted:
    request: int
    inputs: tuple[torch.Tensor, ...]
    future: Future
    at: float


@dataclass(frozen=True)
class Dispatched:
    request: int
    epoch: int
    at: float


@dataclass(frozen=True)
class Delivered:
    request: int
    epoch: int
    outputs: tuple[torch.Tensor, ...]
    at: float


@dataclass(frozen=True)
class Failed:
    request: int
    epoch: int | None  # None: fail regardless of epoch (e.g. no plan fits any more)
    error: str
    at: float


@dataclass(frozen=True)
class Replayed:
    """Every request in flight is to be sent again in `epoch` (after a re-plan: the new deployment resends them)."""

    epoch: int
    at: float


Event = Accepted | Dispatched | Delivered | Failed | Replayed


@dataclass
class Record:
    """One accepted request. `sent_at` is when it last entered the first link (latency starts there)."""

    request: int
    inputs: tuple[torch.Tensor, ...]
    future: Future
    accepted_at: float
    epoch: int | None = None
    sent_at: float | None = None
    attempts: int = 0


@dataclass
class Ledger:
    """Pending requests plus delivery figures (real seconds; the coordinator divides by the dilation)."""

    pending: dict[int, Record] = field(default_factory=dict)
    delivered: int = 0
    failed: int = 0
    duplicates: int = 0
    stale: int = 0
    latencies_s: list[float] = field(default_factory=list)
    delivered_at: list[float] = field(default_factory=list)
    first_sent_at: float | None = None
    in_flight: int = 0  # dispatched and not yet answered
    max_in_flight: int = 0

    def apply(self, event: Event) -> Record | None:
        """Record `event`; return the record it concerned when it changed one (None if dropped)."""
        match event:
            case Accepted():
                accepted = Record(event.request, event.inputs, event.future, event.at)
                self.pending[event.request] = accepted
                return accepted
            case Dispatched():
                record = self.pending.get(event.request)
                if record is None:
                    return None
                if record.epoch is None:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                record.epoch, record.sent_at = event.epoch, event.at
                record.attempts += 1
                if self.first_sent_at is None:
                    self.first_sent_at = event.at
                return record
            case Delivered():
                record = self._take(event.request, event.epoch)
                if record is None:
                    return None
                if not record.future.done():
                    record.future.set_result(event.outputs)
                self.delivered += 1
                self.delivered_at.append(event.at)
                if record.sent_at is not None:
                    self.latencies_s.append(event.at - record.sent_at)
                return record
            case Failed():
                record = self._take(event.request, event.epoch)
                if record is None:
                    return None
                if not record.future.done():
                    record.future.set_exception(RequestError(f"request {event.request} failed: {event.error}"))
                self.failed += 1
                return record
            case Replayed():
                for record in self.pending.values():
                    record.epoch = None
                self.in_flight = 0
                return None
        raise TypeError(f"unknown ledger event {event!r}")

    def _take(self, request: int, epoch: int | None) -> Record | None:
        record = self.pending.get(request)
        if record is None:
            self.duplicates += 1
            return None
        if epoch is not None and record.epoch is not None and record.epoch != epoch:
            self.stale += 1
            return None
        if record.epoch is not None:
            self.in_flight -= 1
        return self.pending.pop(request)

    def undispatched(self) -> Iterator[Record]:
        """Records waiting to be sent in the current epoch, oldest first."""
        return (r for r in sorted(self.pending.values(), key=lambda r: r.request) if r.epoch is None)

    def figures(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "pending": len(self.pending),
            "duplicates": self.duplicates,
            "stale": self.stale,
            "max_in_flight": self.max_in_flight,
        }
