"""A pipeline's measured figures beside its plan's predictions: per stage, per link, and in all.

Pure functions over what the pipeline holds (its deployment, its ledger's times) and what its
workers reported (`stats` replies), so `Pipeline.stats` only gathers and this module only joins.
Times are device seconds: host seconds divided by the dilation `k`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from partita.runtime.deployment import Deployment


def stage_figures(deployment: Deployment, workers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each planned stage with what its devices measured (means over the replicas that served requests)."""
    stages = []
    for index, (stage_plan, devices) in enumerate(zip(deployment.plan.stages, deployment.placement, strict=True)):
        stage_id = str(deployment.stage_id(index))
        per_device = [workers.get(d, {}).get("stages", {}).get(stage_id, {}) for d in devices]
        measured = [s["mean_device_s"] for s in per_device if s.get("requests")]
        stages.append({
            "index": index,
            "kind": stage_plan.kind,
            **({"grid": list(stage_plan.grid)} if stage_plan.grid is not None else {}),
            "devices": list(devices),
            "segments": [stage_plan.start, stage_plan.end],
            "predicted_compute_s": stage_plan.compute_s,
            "measured_compute_s": statistics.fmean(measured) if measured else None,
            "requests": sum(s.get("requests", 0) for s in per_device),
            "overruns": sum(s.get("overruns", 0) for s in per_device),
            "host_compute_s": statistics.fmean(s["mean_host_s"] for s in per_device) if measured else None,
            "measured_queue_s": statistics.fmean(s.get("mean_queue_s", 0.0) for s in per_device if s.get("requests")) if measured else None,
        })
    return stages


def link_figures(predicted: Sequence[Mapping[str, Any]], to_source: Mapping[str, Any], workers: Mapping[str, Any],
                 k: float) -> list[dict[str, Any]]:
    """Each predicted link with its measured mean transfer time, as its receiver counted it.

    `to_source` holds what the coordinator counted of the links into it (`LinkTimes.figures()`);
    every other link is counted by the worker it reaches (`links_in` of its stats).
    """
    links = []
    for link in predicted:
        incoming = to_source if link.get("to_source") else workers.get(link["to"], {}).get("links_in", {})
        record = incoming.get(link["from"])
        measured_s = record["mean_transfer_s"] / k if record and record.get("messages") else None
        links.append({**link, "measured_transfer_s": measured_s})
    return links


def stream_figures(delivered_at: Sequence[float], latencies_s: Sequence[float], k: float) -> dict[str, Any]:
    """Throughput, period and latency quantiles of a stream, from its delivery times and request latencies."""
    period_s = (delivered_at[-1] - delivered_at[0]) / (len(delivered_at) - 1) / k if len(delivered_at) >= 2 else None
    latencies = sorted(x / k for x in latencies_s)
    return {
        "throughput_rps": 1.0 / period_s if period_s else None,
        "period_s": period_s,
        "latency_p50_s": quantile(latencies, 0.5),
        "latency_p95_s": quantile(latencies, 0.95),
    }


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """The `q` quantile of sorted values (the nearest rank), or None when there are none."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]
