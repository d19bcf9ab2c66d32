"""Where a prediction's figures come from: `declared`, `catalog` or `measured`, per kind of figure.

A plan's period and latency rest on three kinds of figures: compute (a device's FLOP/s, or its
measured per-segment times), memory, and the links its hops use. `prediction_basis` names the
basis of each kind over what the plan uses, so that two predictions for the same model can say
why they differ (`partita plan` on declared FLOP/s against `partita run` on measured times).
A kind whose figures do not share one basis is `mixed`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from partita.cluster import ClusterSpec
from partita.plan.types import Plan

__all__ = ["describe_basis", "prediction_basis"]


def prediction_basis(plan: Plan, cluster: ClusterSpec, timed: Collection[str] = ()) -> dict[str, str]:
    """{"compute": ..., "memory": ..., "links": ...} for `plan` on `cluster`; `timed`: devices with measured segment times."""
    devices = [cluster.device(name) for stage in plan.stages for name in stage.devices]
    compute = ("measured" if d.name in timed else d.basis_of("flops_per_s") for d in devices)
    memory = (d.basis_of("memory_bytes") for d in devices)
    hops = [(cluster.source,), *(stage.devices for stage in plan.stages), (cluster.source,)]
    links = (cluster.link(a, b).basis for senders, receivers in zip(hops, hops[1:], strict=False)
             for a in senders for b in receivers if a != b)
    return {"compute": _one(compute), "memory": _one(memory), "links": _one(links, empty="none")}


def describe_basis(basis: dict[str, str] | None) -> str:
    """One line for people: "compute measured · memory declared · links measured"."""
    if not basis:
        return "basis unknown"
    return " · ".join(f"{kind} {value}" for kind, value in basis.items())


def _one(values: Iterable[str], *, empty: str = "declared") -> str:
    seen = set(values)
    if not seen:
        return empty  # no such figure used (no hop leaves a device: a plan on the source alone)
    return seen.pop() if len(seen) == 1 else "mixed"
