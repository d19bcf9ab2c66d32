"""`partita plan`: choose stages and devices for a model on a cluster, and show the prediction."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from partita.errors import PartitaError, ProfileError

MIB = 2**20

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Model reference (torchvision:NAME, module:factory, file.py:factory); needs torch. "
                   "Or give --profile."),
]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option("--input-shape", help="Example input shape for MODEL, e.g. 1,3,224,224 (';' between inputs)."),
]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="Model profile JSON (from `partita inspect MODEL --json`).")
]
ClusterOpt = Annotated[str, typer.Option("--cluster", help="Cluster YAML file (see docs/planning.md).")]
PlannerOpt = Annotated[
    str, typer.Option("--planner", help="optimal, single, even, memory, flops, seifer, or all (side by side).")
]


def load_model_profile(model: str | None, input_shape: list[str] | None, profile: str | None):
    """The planner's Profile from --profile FILE (no torch) or MODEL (captured with torch.export)."""
    from partita.plan import load_profile

    if (model is None) == (profile is None):
        raise ProfileError("give either MODEL (with --input-shape) or --profile FILE, not both and not neither")
    if profile is not None or model is None:  # (the check above leaves model set here)
        return load_profile(profile)
    graph, _ = capture_model(model, input_shape)
    return load_profile(graph.to_profile())


def capture_model(model: str, input_shape: list[str] | None) -> tuple[Any, tuple]:
    """(graph, example inputs) of MODEL, captured with torch.export on seeded random inputs."""
    import torch  # only the MODEL form needs torch

    from partita.commands.inspect import parse_input_shapes
    from partita.model import capture, load_ref

    module = load_ref(model)
    torch.manual_seed(0)
    inputs = tuple(torch.randn(shape) for shape in parse_input_shapes(input_shape))
    return capture(module, inputs, name=model), inputs


def measured_basis(model: str | None, input_shape: list[str] | None, cluster: str, secret_key: str | None,
                   insecure: bool) -> tuple[Any, Any, dict[str, tuple[float, ...]]]:
    """(profile, cluster, segment times) with the basis `partita run` plans on: MODEL timed on the devices.

    Devices with an address are timed by their workers (their unknown memory and compute taken
    from `hello`, their undeclared links probed); the others by workers started on this machine,
    emulating their declared speed, exactly as `partita run` measures before it plans.
    """
    from partita.plan import load_profile
    from partita.runtime.connect import open_cluster
    from partita.runtime.measure import measure

    if model is None:
        raise ProfileError("--measure times MODEL on the devices; give MODEL (with --input-shape), not --profile")
    graph, inputs = capture_model(model, input_shape)
    with open_cluster(cluster, secret_key=secret_key, insecure=insecure) as handle:
        measurements = measure(graph, inputs, handle)
        spec = measurements.cluster_spec(handle.spec)
    return load_profile(graph.to_profile()), spec, dict(measurements.segment_times_s)


