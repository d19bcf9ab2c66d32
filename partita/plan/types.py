"""What a planner returns: stages on devices, with the cost model's predictions.

A `Plan` is a frozen value that prints one line per stage and round-trips through JSON, so the
runtime can be held to it and a reference plan can be checked into a test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partita.errors import PlanError

__all__ = ["STAGE_KINDS", "Plan", "StagePlan", "TilePlan"]

#: The kinds of stage a plan holds (a closed set; routing, the ledger and the cost model match on it).
STAGE_KINDS = ("chain", "tiled")


@dataclass(frozen=True)
class TilePlan:
    """One tile of a tiled stage: output rows [a, b) and cols [c, d) of the block's map, on `device`.

    `compute_s`, `memory_bytes`: the tile's time and what its device holds (weights plus the peak
    activations of the tile's halo'd region); `in_bytes`: its halo'd input crop; `out_bytes`: its output.
    """

    device: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    compute_s: float = 0.0
    memory_bytes: float = 0.0
    in_bytes: int = 0
    out_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "rows": list(self.rows), "cols": list(self.cols), "compute_s": self.compute_s,
                "memory_bytes": self.memory_bytes, "in_bytes": self.in_bytes, "out_bytes": self.out_bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilePlan:
        return cls(str(data["device"]), (int(data["rows"][0]), int(data["rows"][1])),
                   (int(data["cols"][0]), int(data["cols"][1])), float(data.get("compute_s", 0.0)),
                   float(data.get("memory_bytes", 0.0)), int(data.get("in_bytes", 0)), int(data.get("out_bytes", 0)))


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: segments [start, end) run on `devices`.

    kind "chain": the devices are replicas taking requests round-robin (one device: no replicas).
    kind "tiled": one request's output map is split into a `grid` of (rows, cols) `tiles`, one per device
    (`devices` lists the tiles' devices in order); each tile computes from its halo'd input crop and the
    outputs are stitched into the next stage (see docs/tiles.md).

    `compute_s` is the compute time of one request on the stage's slowest replica (not divided by the
    replica count; the period divides it), or on its slowest tile. `memory_bytes` is what each replica
    (each tile's device) holds, at most (weights plus peak activations). `in_bytes`/`out_bytes` are the
    bytes of one request entering and leaving the stage (for tiles: the sum of the halo'd crops; the
    stitched map).
    """

    devices: tuple[str, ...]
    start: int
    end: int
    compute_s: float
    memory_bytes: float
    in_bytes: int
    out_bytes: int
    kind: str = "chain"
    grid: tuple[int, int] | None = None
    tiles: tuple[TilePlan, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise PlanError(f"unknown stage kind {self.kind!r}; expected one of {', '.join(STAGE_KINDS)}")
        if self.kind == "tiled" and (self.grid is None or len(self.tiles) != self.grid[0] * self.grid[1]):
            raise PlanError(f"a tiled stage lists grid [R, C] and R*C tiles; got grid {self.grid} and "
                            f"{len(self.tiles)} tiles")

    @property
    def replicas(self) -> int:
        """Devices taking turns at this stage: its replicas; 1 for a tiled stage (its devices share each request)."""
        return 1 if self.kind == "tiled" else len(self.devices)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "devices": list(self.devices),
            "start": self.start,
            "end": self.end,
            "compute_s": self.compute_s,
            "memory_bytes": self.memory_bytes,
            "in_bytes": self.in_bytes,
            "out_bytes": self.out_bytes,
        }
        if self.kind == "tiled" and self.grid is not None:
            data["grid"] = list(self.grid)
            data["tiles"] = [tile.to_dict() for tile in self.tiles]
        return data

    @classmethod
    def from_dict(cls, s: dict[str, Any]) -> StagePlan:
        grid = s.get("grid")
        return cls(
            devices=tuple(str(d) for d in s["devices"]),
            start=int(s["start"]),
            end=int(s["end"]),
            compute_s=float(s["compute_s"]),
            memory_bytes=float(s["memory_bytes"]),
            in_bytes=int(s["in_bytes"]),
            out_bytes=int(s["out_bytes"]),
            kind=str(s.get("kind", "chain")),
            grid=None if grid is None else (int(grid[0]), int(grid[1])),
            tiles=tuple(TilePlan.from_dict(t) for t in s.get("tiles", ())),
        )


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order and what the cost model predicts for them (see `partita.plan.cost`).

    `period_s` is the time between results in steady state (throughput_rps = 1 / period_s);
    `latency_s` is the time one request takes through an empty pipeline, source to source.
    `lower_bound_period_s` is a proven lower bound on the period of any plan the optimal planner
    considers for this model and cluster (see docs/planning.md), reported for the throughput objective
    when the planner is not exact (None when it is exact, or for baselines).
    `lower_bound_latency_s` is the same for the latency objective: a latency no plan can beat.
    `source` is the node where requests enter and results return; `model` names the profile.
    `basis` names where the figures behind the prediction came from, per kind: {"compute": ...,
    "memory": ..., "links": ...}, each `declared`, `catalog`, `measured` or `mixed` (see
    `partita.plan.basis`); None when not known (a plan built without a cluster's provenance).
    `hop_overhead_s` is the per-hop overhead the figures include (`partita.plan.cost`; 0: none).
    """

    stages: tuple[StagePlan, ...]
    period_s: float
    throughput_rps: float
    latency_s: float
    objective: str
    planner: str
    lower_bound_period_s: float | None = None
    source: str = ""
    model: str = ""
    lower_bound_latency_s: float | None = None
    basis: Mapping[str, str] | None = field(default=None, compare=False)
    hop_overhead_s: float = 0.0

    def cuts(self) -> list[int]:
        """Indices of the segments after which a new stage starts (what `partita.model.split` takes).

        Stages [0, 5) and [5, 12) give [4]: segment 4 is the last one of the first stage.
        """
        return [stage.end - 1 for stage in self.stages[:-1]]

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device the plan uses, in stage order."""
        return tuple(name for stage in self.stages for name in stage.devices)

    @property
    def gap(self) -> float | None:
        """The objective's value / its lower bound - 1 (0: provably optimal); None when no bound was reported.

        For the throughput objective: period_s / lower_bound_period_s; for latency: latency_s /
        lower_bound_latency_s.
        """
        if self.objective == "latency":
            value, bound = self.latency_s, self.lower_bound_latency_s
        else:
            value, bound = self.period_s, self.lower_bound_period_s
        if bound is None or bound <= 0:
            return None
        return value / bound - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "planner": self.planner,
            "period_s": self.period_s,
            "throughput_rps": self.throughput_rps,
            "latency_s": self.latency_s,
            "lower_bound_period_s": self.lower_bound_period_s,
            "lower_bound_latency_s": self.lower_bound_latency_s,
            "stages": [stage.to_dict() for stage in self.stages],
            "source": self.source,
            "model": self.model,
            "basis": dict(self.basis) if self.basis is not None else None,
            "hop_overhead_s": self.hop_overhead_s,
        }

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        try:
            stages = tuple(StagePlan.from_dict(s) for s in data["stages"])
            bound = data.get("lower_bound_period_s")
            latency_bound = data.get("lower_bound_latency_s")
            return cls(
                stages=stages,
                period_s=float(data["period_s"]),
                throughput_rps=float(data["throughput_rps"]),
                latency_s=float(data["latency_s"]),
                objective=str(data["objective"]),
                planner=str(data["planner"]),
                lower_bound_period_s=None if bound is None else float(bound),
                source=str(data.get("source", "")),
                model=str(data.get("model", "")),
                lower_bound_latency_s=None if latency_bound is None else float(latency_bound),
                basis=_basis(data.get("basis")),
                hop_overhead_s=float(data.get("hop_overhead_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            # Any of these means the JSON is not a plan; say which key is wrong rather than a bare KeyError.
            raise PlanError(f"not a plan: {type(exc).__name__}: {exc}; expected the JSON of Plan.to_json()") from exc

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"not a plan: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise PlanError("not a plan: expected a JSON object")
        return cls.from_dict(data)

    def __str__(self) -> str:
        head = (
            f"{self.planner} plan ({self.objective}): period {_ms(self.period_s)}, "
            f"{self.throughput_rps:.4g} req/s, latency {_ms(self.latency_s)}"
        )
        if self.gap is not None:
            head += f", within {self.gap:.1%} of the lower bound"
        if self.basis is not None:
            head += " (basis: " + " · ".join(f"{k} {v}" for k, v in self.basis.items()) + ")"
        lines = [head]
        for k, stage in enumerate(self.stages):
            where = ",".join(stage.devices)
            if stage.kind == "tiled" and stage.grid is not None:
                where = f"{stage.grid[0]}x{stage.grid[1]} tiles on {where}"
            lines.append(
                f"  stage {k}: [{stage.start}, {stage.end}) on {where}  "
                f"compute {_ms(stage.compute_s)}  memory {stage.memory_bytes / 2**20:.1f} MiB  "
                f"in {stage.in_bytes} B  out {stage.out_bytes} B"
            )
            for tile in stage.tiles:
                lines.append(
                    f"    tile rows [{tile.rows[0]}, {tile.rows[1]}) cols [{tile.cols[0]}, {tile.cols[1]}) on "
                    f"{tile.device}  compute {_ms(tile.compute_s)}  memory {tile.memory_bytes / 2**20:.1f} MiB  "
                    f"in {tile.in_bytes} B  out {tile.out_bytes} B"
                )
        return "\n".join(lines)


def _basis(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"basis must map kinds to words, got {value!r}")
    return dict(value)


def _ms(seconds: float) -> str:
    return "inf" if math.isinf(seconds) else f"{seconds * 1e3:.3f} ms"
