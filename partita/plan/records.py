"""What a re-plan leaves behind: the `Decision` the policy hands the runtime, and the `Replan` record.

`partita.plan.replan.ReplanPolicy` decides; these are the values it returns and keeps, so a reader of
`Pipeline.stats()["replans"]` or `partita run --json` finds their meaning here without the rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from partita.cluster import ClusterSpec
from partita.plan.diff import PlanDiff
from partita.plan.types import Plan

__all__ = ["CAUSES", "Decision", "Replan"]

CAUSES = ("failure", "drift", "join")


@dataclass(frozen=True)
class Replan:
    """One re-plan, as `Pipeline.stats()["replans"]` and `partita run --json` list it.

    time_s: when it was decided (the caller's clock). old_period_s: the replaced plan's predicted
    period on the figures known at that time (None when no plan was running, e.g. after a failure
    that left too little memory); new_period_s: the new plan's. switch_s: how long the switch took
    (filled in by the runtime via `ReplanPolicy.completed`; None until then). reason: one line
    for people.

    predicted_switch_s: what the switch was predicted to cost, in seconds (shipping the archives
    the devices do not hold over the source's links, loading them, routing, replaying the requests
    in flight: `partita.plan.switchcost`), beside the measured `switch_s` (which covers shipping,
    loading, routing and re-sending, not the replayed requests' own run). predicted_ship_bytes: the
    archive bytes it was predicted to send; shipped_bytes: those sent (None until completed).
    gain_s: the seconds of work the new plan was predicted to save over `horizon_s` (a drift or join
    switch is made only when gain_s > predicted_switch_s; a failure switch always is, and its gain is
    None). blamed: what drifted, one "what figure" per figure (e.g. "a-client bandwidth"); empty for
    failures and joins.
    """

    cause: str
    time_s: float
    old_period_s: float | None
    new_period_s: float
    switch_s: float | None = None
    devices_lost: tuple[str, ...] = ()
    devices_added: tuple[str, ...] = ()
    reason: str = ""
    predicted_switch_s: float | None = None
    predicted_ship_bytes: int | None = None
    shipped_bytes: int | None = None
    gain_s: float | None = None
    horizon_s: float | None = None
    blamed: tuple[str, ...] = ()

    def completed(self, switch_s: float, shipped_bytes: int | None = None) -> Replan:
        return dataclasses.replace(self, switch_s=float(switch_s),
                                   shipped_bytes=None if shipped_bytes is None else int(shipped_bytes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "time_s": self.time_s,
            "old_period_s": self.old_period_s,
            "new_period_s": self.new_period_s,
            "switch_s": self.switch_s,
            "devices_lost": list(self.devices_lost),
            "devices_added": list(self.devices_added),
            "reason": self.reason,
            "predicted_switch_s": self.predicted_switch_s,
            "predicted_ship_bytes": self.predicted_ship_bytes,
            "shipped_bytes": self.shipped_bytes,
            "gain_s": self.gain_s,
            "horizon_s": self.horizon_s,
            "blamed": list(self.blamed),
        }


@dataclass(frozen=True)
class Decision:
    """What `decide` asks the runtime to do: deploy `plan`, shipping what `diff` says.

    `cluster` and `segment_times_s` are the figures the plan was made with (what the policy now
    believes); `replan` is the record to report (its switch_s is None until `completed`).
    """

    cause: str
    plan: Plan
    diff: PlanDiff
    replan: Replan
    cluster: ClusterSpec
    segment_times_s: Mapping[str, tuple[float, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "plan": self.plan.to_dict(), "diff": self.diff.to_dict(),
                "replan": self.replan.to_dict()}