def plan(
    model: ModelArg = None,
    cluster: ClusterOpt = ...,  # type: ignore[assignment]  # typer's spelling of a required option
    input_shape: InputShapeOpt = None,
    profile: ProfileOpt = None,
    objective: Annotated[str, typer.Option("--objective", help="throughput or latency.")] = "throughput",
    planner: PlannerOpt = "optimal",
    max_stages: Annotated[int | None, typer.Option("--max-stages", help="At most N stages.")] = None,
    no_replicate: Annotated[
        bool, typer.Option("--no-replicate", help="Never run a stage on several devices.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (a list with --planner all).")] = False,
    plot: Annotated[str | None, typer.Option("--plot", help="Draw devices, links and a Gantt chart to FILE.png.")] = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="Time MODEL on the cluster's devices first, as `partita run` does, and "
                           "plan on those times (basis: measured). Starts workers here for devices without an address.")
    ] = False,
    secret_key: Annotated[
        str | None, typer.Option("--secret-key", help="With --measure: the coordinator's NAME.key_secret.")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="With --measure: talk to --insecure workers.")] = False,
    no_tiles: Annotated[
        bool, typer.Option("--no-tiles", help="For --objective latency: consider chains only, no fused tiles.")
    ] = False,
) -> None:
    """Choose which devices run which stages of MODEL so the cluster is as fast as it can be.

    Every prediction names its basis: compute, memory and links each `declared` (the cluster
    file), `catalog` (a device type or link preset) or `measured` (a file from `partita cluster
    probe`, or --measure).
    """
    from rich.console import Console

    from partita.cluster import ClusterSpec
    from partita.plan import PLANNERS
    from partita.plan import plan as make_plan

    times: dict[str, tuple[float, ...]] | None = None
    if measure:
        prof, spec, times = measured_basis(model, input_shape, cluster, secret_key, insecure)
    else:
        spec = ClusterSpec.from_yaml(cluster)
        prof = load_model_profile(model, input_shape, profile)
    names = list(PLANNERS) if planner == "all" else [planner]
    results: list[tuple[str, Any]] = []
    for name in names:
        try:
            results.append((name, make_plan(prof, spec, objective=objective, planner=name, max_stages=max_stages,
                                            replicate=not no_replicate, segment_times_s=times, tiles=not no_tiles)))
        except PartitaError as exc:
            if planner != "all":
                raise
            results.append((name, exc))  # a baseline that does not fit is a result worth showing
    if all(isinstance(result, Exception) for _, result in results):
        raise results[0][1]  # nothing fits: optimal's reason (it knows every device), exit code 2
    console = Console()
    if as_json:
        payload = [_json_entry(name, result, objective) for name, result in results]
        typer.echo(json.dumps(payload if planner == "all" else payload[0], indent=2))
    elif planner == "all":
        console.print(comparison_table(results, objective))
        first = next(result for _, result in results if not isinstance(result, Exception))
        console.print(basis_line(first.basis))
    else:
        console.print(stage_table(results[0][1], spec, prof))
        console.print(summary_line(results[0][1]))
    if plot:
        best = next(result for _, result in results if not isinstance(result, Exception))
        from partita.plan.render import plot_plan

        plot_plan(best, spec, prof, plot)
        if not as_json:
            console.print(f"plot written to {plot}")


def _json_entry(name: str, result: Any, objective: str) -> dict:
    if isinstance(result, Exception):
        return {"objective": objective, "planner": name, "error": str(result)}
    return result.to_dict()


def stage_table(plan_value, spec, prof):
    """A rich table: one row per stage (devices, segments, compute, transfer in, memory, utilisation)."""
    from rich.table import Table

    from partita.plan.cost import hop_terms

    table = Table(title=f"{prof.model} on {len(spec.devices)} devices: {plan_value.planner} plan "
                        f"({plan_value.objective})")
    for column, justify in (("#", "right"), ("devices", "left"), ("segments", "left"), ("compute ms", "right"),
                            ("transfer in ms", "right"), ("memory MiB / limit", "right"), ("util", "right")):
        table.add_column(column, justify="right" if justify == "right" else "left")
    previous = (spec.source,)
    for k, stage in enumerate(plan_value.stages):
        if stage.kind == "tiled":
            _tiled_rows(table, k, stage, spec, prof, plan_value, previous)
            previous = (plan_value.stages[k + 1].devices[0],) if k + 1 < len(plan_value.stages) else (spec.source,)
            continue
        _, transfer = hop_terms(spec, previous, stage.devices, stage.in_bytes)
        limit = min(spec.device(d).memory_bytes for d in stage.devices)
        first, last = prof.segments[stage.start].name, prof.segments[stage.end - 1].name
        segments = f"[{stage.start}, {stage.end}) {first}" + (f" … {last}" if stage.end - stage.start > 1 else "")
        util = stage.compute_s / stage.replicas / plan_value.period_s if plan_value.period_s > 0 else 0.0
        table.add_row(str(k), ", ".join(stage.devices) if len(stage.devices) <= 4
                      else f"{stage.devices[0]} … ({len(stage.devices)} replicas)",
                      segments, f"{stage.compute_s * 1e3:.2f}", f"{transfer * 1e3:.2f}",
                      f"{stage.memory_bytes / MIB:.1f} / {limit / MIB:.0f}", f"{util:.0%}")
        previous = stage.devices
    _, back = hop_terms(spec, previous, (spec.source,), plan_value.stages[-1].out_bytes)
    table.caption = f"results back to {spec.source}: {back * 1e3:.2f} ms"
    return table


