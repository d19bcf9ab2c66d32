"""`partita simulate`: run a plan through the discrete-event simulator and compare with the prediction."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from partita.commands.plan import (
    ClusterOpt,
    InputShapeOpt,
    ModelArg,
    PlannerOpt,
    ProfileOpt,
    load_model_profile,
)
from partita.errors import PartitaError


def simulate(
    model: ModelArg = None,
    cluster: ClusterOpt = ...,  # type: ignore[assignment]  # typer's spelling of a required option
    input_shape: InputShapeOpt = None,
    profile: ProfileOpt = None,
    planner: PlannerOpt = "optimal",
    objective: Annotated[str, typer.Option("--objective", help="throughput or latency.")] = "throughput",
    requests: Annotated[int, typer.Option("--requests", help="How many requests to simulate.")] = 1000,
    rate: Annotated[
        float | None,
        typer.Option("--rate", help="Poisson arrivals at R req/s (default: closed loop, enough in flight to saturate)."),
    ] = None,
    in_flight: Annotated[int | None, typer.Option("--in-flight", help="Closed loop: requests in flight.")] = None,
    jitter: Annotated[float, typer.Option("--jitter", help="Lognormal sigma on every service time.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Simulate MODEL's plan on the cluster: throughput, latency percentiles, utilisation."""
    from rich.console import Console
    from rich.table import Table

    from partita.cluster import ClusterSpec
    from partita.plan import PLANNERS
    from partita.plan import plan as make_plan
    from partita.sim import simulate as run_simulation

    spec = ClusterSpec.from_yaml(cluster)
    prof = load_model_profile(model, input_shape, profile)
    names = list(PLANNERS) if planner == "all" else [planner]
    reports = []
    refusals: list[PartitaError] = []
    for name in names:
        try:
            chosen = make_plan(prof, spec, objective=objective, planner=name)
        except PartitaError as exc:
            if planner != "all":
                raise
            refusals.append(exc)
            continue  # a baseline that does not fit has nothing to simulate; `partita plan` shows why
        report = run_simulation(chosen, spec, prof, requests=requests, arrival="closed" if rate is None else rate,
                                in_flight=in_flight, jitter=jitter, seed=seed)
        reports.append((name, chosen, report))
    if not reports:
        raise refusals[0]  # nothing fits: optimal's reason (it knows every device), exit code 2
    if as_json:
        payload = [{"planner": n, "plan": p.to_dict(), "report": r.to_dict()} for n, p, r in reports]
        typer.echo(json.dumps(payload if planner == "all" else payload[0], indent=2))
        return
    console = Console()
    table = Table(title=f"{prof.model}: {requests} requests, {reports[0][2].arrival if reports else ''}")
    for column in ("planner", "throughput req/s", "predicted", "sim / predicted", "p50 ms", "p95 ms", "p99 ms",
                   "busiest device", "busiest link"):
        table.add_column(column, justify="left" if column in ("planner", "busiest device", "busiest link")
                         else "right")
    for name, chosen, report in reports:
        device = max(report.device_utilisation.items(), key=lambda kv: kv[1])
        link = max(report.link_utilisation.items(), key=lambda kv: kv[1])
        table.add_row(name, f"{report.throughput_rps:.4g}", f"{chosen.throughput_rps:.4g}",
                      f"{report.throughput_rps / chosen.throughput_rps:.3f}",
                      f"{report.latency_p50_s * 1e3:.2f}", f"{report.latency_p95_s * 1e3:.2f}",
                      f"{report.latency_p99_s * 1e3:.2f}", f"{device[0]} {device[1]:.0%}",
                      f"{link[0]} {link[1]:.0%}")
    console.print(table)
    for name, chosen, _ in reports:
        if any(stage.kind == "tiled" for stage in chosen.stages):
            console.print(f"{name}: {chosen}")  # a tiled stage's grid and tiles, one line each
