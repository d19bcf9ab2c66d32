"""Carrying out a re-plan on a running pipeline: a new epoch, only changed stages shipped, requests replayed.

`Switcher.switch(decision)` is the transition from the current deployment to `decision.plan`
(`partita.runtime.transition`), in three steps, so the pipeline's I/O thread (which owns the
ledger and the sockets) is never blocked while stages travel:

1. `Pipeline.hold(epoch)`: every pending request now belongs to the new epoch and waits (answers
   still coming from older epochs are stale and dropped by the ledger); the old first-stage
   links close. New requests are accepted but held.
2. the transition, in the supervisor's thread: devices the new plan leaves idle are dropped, a
   device that keeps its segments under a new stage index is renumbered (nothing shipped), a
   device that gets new segments is shipped its stage, and every live worker is routed for the
   new epoch.
3. `Pipeline.install(...)`: new links to the first stage open and every pending request is sent
   again, in request order.

A stage whose segments were ever deployed by this pipeline keeps that program (renumbered if its
index moved): a fresh split would write new archive bytes (torch.export.save embeds a random id),
a new sha256, and ship again. The switcher keeps every program it made in `library`, by segments,
so that a stage moved back to a device whose archive cache holds it ships only its digest, and
standby copies (`partita.runtime.standby`) are the very archives a failover deploys. If step 2 fails, requests stay held for the next decision. `halt(error)` fails every
pending request, and every later one until the next switch, with `error` (no plan fits).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from partita.errors import PartitaError
from partita.plan import Plan
from partita.runtime.deployment import Deployment
from partita.runtime.pipeline import Pipeline
from partita.runtime.transition import next_epoch
from partita.runtime.transition_engine import TransitionEngine

SWITCH_TIMEOUT_S = 120.0


class Decision(Protocol):
    """What a switch needs of a re-plan decision (`partita.plan.replan.Decision`): the plan to run."""

    @property
    def plan(self) -> Plan: ...


def reuse_programs(fresh: tuple[Any, ...], old: tuple[Any, ...] | dict[tuple[int, int], Any]) -> tuple[Any, ...]:
    """`fresh` stage programs, each replaced by the old program of the same segments (renumbered if needed).

    `old`: programs, or programs by (start, end). A tiled stage's entry (its tiles) is never reused.
    """
    kept = old if isinstance(old, dict) else {(p.start, p.end): p for p in old if hasattr(p, "start")}
    out = []
    for program in fresh:
        previous = kept.get((program.start, program.end))
        if previous is None:
            out.append(program)
        elif previous.index == program.index:
            out.append(previous)
        else:
            out.append(previous.renumbered(program.index))
    return tuple(out)


class Switcher:
    """Switches `pipe` to new deployments through `engine` (see the module docstring)."""

    def __init__(self, pipe: Pipeline, engine: TransitionEngine) -> None:
        self.pipe = pipe
        self.engine = engine
        self.last_shipped: tuple[tuple[str, int], ...] = ()  # (device, stage) sent by the last switch
        self.last_renumbered: tuple[tuple[str, int], ...] = ()  # (device, new stage) only renumbered
        self.last_shipped_bytes = 0  # archive bytes the last switch sent (0: everything came from caches)
        self.library: dict[tuple[int, int], Any] = {}  # every stage program made so far, by segments
        self._library_lock = threading.Lock()
        self._splitting = threading.Lock()  # one split at a time: the standby thread splits too
        self.remember(pipe.deployment.programs)

    def remember(self, programs: tuple[Any, ...]) -> None:
        """Keep these programs for later switches (the first of the same segments wins)."""
        with self._library_lock:
            library = dict(self.library)
            for program in programs:
                if hasattr(program, "start"):  # a tiled stage's entry is its tiles: chains are kept only
                    library.setdefault((program.start, program.end), program)
            self.library = library  # replaced, not edited: readers in other threads see a whole dict

    def programs_for(self, plan: Plan) -> tuple[Any, ...]:
        """The stage programs of `plan`: from the library where it has the segments, split otherwise."""
        from partita.model import split

        ranges = [(stage.start, stage.end) for stage in plan.stages]
        with self._splitting:
            library = self.library
            if all(r in library for r in ranges):
                known = [library[r] for r in ranges]
                programs = tuple(p if p.index == i else p.renumbered(i) for i, p in enumerate(known))
            else:
                programs = reuse_programs(tuple(split(self.pipe.graph, plan.cuts())), library)
            self.remember(programs)
        return programs

    def forget(self, device: str) -> None:
        """`device` restarted (or joined): it holds nothing."""
        self.engine.forget(device)

    def switch(self, decision: Decision) -> Deployment:
        """Deploy `decision.plan` as a new epoch and replay every pending request in it."""
        pipe = self.pipe
        old = pipe.deployment
        plan = decision.plan
        deployment = Deployment(
            epoch=next_epoch(),
            plan=plan,
            programs=self.programs_for(plan),
            placement=tuple(tuple(stage.devices) for stage in plan.stages),
            codec=old.codec,
            window=old.window,
            slot=old.slot,
        )
        pipe.hold(deployment.epoch, timeout_s=SWITCH_TIMEOUT_S)
        transition = self.engine.plan(deployment)
        self.engine.apply(transition)
        self.last_shipped = transition.shipped
        self.last_renumbered = transition.renumbered
        self.last_shipped_bytes = sum(self.engine.shipped_bytes.values())
        first_links = self.engine.open_first_links(deployment)
        pipe.install(deployment, first_links, list(transition.predicted_links), timeout_s=SWITCH_TIMEOUT_S)
        return deployment

    def halt(self, error: PartitaError) -> None:
        """Fail every pending request with `error`, and every new one until the next switch."""
        self.pipe.halt(error)