def _tiled_rows(table, k, stage, spec, prof, plan_value, previous) -> None:
    """A tiled stage: one row for the stage, one per tile (its region, device, compute, scatter, memory)."""
    first, last = prof.segments[stage.start].name, prof.segments[stage.end - 1].name
    segments = f"[{stage.start}, {stage.end}) {first}" + (f" … {last}" if stage.end - stage.start > 1 else "")
    scatter = [_transfer_s(spec, previous[0], tile.device, tile.in_bytes) for tile in stage.tiles]
    util = stage.compute_s / plan_value.period_s if plan_value.period_s > 0 else 0.0
    table.add_row(str(k), f"{stage.grid[0]}x{stage.grid[1]} tiles", segments, f"{stage.compute_s * 1e3:.2f}",
                  f"{max(scatter) * 1e3:.2f}", f"{stage.memory_bytes / MIB:.1f} / "
                  f"{min(spec.device(d).memory_bytes for d in stage.devices) / MIB:.0f}", f"{util:.0%}")
    for tile, transfer in zip(stage.tiles, scatter, strict=True):
        table.add_row("", f"  {tile.device}", f"  rows [{tile.rows[0]}, {tile.rows[1]}) cols [{tile.cols[0]}, "
                      f"{tile.cols[1]})", f"{tile.compute_s * 1e3:.2f}", f"{transfer * 1e3:.2f}",
                      f"{tile.memory_bytes / MIB:.1f} / {spec.device(tile.device).memory_bytes / MIB:.0f}", "")


def _transfer_s(spec, a: str, b: str, nbytes: float) -> float:
    if a == b:
        return 0.0
    link = spec.link(a, b)
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


def summary_line(plan_value) -> str:
    line = (f"period {plan_value.period_s * 1e3:.3f} ms · throughput {plan_value.throughput_rps:.4g} req/s · "
            f"latency {plan_value.latency_s * 1e3:.2f} ms")
    if plan_value.lower_bound_period_s is not None:
        line += (f" · lower bound on the period {plan_value.lower_bound_period_s * 1e3:.3f} ms "
                 f"(gap {plan_value.gap:.1%})")
    elif plan_value.lower_bound_latency_s is not None:
        line += (f" · lower bound on the latency {plan_value.lower_bound_latency_s * 1e3:.2f} ms "
                 f"(gap {plan_value.gap:.1%})")
    elif any(stage.kind == "tiled" for stage in plan_value.stages):
        line += " · tiles beat the best chain (no proven bound for tiled plans)"
    else:
        line += " · exact optimum" if plan_value.planner == "optimal" else ""
    return line + "\n" + basis_line(plan_value.basis)


def basis_line(basis: dict[str, str] | None) -> str:
    """What a prediction rests on (a plan's `basis`), in words; `partita plan` and `partita run` print it."""
    from partita.plan import describe_basis

    words = {"declared": "declared in the cluster file", "catalog": "from the device catalog",
             "measured": "measured", "mixed": "mixed (figures of more than one basis)", "none": "none used"}
    basis = basis or {}
    parts = [f"{kind} {words.get(value, value)}" for kind, value in basis.items()]
    hint = ""
    if basis.get("compute") in ("declared", "catalog"):
        hint = " (`partita run` plans on times measured on the devices; `partita plan --measure` does too)"
    return ("prediction basis: " + "; ".join(parts) + hint) if parts else describe_basis(None)


def comparison_table(results, objective: str):
    """Every planner side by side, throughput and latency as ratios to `optimal`."""
    from rich.table import Table

    optimal = next((r for n, r in results if n == "optimal" and not isinstance(r, Exception)), None)
    table = Table(title=f"planners compared ({objective}); ratios are to optimal")
    for column in ("planner", "stages", "devices", "period ms", "req/s", "req/s ÷ opt", "latency ms",
                   "latency ÷ opt"):
        table.add_column(column, justify="left" if column == "planner" else "right")
    for name, result in results:
        if isinstance(result, Exception):
            table.add_row(name, "—", "—", "—", "does not fit", "—", "—", "—")
            continue
        ratio_t = result.throughput_rps / optimal.throughput_rps if optimal else float("nan")
        ratio_l = result.latency_s / optimal.latency_s if optimal else float("nan")
        table.add_row(name, str(len(result.stages)), str(len(result.devices)), f"{result.period_s * 1e3:.3f}",
                      f"{result.throughput_rps:.4g}", f"{ratio_t:.2f}×", f"{result.latency_s * 1e3:.2f}",
                      f"{ratio_l:.2f}×")
    return table
