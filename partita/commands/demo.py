"""`partita demo`: resnet50 on an emulated home lab, through four plans, measured against predicted.

With no arguments it starts a LocalCluster of examples/clusters/home-edge.yaml (a laptop, a Jetson
and three Raspberry Pis on mixed Wi-Fi and Ethernet), captures torchvision resnet50 and measures
it once, then deploys the `single`, `even`, `memory` and `optimal` plans one after the other and
streams requests through each. It prints throughput and latency as ratios to `single`, measured
beside predicted, checks every output against the unsplit model, and writes partita-demo.png and
partita-demo.json.

Emulating a Jetson (about 18x this host's core) faithfully dilates the whole world ~20x, so each
plan streams as many requests as fit in a few seconds of real time (at least `--min-requests`);
the default input is 1x3x64x64 to keep the Pi-bound plans (30 requests each at least, for a stable
figure) within a few minutes on two cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from partita.commands.inspect import parse_input_shapes

PLANNERS = ("single", "even", "memory", "optimal")
# The embedded default (also examples/clusters/home-edge.yaml): packaged, so a plain pip install can run it.
DEFAULT_CLUSTER = Path(__file__).resolve().parent.parent / "data" / "home-edge.yaml"


def demo(
    cluster: Annotated[Path, typer.Option("--cluster", help="Cluster file to emulate (default: the embedded home-edge.yaml).", show_default=False)] = DEFAULT_CLUSTER,
    model: Annotated[str, typer.Option("--model", help="Model reference.")] = "torchvision:resnet50",
    input_shape: Annotated[str, typer.Option("--input-shape", help="Example input shape.")] = "1,3,64,64",
    seconds_per_plan: Annotated[float, typer.Option("--seconds-per-plan", help="Real seconds of streaming per plan.")] = 4.0,
    min_requests: Annotated[int, typer.Option("--min-requests", min=2, help="Fewest requests per plan.")] = 30,
    max_requests: Annotated[int, typer.Option("--max-requests", min=2, help="Most requests per plan.")] = 200,
    output: Annotated[Path, typer.Option("--output", help="Where to write PNG and JSON (a path stem).")] = Path("partita-demo"),
) -> None:
    """Run resnet50 on an emulated home lab through four plans and compare them, measured and predicted."""
    import torch
    from rich.console import Console

    from partita.commands.run import check_outputs, deploy_and_stream
    from partita.model import capture, load_ref
    from partita.runtime.coordinator import measure
    from partita.runtime.local import LocalCluster

    console = Console()
    shapes = parse_input_shapes([input_shape])
    started = time.perf_counter()
    module = load_ref(model)
    torch.manual_seed(0)
    inputs = [tuple(torch.randn(s) for s in shapes) for _ in range(4)]
    results: dict[str, dict[str, Any]] = {}
    with console.status("starting the emulated cluster…", spinner="dots"):
        local = LocalCluster.from_yaml(cluster).start()
    with local:
        # Each plan may dilate the world further (deploy fits the dilation to the plan; the JSON has it
        # per plan): this is the floor, the one every plan starts from.
        dilation = local.dilation
        console.print(f"[bold]{cluster.name}[/]: {', '.join(local.spec.names)}; emulated world dilated at least "
                      f"{dilation:.1f}x (fastest device {max(local.host_speeds.values()):.1f}x this host's core)")
        with console.status(f"capturing {model} and timing its segments…", spinner="dots"):
            graph = capture(module, inputs[0], name=model)
            measured = measure(graph, inputs[0], local)
        for planner in PLANNERS:
            requests = _requests_for(graph, measured, local, planner, seconds_per_plan, min_requests, max_requests)
            result = deploy_and_stream(
                module, inputs, local, requests=requests, objective="throughput", planner=planner, codec="none",
                console=console, name=model, graph=graph, measurements=measured, singles_count=1, supervise=False,
            )
            result.pop("_graph"), result.pop("_measurements")
            result.update(check_outputs(module, inputs, result.pop("_outputs"), "none"))
            results[planner] = result
    summary = _summary(results)
    _print(console, summary)
    report = {
        "model": model, "cluster": str(cluster), "input_shape": list(shapes[0]), "dilation": dilation,
        "wall_s": time.perf_counter() - started, "summary": summary, "plans": results,
    }
    json_path, png_path = output.with_suffix(".json"), output.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=2, default=str))
    _plot(results, summary, graph, png_path, title=f"{model} on {cluster.stem}")
    console.print(f"wrote {png_path} and {json_path} in {report['wall_s']:.0f} s")
    if not all(r["outputs_match"] for r in results.values()):
        console.print("[red]some outputs differ from the unsplit model[/]")
        raise typer.Exit(1)


def _requests_for(graph: Any, measured: Any, cluster: Any, planner: str, seconds: float, low: int, high: int) -> int:
    """As many requests as the predicted period fits in `seconds` of real (dilated) time."""
    from partita.plan import plan

    predicted = plan(graph, cluster.spec, planner=planner, segment_times_s=measured.segment_times_s)
    real_period_s = predicted.period_s * cluster.dilation_for(predicted, measured.host_segment_s)
    return max(low, min(high, int(seconds / max(real_period_s, 1e-6))))


def _summary(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    base = results["single"]
    rows = []
    for planner, r in results.items():
        m, p = r["measured"], r["predicted"]
        rows.append({
            "planner": planner,
            "stages": len(r["stages"]),
            "requests": r["requests"],
            "predicted_throughput_rps": p["throughput_rps"],
            "measured_throughput_rps": m["throughput_rps"],
            "predicted_throughput_vs_single": p["throughput_rps"] / base["predicted"]["throughput_rps"],
            "measured_throughput_vs_single": _div(m["throughput_rps"], base["measured"]["throughput_rps"]),
            "predicted_latency_s": p["latency_s"],
            "measured_latency_s": m["latency_single_s"],
            "predicted_latency_vs_single": p["latency_s"] / base["predicted"]["latency_s"],
            "measured_latency_vs_single": _div(m["latency_single_s"], base["measured"]["latency_single_s"]),
            "measured_vs_predicted_period": _div(m["period_s"], p["period_s"]),
            "outputs_match": r["outputs_match"],
        })
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _print(console: Any, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    throughput = Table(title="throughput (requests per device second; x = ratio to single)")
    latency = Table(title="latency of one request (device time; x = ratio to single)")
    for table in (throughput, latency):
        for column in ("plan", "stages", "predicted", "measured", "x single pred", "x single meas"):
            table.add_column(column, justify="left" if column == "plan" else "right")
    throughput.add_column("meas/pred period", justify="right")
    latency.add_column("outputs", justify="right")
    for r in rows:
        throughput.add_row(
            r["planner"], str(r["stages"]), f"{r['predicted_throughput_rps']:.1f}",
            _fmt(r["measured_throughput_rps"], ".1f"), f"{r['predicted_throughput_vs_single']:.2f}",
            _fmt(r["measured_throughput_vs_single"], ".2f"), _fmt(r["measured_vs_predicted_period"], ".2f"),
        )
        measured_ms = r["measured_latency_s"] * 1e3 if r["measured_latency_s"] else None
        latency.add_row(
            r["planner"], str(r["stages"]), f"{r['predicted_latency_s'] * 1e3:.1f} ms",
            _fmt(measured_ms, ".1f") + " ms", f"{r['predicted_latency_vs_single']:.2f}",
            _fmt(r["measured_latency_vs_single"], ".2f"), "exact" if r["outputs_match"] else "DIFFER",
        )
    console.print(throughput)
    console.print(latency)


def _plot(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], graph: Any, path: Path, *, title: str) -> None:
    """Write the figure (see `figure`) to `path`."""
    import matplotlib.pyplot as plt

    fig = figure(results, rows, graph, title=title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], graph: Any, *, title: str) -> Any:
    """The demo's matplotlib Figure. Three panels: each plan's stages over the model's segments (one colour per device), then
    throughput and latency, predicted beside measured, every bar labelled with its value.

    Devices take colours from a palette the figures never use; predicted and measured are two
    greys (light and dark), so no colour means two things.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    predicted_colour, measured_colour = "#c8c8c8", "#404040"
    devices = sorted({d for r in results.values() for s in r["stages"] for d in s["devices"]})
    palette = plt.get_cmap("Set2")
    colours = {d: palette(i % palette.N) for i, d in enumerate(devices)}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [3, 2, 2]})
    for y, r in enumerate(results.values()):
        for s in r["stages"]:
            start, end = s["segments"]
            share = (end - start) / len(s["devices"])
            for k, device in enumerate(s["devices"]):
                left.barh(y, share, left=start + k * share, color=colours[device], edgecolor="white")
            if end - start >= 1.5:  # a sliver's name would spill over its neighbours: the legend names it
                left.text((start + end) / 2, y, "+".join(s["devices"]), ha="center", va="center", fontsize=7)
    segments = len(graph.segments) if graph is not None else max(s["segments"][1] for r in results.values()
                                                                    for s in r["stages"])
    left.set_xlim(0, segments)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_yticks(range(len(results)), list(results))
    left.set_xlabel(f"segments of the model (0..{segments})")
    left.set_title("plans: stages and their devices")
    left.invert_yaxis()
    left.legend(handles=[Patch(color=colours[d], label=d) for d in devices], fontsize=8, loc="upper center",
                bbox_to_anchor=(0.5, -0.16), ncol=len(devices), frameon=False)

    names = [r["planner"] for r in rows]
    _paired_bars(middle, names, [r["predicted_throughput_rps"] for r in rows],
                 [r["measured_throughput_rps"] for r in rows], "{:.1f}", predicted_colour, measured_colour)
    middle.set_ylabel("requests / device second")
    middle.set_title("throughput (higher is better)")
    _paired_bars(right, names, [r["predicted_latency_s"] * 1e3 for r in rows],
                 [None if r["measured_latency_s"] is None else r["measured_latency_s"] * 1e3 for r in rows],
                 "{:.1f}", predicted_colour, measured_colour)
    right.set_ylabel("ms of device time, one request")
    right.set_title("latency (lower is better)")
    requests = ", ".join(f"{r['planner']} {r['requests']}" for r in rows)
    fig.suptitle(f"{title}  ·  requests measured per plan: {requests}")
    fig.tight_layout()
    return fig


def _paired_bars(ax: Any, names: list[str], predicted: list[float], measured: list[float | None], label: str,
                 predicted_colour: str, measured_colour: str) -> None:
    """Predicted (light) beside measured (dark) per plan, each bar labelled, however small."""
    x = range(len(names))
    bars_p = ax.bar([i - 0.2 for i in x], predicted, width=0.4, color=predicted_colour, label="predicted")
    bars_m = ax.bar([i + 0.2 for i in x], [m or 0.0 for m in measured], width=0.4, color=measured_colour,
                    label="measured")
    ax.bar_label(bars_p, labels=[label.format(v) for v in predicted], fontsize=7, padding=2)
    ax.bar_label(bars_m, labels=["—" if m is None else label.format(m) for m in measured], fontsize=7, padding=2)
    ax.set_xticks(list(x), names)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
