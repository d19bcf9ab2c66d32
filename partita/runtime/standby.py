"""Standby copies for fast failover: what each failure plan would ship, shipped ahead into the workers' caches.

With `Supervision(standby=True)` (`partita run --standby`, `partita serve --standby`), after the
first deploy and after every switch the supervisor asks its policy for the *failure plans*: for
each device of the running plan, the plan a failure of that device alone would switch to
(`ReplanPolicy.failure_plans`). `Standby.prepare` lists what those plans would load on each
surviving device; `Standby.ship` (in a helper thread, so failures are still handled meanwhile)
splits their stage programs into the switcher's library, so that a failover deploys the very
same archives, and stashes each on the device that would take it over (`Stash`: into its archive
cache, not loaded). When a device then fails and the figures have not moved, the failover's
transition finds every archive in place: it ships digests only, no bytes, and splits nothing.

The caches are bounded by the workers' memory (`partita.runtime.archives`): a device whose memory
is spoken for keeps fewer copies, and a failover that misses ships what is missing, as without
standby. Standby costs bytes on the links once per plan, and memory on the workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from partita.errors import DeployError
from partita.plan import Plan
from partita.plan.diff import diff_plans


@dataclass(frozen=True)
class StandbyCopy:
    """One archive to keep on `device`: the segments [start, end) of `plan`, needed if any of `failed` fails."""

    failed: tuple[str, ...]
    device: str
    segments: tuple[int, int]
    plan: Plan


def copies_for(current: Plan, failure_plans: Mapping[str, Plan]) -> list[StandbyCopy]:
    """What the failure plans would load on surviving devices: one copy per device and segments."""
    out: dict[tuple[str, tuple[int, int]], StandbyCopy] = {}
    for failed, plan in sorted(failure_plans.items()):
        for change in diff_plans(current, plan, gone=(failed,)).changes:
            if change.action != "load" or change.new_segments is None:
                continue
            key = (change.device, change.new_segments)
            known = out.get(key)
            if known is None:
                out[key] = StandbyCopy((failed,), change.device, change.new_segments, plan)
            else:  # the same archive serves several failures: one copy, split from the first plan
                out[key] = StandbyCopy((*known.failed, failed), known.device, known.segments, known.plan)
    return list(out.values())


class Standby:
    """Ships the standby copies of one pipeline (see the module docstring). `state()` says what is in place."""

    def __init__(self, switcher: Any, engine: Any) -> None:
        self._switcher = switcher
        self._engine = engine
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._state: dict[str, Any] = {"ready": False, "copies": [], "bytes": 0, "seconds": None, "error": None}
        self._shipping_since: float | None = None  # time.monotonic() while a ship runs
        self._shipped_until = float("-inf")  # when the last ship ended

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the copies for the running plan are in place (or failed to be); True if so."""
        return self._ready.wait(timeout_s)

    def state(self) -> dict[str, Any]:
        """ready, copies ([{"device", "segments", "for": the devices whose failure needs it}]), bytes sent,
        seconds taken, error (None: none)."""
        with self._lock:
            return {**self._state, "copies": list(self._state["copies"])}

    def shipped_during(self, start_s: float, end_s: float) -> bool:
        """True if copies were being made or sent at any time in [start_s, end_s] (time.monotonic seconds)."""
        since = self._shipping_since
        if since is not None and since <= end_s:
            return True
        return self._shipped_until >= start_s

    def reset(self) -> None:
        """A new plan runs: the standby is not ready until `ship` has run for it."""
        self._ready.clear()
        with self._lock:
            self._state = {"ready": False, "copies": [], "bytes": 0, "seconds": None, "error": None}

    def ship(self, scenarios: Any, is_current: Any = lambda: True) -> None:
        """Plan every failure (`FailureScenarios`, None: no plan runs), then split and stash the copies.

        Stops early once `is_current()` is False (a newer plan took over; its own standby follows).
        """
        started = time.perf_counter()
        sent, placed, error = 0, [], None
        self._shipping_since = time.monotonic()
        try:
            copies = [] if scenarios is None else copies_for(scenarios.current, scenarios.plans())
            for copy in copies:
                if not is_current():
                    return  # the plan changed: its own standby follows
                programs = self._switcher.programs_for(copy.plan)
                program = next(p for p in programs if (p.start, p.end) == copy.segments)
                sent += self._engine.stash(copy.device, program)
                if program.sha256 in self._engine.archives.get(copy.device, ()):
                    placed.append({"device": copy.device, "segments": list(copy.segments), "for": list(copy.failed)})
        except DeployError as exc:
            error = str(exc)  # a device that cannot take its copy: the failover ships it then, as without standby
        finally:
            self._shipped_until, self._shipping_since = time.monotonic(), None
        if not is_current():
            return
        with self._lock:
            self._state = {"ready": error is None, "copies": placed, "bytes": sent,
                           "seconds": time.perf_counter() - started, "error": error}
        self._ready.set()
