"""What changes on each device when one plan replaces another, so only changed stages are shipped.

A device *keeps* its stage when it holds the same segment range [start, end) in both plans (its
stage index may still change, e.g. when a stage is inserted before it: `reindexed` lists those, the
runtime re-routes them but ships nothing). It must *load* when the new plan gives it a range it
does not hold (a new device, or a different range: the load replaces what it held). It should
*unload* when the new plan no longer uses it. Devices named in `gone` (failed, unreachable) are
left out: there is nothing to tell them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from partita.plan.types import Plan

__all__ = ["ACTIONS", "DeviceChange", "PlanDiff", "diff_holdings", "diff_plans", "placement_of"]

ACTIONS = ("keep", "load", "unload")


@dataclass(frozen=True)
class DeviceChange:
    """One device's change. `old_*` are None when the old plan did not use it, `new_*` when the new one does not.

    Segments are half-open ranges (start, end); stages are indices in pipeline order.
    """

    device: str
    action: str  # "keep" | "load" | "unload"
    old_stage: int | None
    new_stage: int | None
    old_segments: tuple[int, int] | None
    new_segments: tuple[int, int] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "action": self.action,
            "old_stage": self.old_stage,
            "new_stage": self.new_stage,
            "old_segments": list(self.old_segments) if self.old_segments else None,
            "new_segments": list(self.new_segments) if self.new_segments else None,
        }


@dataclass(frozen=True)
class PlanDiff:
    """Per device (sorted by name): keep, load or unload. Devices in neither plan, or gone, do not appear."""

    changes: tuple[DeviceChange, ...]

    def _named(self, action: str) -> tuple[str, ...]:
        return tuple(c.device for c in self.changes if c.action == action)

    @property
    def keep(self) -> tuple[str, ...]:
        return self._named("keep")

    @property
    def load(self) -> tuple[str, ...]:
        return self._named("load")

    @property
    def unload(self) -> tuple[str, ...]:
        return self._named("unload")

    @property
    def reindexed(self) -> tuple[str, ...]:
        """Kept devices whose stage index changed (re-route them; nothing to ship)."""
        return tuple(c.device for c in self.changes if c.action == "keep" and c.old_stage != c.new_stage)

    @property
    def shipped_stages(self) -> tuple[int, ...]:
        """Indices (in the new plan) of the stages that must be shipped to at least one device."""
        return tuple(sorted({c.new_stage for c in self.changes if c.action == "load" and c.new_stage is not None}))

    @property
    def unchanged(self) -> bool:
        """Nothing to load or unload and no stage renumbered: the deployment can stay as it is."""
        return not self.load and not self.unload and not self.reindexed

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": list(self.keep),
            "load": list(self.load),
            "unload": list(self.unload),
            "shipped_stages": list(self.shipped_stages),
            "changes": [c.to_dict() for c in self.changes],
        }


def diff_plans(old: Plan | None, new: Plan, *, gone: Iterable[str] = ()) -> PlanDiff:
    """Compare the deployed plan `old` (None: nothing deployed) with `new`; see the module docstring."""
    return diff_holdings(placement_of(old) if old is not None else {}, new, gone=gone)


def diff_holdings(
    held: Mapping[str, tuple[int, tuple[int, int]]], new: Plan, *, gone: Iterable[str] = ()
) -> PlanDiff:
    """Compare what each device holds now, (stage index, segments [start, end)), with `new`.

    This is the diff the runtime uses: what a device holds can differ from any plan (a device that
    restarted holds nothing; a switch that failed half-way left some devices changed).
    """
    gone = set(gone)
    after = placement_of(new)
    changes = []
    for device in sorted((set(held) | set(after)) - gone):
        old_stage, old_segments = held.get(device, (None, None))
        new_stage, new_segments = after.get(device, (None, None))
        if new_segments is None:
            action = "unload"
        elif new_segments == old_segments:
            action = "keep"
        else:
            action = "load"
        changes.append(DeviceChange(device, action, old_stage, new_stage, old_segments, new_segments))
    return PlanDiff(tuple(changes))


def placement_of(plan: Plan) -> dict[str, tuple[int, tuple[int, int]]]:
    """Each device of `plan` with its stage index and segments [start, end) (a device runs one stage)."""
    return {
        device: (index, (stage.start, stage.end))
        for index, stage in enumerate(plan.stages)
        for device in stage.devices
    }
