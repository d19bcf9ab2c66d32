"""A deployment: the target a transition reaches — which stage programs sit on which devices, in which epoch.

A stage has a kind, and the kinds form a closed union (`Stage`), as exo's shard kinds do: routing,
the ledger and the transition engine match on it, so a new kind is added here and every `match`
that does not handle it is found by the type checker.

| kind          | what it is | routing | answers per request |
|---|---|---|---|
| `ChainStage`  | a contiguous run of segments [start, end) on one device, or on several replicas that take turns (replica `r % n` serves request `r`) | the previous stage's outputs go to one replica, round-robin | 1 |

Room is left for a tiled stage (one request's feature map split over several devices and stitched
back: every tile receives the request, the stitch waits for all tiles) and a batched stage (a
replica that runs several requests at once); they are not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partita.model import StageProgram
    from partita.plan import Plan, StagePlan

# Stage ids on the wire: deployment slot s numbers its stages s * STAGE_SPAN + index, so the
# deployments sharing a worker never share a stage id (slot 0, the first, keeps plain indices).
STAGE_SPAN = 1000


@dataclass(frozen=True)
class ChainStage:
    """Stage `index`: segments [plan.start, plan.end) as `program`, on `devices` (replicas, round-robin)."""

    index: int
    devices: tuple[str, ...]
    program: StageProgram
    plan: StagePlan

    def replica_for(self, request: int) -> str:
        """The device that serves `request` (round-robin over the replicas)."""
        return self.devices[request % len(self.devices)]

    @property
    def answers_per_request(self) -> int:
        return 1


Stage = ChainStage  # the closed union of stage kinds: ChainStage | TiledStage | ... as they arrive


@dataclass(frozen=True)
class Deployment:
    """One epoch's target: the plan, its stage programs and where each stage runs.

    `placement[k]` names the devices (replicas) holding stage k; `programs[k]` is stage k's
    program. `codec` encodes activations between devices; `window` is the credits each sender
    holds per receiver. `epoch` numbers deployments on a cluster: a worker refuses activations of
    any other epoch than the one it was last routed for. `slot` tells this deployment apart from
    the others on the same cluster (0: the first); its stages travel as `stage_id(index)`.
    """

    epoch: int
    plan: Plan
    programs: tuple[Any, ...]
    placement: tuple[tuple[str, ...], ...]
    codec: str
    window: int
    slot: int = 0

    def stage_id(self, index: int) -> int:
        """Stage `index` as workers know it (its index offset by this deployment's slot)."""
        return self.slot * STAGE_SPAN + index

    @cached_property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(
            ChainStage(index, devices, program, stage_plan)
            for index, (devices, program, stage_plan) in enumerate(
                zip(self.placement, self.programs, self.plan.stages, strict=True)
            )
        )

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device that holds a stage, in stage order."""
        return tuple(d for devices in self.placement for d in devices)

    @property
    def answers_per_request(self) -> int:
        """Results the coordinator receives per request: the last stage's kind decides."""
        last = self.stages[-1]
        match last:
            case ChainStage():
                return last.answers_per_request
