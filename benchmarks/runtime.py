"""Runtime benchmark: is the runtime as fast as the planner says, and does
the optimal plan beat the baselines when measured?

For each of three emulated clusters (examples/clusters: tiny-2, home-edge, defer-8) it starts a
LocalCluster, captures the model and times its segments once, then deploys the `single`, `even`,
`memory` and `optimal` plans one after the other and streams requests through each (as many as
fit in `--seconds` of real time). It prints:

1. measured period (1 / throughput, device time) against the planner's prediction: the goal is a
   ratio of 0.9 to 1.1 for every plan;
2. each plan's measured throughput and latency as ratios to `single` (the baseline measured in
   the same run), predicted beside measured.

Every output is checked against the unsplit model (bit-identical). JSON goes to
benchmarks/results/runtime.json. Figures are in device time (real seconds / the dilation).

    .venv/bin/python benchmarks/runtime.py [--model torchvision:resnet50] [--input-shape 1,3,64,64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from partita.commands.run import check_outputs, deploy_and_stream
from partita.model import capture, load_ref
from partita.plan import plan
from partita.runtime.coordinator import measure
from partita.runtime.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ("tiny-2", "home-edge", "defer-8")
PLANNERS = ("single", "even", "memory", "optimal")


def bench_cluster(name: str, module, inputs, args, console: Console) -> dict:
    """All four plans on one emulated cluster."""
    path = ROOT / "examples" / "clusters" / f"{name}.yaml"
    results = {}
    with LocalCluster.from_yaml(path) as cluster:
        graph = capture(module, inputs[0], name=args.model)
        measured = measure(graph, inputs[0], cluster)
        for planner in PLANNERS:
            predicted = plan(graph, cluster.spec, planner=planner, segment_times_s=measured.segment_times_s)
            dilation = cluster.dilation_for(predicted, measured.host_segment_s)  # what deploy will set
            requests = max(args.min_requests, min(args.max_requests, int(args.seconds / (predicted.period_s * dilation))))
            result = deploy_and_stream(
                module, inputs, cluster, requests=requests, objective="throughput", planner=planner, codec="none",
                console=console, name=args.model, graph=graph, measurements=measured, label=f"{name}/{planner}",
                singles_count=1, supervise=False,
            )
            result.pop("_graph"), result.pop("_measurements")
            result.update(check_outputs(module, inputs, result.pop("_outputs"), "none"))
            results[planner] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--input-shape", default="1,3,64,64")
    parser.add_argument("--clusters", default=",".join(CLUSTERS))
    parser.add_argument("--seconds", type=float, default=4.0, help="real seconds of streaming per plan")
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--max-requests", type=int, default=300)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "runtime.json"))
    args = parser.parse_args()

    console = Console()
    shape = tuple(int(d) for d in args.input_shape.split(","))
    module = load_ref(args.model)
    torch.manual_seed(0)
    inputs = [(torch.randn(shape),) for _ in range(4)]
    started = time.perf_counter()
    report = {"model": args.model, "input_shape": list(shape), "clusters": {}}
    for name in args.clusters.split(","):
        report["clusters"][name] = bench_cluster(name, module, inputs, args, console)
    report["wall_s"] = time.perf_counter() - started

    period = Table(title="1. measured period vs the planner's prediction (device time; goal 0.9-1.1)")
    for column in ("cluster", "plan", "stages", "requests", "predicted", "measured", "ratio", "overruns", "exact"):
        period.add_column(column, justify="left" if column in ("cluster", "plan") else "right")
    versus = Table(title="2. plans measured side by side (ratios to single, same run)")
    for column in ("cluster", "plan", "throughput pred", "throughput meas", "latency pred", "latency meas"):
        versus.add_column(column, justify="left" if column in ("cluster", "plan") else "right")
    for name, plans in report["clusters"].items():
        base = plans["single"]
        for planner, r in plans.items():
            m, p = r["measured"], r["predicted"]
            ratio = m["period_s"] / p["period_s"] if m["period_s"] else None
            r["period_ratio"] = ratio
            period.add_row(name, planner, str(len(r["stages"])), str(r["requests"]), f"{p['period_s'] * 1e3:.2f} ms",
                           f"{m['period_s'] * 1e3:.2f} ms" if m["period_s"] else "—",
                           f"{ratio:.3f}" if ratio else "—", str(sum(s["overruns"] for s in r["stages"])),
                           "yes" if r["outputs_match"] else "NO")
            versus.add_row(
                name, planner,
                f"{p['throughput_rps'] / base['predicted']['throughput_rps']:.2f}x",
                f"{m['throughput_rps'] / base['measured']['throughput_rps']:.2f}x" if m["throughput_rps"] else "—",
                f"{p['latency_s'] / base['predicted']['latency_s']:.2f}x",
                f"{m['latency_single_s'] / base['measured']['latency_single_s']:.2f}x",
            )
    console.print(period)
    console.print(versus)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"wrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
