"""`partita run MODEL --cluster FILE`: deploy a model on a cluster, stream requests, compare with the plan.

Devices of the file that have an `address` are real workers (connected with the coordinator's
--secret-key, or --insecure); the others are emulated on this machine in a LocalCluster. After
streaming, a table puts measured figures next to the planner's predictions per stage, per link
and in total; `--check` compares every output with the unsplit model run here. Ctrl-C says what it
stops and exits 130 within seconds; a second Ctrl-C stops at once (partita.commands.interrupt).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from partita.commands.inspect import parse_input_shapes
from partita.commands.interrupt import DRAIN_S, Stopping, exit_interrupted, interruptible
from partita.commands.plan import basis_line

DISTINCT_INPUTS = 8  # requests cycle through this many random inputs, so --check runs the model 8 times


def run(
    model: Annotated[str, typer.Argument(help="Model reference: torchvision:NAME, package.module:factory, file.py:factory, model.pt2")],
    cluster: Annotated[Path, typer.Option("--cluster", help="Cluster file (YAML).")],
    input_shape: Annotated[
        list[str] | None, typer.Option("--input-shape", help="Example input shape, e.g. 1,3,224,224 (';' between inputs).")
    ] = None,
    requests: Annotated[int, typer.Option("--requests", min=1, help="How many requests to stream.")] = 100,
    objective: Annotated[str, typer.Option("--objective", help="throughput or latency.")] = "throughput",
    planner: Annotated[str, typer.Option("--planner", help="optimal, single, even, memory, flops or seifer.")] = "optimal",
    codec: Annotated[str, typer.Option("--codec", help="Activations on the wire: none, lz4, fp16 or int8.")] = "none",
    check: Annotated[bool, typer.Option("--check", help="Compare every output with the unsplit model.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    secret_key: Annotated[
        Path | None, typer.Option("--secret-key", help="The coordinator's NAME.key_secret (for workers with addresses).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Talk to --insecure workers (no encryption).")] = False,
    detection: Annotated[
        float, typer.Option("--detection", help="Seconds of silence after which a worker is failed and re-planned around.")
    ] = 2.0,
    replan: Annotated[
        bool, typer.Option("--replan/--no-replan", help="Re-plan on failures, joins and drift (--no-replan: keep the plan).")
    ] = True,
    standby: Annotated[
        bool, typer.Option("--standby", help="Pre-ship the stages each failure plan needs, so a failover ships nothing.")
    ] = False,
    no_tiles: Annotated[
        bool, typer.Option("--no-tiles", help="For --objective latency: deploy chains only, no fused tiles.")
    ] = False,
) -> None:
    """Deploy MODEL on the cluster, stream requests through it, and show measured against predicted figures."""
    import torch
    from rich.console import Console

    from partita.model import load_ref
    from partita.runtime import keys
    from partita.runtime.connect import open_cluster
    from partita.runtime.supervisor import Supervision

    console = Console(stderr=as_json)
    if insecure:
        console.print("[yellow]warning:[/] --insecure: no encryption and no authentication on any socket")
        keys.insecure_already_reported()  # one warning, not one per socket
    if not detection > 0:
        raise typer.BadParameter(f"--detection must be > 0 seconds, got {detection!r}", param_hint="--detection")
    if standby and not replan:
        raise typer.BadParameter("--standby prepares re-plans after failures; it cannot go with --no-replan",
                                 param_hint="--standby")
    supervise = Supervision(detection_s=detection, standby=standby) if replan else False
    shapes = parse_input_shapes(input_shape)
    module = load_ref(model)
    torch.manual_seed(0)
    inputs = [tuple(torch.randn(s) for s in shapes) for _ in range(DISTINCT_INPUTS)]
    stopping = Stopping()
    try:
        with interruptible(stopping, say=lambda line: console.print(f"[yellow]{line}[/]", highlight=False)):
            stopping.cluster = open_cluster(cluster, secret_key=secret_key, insecure=insecure)
            with stopping.cluster as handle:
                result = deploy_and_stream(
                    module, inputs, handle, requests=requests, objective=objective, planner=planner, codec=codec,
                    console=console, name=model, supervise=supervise, stopping=stopping,
                    tiles=objective == "latency" and not no_tiles,
                )
    except KeyboardInterrupt:
        console.print("[yellow]stopped[/]")
        exit_interrupted()
    outputs = result.pop("_outputs")
    result.pop("_graph")
    result.pop("_measurements")
    if check:
        # Emulated workers run on this host, on one thread, exactly as the reference does; a real
        # device (another CPU, a GPU, more threads) may sum floats in another order.
        same_host = not any(d.address for d in handle.spec.devices)
        # a tile's kernels run on a smaller map and may sum in another order (docs/tiles.md): close, not bits
        tiled = any(stage.get("kind") == "tiled" for stage in result["plan"]["stages"])
        result.update(check_outputs(module, inputs, outputs, codec, bits_expected=same_host and not tiled))
    else:
        result.update({"outputs_match": None, "outputs_close": None, "max_abs_error": None})
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=_jsonable))
    else:
        print_report(console, result)
    if result["delivered"] < result["requests"]:
        console.print(f"[red]{result['requests'] - result['delivered']} request(s) were not delivered[/]")
        raise typer.Exit(1)
    if check and check_failed(result):
        raise typer.Exit(1)


def deploy_and_stream(
    module: Any, inputs: list[tuple], cluster: Any, *, requests: int, objective: str, planner: str, codec: str,
    console: Any, name: str, graph: Any = None, measurements: Any = None, label: str | None = None,
    singles_count: int = 3, supervise: Any = True, tiles: bool = False, stopping: Stopping | None = None,
) -> dict[str, Any]:
    """Deploy, time a few single requests (latency), stream `requests` (throughput); return the figures.

    The result has the `--json` fields of `partita run` (without the check), plus `_outputs`
    (every output, in order) and `_graph` / `_measurements` for reuse by another deploy.
    `supervise` is deploy's: True (default supervision), a `Supervision`, or False to keep the plan
    fixed (no re-planning on drift or failure), to measure a plan. `tiles`: let the latency planner
    choose fused tiles (docs/tiles.md). `stopping` is told the pipeline,
    so that a Ctrl-C can say how many requests it drains (partita.commands.interrupt); on Ctrl-C the
    requests in flight get `DRAIN_S` to come back before the pipeline closes.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from partita.runtime.coordinator import deploy

    with console.status(f"deploying {name} ({planner} plan)…", spinner="dots"):
        started = time.perf_counter()
        pipe = deploy(module, inputs[0], cluster, objective=objective, planner=planner, codec=codec,
                      graph=graph, measurements=measurements, supervise=supervise, tiles=tiles)
        deploy_s = time.perf_counter() - started
    if stopping is not None:
        stopping.pipe = pipe
    try:
        singles = []
        for x in inputs[:singles_count]:
            t0 = time.perf_counter()
            pipe(*x)
            singles.append((time.perf_counter() - t0) / pipe.dilation)
        outputs = []
        stream = (inputs[i % len(inputs)] for i in range(requests))
        columns = (TextColumn(f"[bold]{label or planner}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("stream", total=requests)
            try:
                for y in pipe.map(stream):
                    outputs.append(y)
                    progress.advance(task)
            except Exception as exc:  # noqa: BLE001 - a failed request is reported below, not a crash
                console.print(f"[red]streaming stopped: {exc}[/]")
        stats = pipe.stats()
        standby = pipe.supervisor.standby.state() if pipe.supervisor and pipe.supervisor.standby else None
    except KeyboardInterrupt:
        pipe.drain(DRAIN_S)
        raise
    finally:
        pipe.close()
    measured = dict(stats["measured"])
    measured["latency_single_s"] = sorted(singles)[len(singles) // 2] if singles else None
    return {
        "plan": json.loads(pipe.plan.to_json()),
        "requests": requests,
        "delivered": len(outputs),
        "measured": measured,
        "predicted": {"throughput_rps": pipe.plan.throughput_rps, "latency_s": pipe.plan.latency_s,
                      "period_s": pipe.plan.period_s},
        "stages": stats["stages"],
        "links": stats["links"],
        "replans": stats["replans"],
        "replans_declined": stats["replans_declined"],
        "standby": standby,
        "dilation": pipe.dilation,
        "deploy_s": deploy_s,
        "deploy_timings": pipe.deploy_timings,
        "_outputs": outputs,
        "_graph": pipe.graph,
        "_measurements": pipe.measurements,
    }


def check_outputs(
    module: Any, inputs: list[tuple], outputs: list[Any], codec: str, *, bits_expected: bool = True
) -> dict[str, Any]:
    """Compare output i with module(inputs[i % len(inputs)]).

    `outputs_match`: bit-identical (torch.equal) to the unsplit model run here. `outputs_close`:
    within float tolerances scaled to each output's magnitude (see `close_enough`).
    `bits_expected`: every stage ran where and how the reference runs (this host, one thread), so
    bit-identity is required; otherwise closeness is what a correct run guarantees.
    """
    import torch

    from partita.runtime.codec import error_stats, is_lossy

    # Emulated workers run torch on one thread; CPU kernels reduce in a different order on more
    # threads, so the reference runs on one thread too (bit-identity is per kernel configuration).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = [module(*x) for x in inputs]
    finally:
        torch.set_num_threads(previous)
    match, close, worst = True, True, 0.0
    for i, got in enumerate(outputs):
        for a, b in zip(_leaves(expected[i % len(inputs)]), _leaves(got), strict=True):
            if not torch.equal(a, b):
                match = False
                close = close and close_enough(a, b)
            if a.is_floating_point():
                worst = max(worst, error_stats(a, b)["max_abs"])
    return {
        "outputs_match": match,
        "outputs_close": close,
        "max_abs_error": worst,
        "lossy_codec": is_lossy(codec),
        "bits_expected": bits_expected,
    }


# Relative tolerances per dtype: a few hundred ulps, room for another summation order or a
# different SIMD width over long reductions, far below any real error (a wrong weight, a
# dropped tensor, a lossy codec).
_RTOL = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def close_enough(expected: Any, got: Any) -> bool:
    """torch.allclose with tolerances scaled to the output's magnitude.

    rtol is per dtype (`_RTOL`); atol is rtol x the largest |value| of the expected output, so a
    logit vector of size 1e3 may be off by 0.1 where one of size 1 may be off by 1e-4. Non-float
    outputs (indices, masks) must be equal.
    """
    import torch

    if expected.shape != got.shape or expected.dtype != got.dtype:
        return False
    if not expected.is_floating_point():
        return bool(torch.equal(expected, got))
    rtol = _RTOL.get(str(expected.dtype).removeprefix("torch."), 1e-4)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(got, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True))


def check_verdict(result: dict[str, Any]) -> str:
    """The one line `partita run --check` prints about outputs."""
    error = f"max abs error {result['max_abs_error']:.3g}"
    if result["outputs_match"]:
        return "bit-identical"
    if result.get("lossy_codec"):
        return f"{error} (lossy codec, chosen explicitly)"
    if not result["outputs_close"]:
        return f"NOT close: {error}"
    if result.get("bits_expected", True):
        return f"close but not bit-identical ({error}): every stage ran here like the reference, so this is a bug"
    return (
        f"close ({error}); bits can differ because stages ran on other devices or thread counts, "
        "or as tiles on smaller maps, which sum floats in another order"
    )


def check_failed(result: dict[str, Any]) -> bool:
    """Whether `--check` exits 1: lossless outputs that are not what the run guarantees.

    A run entirely on this host must be bit-identical; one with real devices must be close. A
    lossy codec reports its error and never fails the check.
    """
    if result.get("outputs_match") is None or result.get("lossy_codec"):
        return False
    if result.get("bits_expected", True):
        return not result["outputs_match"]
    return not result["outputs_close"]


def _leaves(value: Any) -> list:
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _leaves(v)]
    return [value]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _ratio(measured: float | None, predicted: float | None) -> str:
    if not measured or not predicted:
        return "—"
    return f"{measured / predicted:.2f}"


def print_report(console: Any, result: dict[str, Any]) -> None:
    """Tables of predicted against measured figures: per stage, per link, and in total (device time)."""
    from rich.table import Table

    stages = Table(title="stages (compute per request)")
    for column in ("stage", "devices", "segments", "predicted", "measured", "ratio"):
        stages.add_column(column, justify="right" if column in ("predicted", "measured", "ratio") else "left")
    for s in result["stages"]:
        devices = ", ".join(s["devices"])
        if s.get("kind") == "tiled":
            devices = f"{s['grid'][0]}x{s['grid'][1]} tiles: {devices}"
        stages.add_row(str(s["index"]), devices, f"[{s['segments'][0]}, {s['segments'][1]})",
                       _ms(s["predicted_compute_s"]), _ms(s["measured_compute_s"]),
                       _ratio(s["measured_compute_s"], s["predicted_compute_s"]))
    links = Table(title="links (transfer per message: latency + bytes / bandwidth; measured from when the link took it)")
    for column in ("from", "to", "bytes", "predicted", "measured", "ratio"):
        links.add_column(column, justify="left" if column in ("from", "to") else "right")
    for link in result["links"]:
        links.add_row(link["from"], link["to"], f"{link['bytes']:,}", _ms(link["predicted_transfer_s"]),
                      _ms(link["measured_transfer_s"]), _ratio(link["measured_transfer_s"], link["predicted_transfer_s"]))
    m, p = result["measured"], result["predicted"]
    total = Table(title="total")
    for column in ("figure", "predicted", "measured", "ratio"):
        total.add_column(column, justify="left" if column == "figure" else "right")
    total.add_row("throughput", f"{p['throughput_rps']:.2f} req/s",
                  f"{m['throughput_rps']:.2f} req/s" if m["throughput_rps"] else "—",
                  _ratio(m["throughput_rps"], p["throughput_rps"]))
    total.add_row("latency (one request)", _ms(p["latency_s"]), _ms(m.get("latency_single_s")),
                  _ratio(m.get("latency_single_s"), p["latency_s"]))
    total.add_row("latency p50 / p95 (streaming)", "", f"{_ms(m['latency_p50_s'])} / {_ms(m['latency_p95_s'])}", "")
    total.add_row("delivered", "", f"{result['delivered']} / {result['requests']}", "")
    if result.get("outputs_match") is not None:
        total.add_row("outputs vs unsplit model", "", check_verdict(result), "")
    for table in (stages, links, total):
        console.print(table)
    if result["plan"].get("basis"):
        console.print(basis_line(result["plan"]["basis"]), highlight=False)
    if result.get("replans"):
        replans = Table(title="re-plans (switch cost: predicted against measured, seconds)")
        for column in ("cause", "why", "predicted", "measured", "bytes shipped"):
            replans.add_column(column, justify="left" if column in ("cause", "why") else "right")
        for r in result["replans"]:
            why = ", ".join(r.get("blamed") or []) or ", ".join(r["devices_lost"] or r["devices_added"])
            predicted, measured = r.get("predicted_switch_s"), r.get("switch_s")
            replans.add_row(r["cause"], why, f"{predicted:.2f}" if predicted is not None else "—",
                            f"{measured:.2f}" if measured is not None else "—",
                            f"{r['shipped_bytes']:,}" if r.get("shipped_bytes") is not None else "—")
        console.print(replans)
    declined = result.get("replans_declined") or []
    if declined:
        console.print(f"re-plans considered and not made: {len(declined)}; the last: {declined[-1]['reason']}",
                      highlight=False)
    standby = result.get("standby")
    if standby:
        console.print(f"standby: {len(standby['copies'])} stage archive(s) pre-shipped ({standby['bytes']:,} bytes)"
                      + (f"; {standby['error']}" if standby.get("error") else ""), highlight=False)
    if result.get("dilation", 1.0) != 1.0:
        console.print(f"emulated world dilated {result['dilation']:.2f}x; all figures in device time", style="dim")

