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
    """

    cause: str
    time_s: float
    old_period_s: float | None
    new_period_s: float
    switch_s: float | None = None
    devices_lost: tuple[str, ...] = ()
    devices_added: tuple[str, ...] = ()
    reason: str = ""

    def completed(self, switch_s: float) -> Replan:
        return dataclasses.replace(self, switch_s=float(switch_s))

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
