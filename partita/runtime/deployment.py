"""A deployment: the target a transition reaches — which stage programs sit on which devices, in which epoch.

A stage has a kind, and the kinds form a closed union (`Stage`), as exo's shard kinds do: routing,
the ledger and the transition engine match on it, so a new kind is added here and every `match`
that does not handle it is found by the type checker.

| kind          | what it is | routing | answers per request |
|---|---|---|---|
| `ChainStage`  | a contiguous run of segments [start, end) on one device, or on several replicas that take turns (replica `r % n` serves request `r`) | the previous stage's outputs go to one replica, round-robin | 1 |
| `TiledStage`  | the first segments [0, end) as fused tiles: tile i computes its output region on devices[i] from its halo'd crop (docs/tiles.md) | the source sends every tile its crop; every tile answers the source, which stitches them and sends the map on | one per tile |

Room is left for a batched stage (a replica that runs several requests at once); it is not built yet.
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


@dataclass(frozen=True)
class TiledStage:
    """Stage `index` (the first): tile i runs `tiles[i]` (a `partita.model.tiles.TileProgram`) on `devices[i]`.

    The source crops each request for every tile (`tiles[i].take`), and stitches the tiles' outputs
    (`partita.model.tiles.stitch`) before sending the map to the next stage, or returning it.
    """

    index: int
    devices: tuple[str, ...]
    tiles: tuple[Any, ...]
    plan: StagePlan

    def tile_of(self, device: str) -> int | None:
        """The tile `device` runs, None when it runs none."""
        return self.devices.index(device) if device in self.devices else None

    @property
    def answers_per_request(self) -> int:
        return len(self.devices)


Stage = ChainStage | TiledStage  # the closed union of stage kinds


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
        """Each stage as its kind: `programs[k]` is a stage program, or for a tiled stage the tuple of its tiles."""
        return tuple(
            TiledStage(index, devices, tuple(program), stage_plan) if stage_plan.kind == "tiled"
            else ChainStage(index, devices, program, stage_plan)
            for index, (devices, program, stage_plan) in enumerate(
                zip(self.placement, self.programs, self.plan.stages, strict=True)
            )
        )

    @property
    def tiled(self) -> TiledStage | None:
        """The deployment's tiled stage (always the first), or None."""
        first = self.stages[0]
        return first if isinstance(first, TiledStage) else None

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device that holds a stage, in stage order."""
        return tuple(d for devices in self.placement for d in devices)

    @property
    def answers_per_request(self) -> int:
        """Results the coordinator receives per request: the last stage's kind decides."""
        last = self.stages[-1]
        match last:
            case ChainStage() | TiledStage():
                return last.answers_per_request
