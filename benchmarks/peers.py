"""Peers benchmark: partita's pipeline against Ray actors and torch.distributed.pipelining, same split.

How much does partita's own runtime cost against established peers? For each model (a small MLP, where per-request overhead dominates, and
torchvision resnet50):

1. Capture once and choose the cuts once: the `optimal` throughput plan on a homogeneous cluster
   of `--stages` equal devices (pure planning from the captured flops; no replication).
   `partita.model.split` gives the stage programs every system runs, as the same archives:
   * partita: a `LocalCluster` of one worker process per stage, no emulation (speed 1.0 = host
     speed, dilation 1, unlimited links without latency), plaintext sockets (the peers do not
     encrypt either; `--secure` runs partita with its default CURVE encryption instead), deployed with `deploy(..., stages=...)` at exactly these cuts;
   * Ray: one actor per stage, a chain of actor calls per request (benchmarks/_peer_ray.py);
   * torch.distributed.pipelining: one gloo rank per stage, `PipelineStage` around
     `StageProgram.run`, `ScheduleGPipe` forward only (benchmarks/_peer_torchpp.py).
   Every process runs `torch.set_num_threads(1)`; everything is on loopback.
2. Check that each system's outputs are `torch.equal` to the unsplit model's (before timing).
3. Measure, after warm-up, in interleaved rounds (the order rotates each round, so the systems
   share the host's noise): throughput streaming `--requests` batch-1 requests with many in
   flight, and the latency of single requests sent one at a time (p50 over all rounds).
   The table gives each peer's figures as ratios to partita's; a line under it gives partita's own
   ratios to torch.distributed.pipelining (latency: partita / torch, lower is better; throughput:
   partita / torch, higher is better), and partita's per-hop overhead: its single-request
   latency, less the stages' compute (each stage program timed alone here, median), over its
   stages + 1 hops (what `partita.plan.HOP_OVERHEAD_S` holds for the cost model).

Run: `.venv/bin/python benchmarks/peers.py` (about 2 minutes on 2 cores; `--quick` about 30 s).
Ray is optional (`pip install ray`): without it, its rows say why. Writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec  # noqa: E402
from partita.model import capture, flatten_inputs, split  # noqa: E402
from partita.plan import plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"
SYSTEMS = ("partita", "ray", "torch.pipelining")
HOST_FLOPS = 1e10  # the unit of the homogeneous cluster's devices (their speed, 1.0, is what emulation uses)
IN_FLIGHT = 32  # requests kept ahead when streaming through partita and Ray (partita's own default for 3 stages)
console = Console(width=None if sys.stdout.isatty() else 140)


# ----------------------------------------------------------------------------- models and the split


def small_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Six 256-wide Linear+ReLU layers, batch 1: ~20 µs of compute per stage, so overhead dominates."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(256, 256), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval(), (torch.randn(1, 256),)


def resnet50() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """torchvision resnet50 with random weights (no download), one 224x224 image."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval(), (torch.randn(1, 3, 224, 224),)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]] = {
    "mlp": small_mlp,
    "resnet50": resnet50,
}


def homogeneous_cluster(stages: int) -> ClusterSpec:
    """`stages` devices at this host's speed, unlimited links with no latency: no emulation at all."""
    devices = tuple(DeviceSpec(name=f"s{i}", flops_per_s=HOST_FLOPS, memory_bytes=2**34, speed=1.0) for i in range(stages))
    return ClusterSpec(devices=devices, source="client", default_link=LinkSpec(math.inf, 0.0))


def requests_for(example: tuple[torch.Tensor, ...], count: int) -> list[tuple[torch.Tensor, ...]]:
    """`count` distinct batch-1 requests shaped like `example` (a fixed seed: the same for every system)."""
    generator = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in example) for _ in range(count)]


# ----------------------------------------------------------------------------- the three systems


class PartitaRunner:
    """partita's Pipeline on the shared LocalCluster, deployed at exactly the benchmark's split."""

    def __init__(self, cluster, model, example, graph, programs) -> None:
        from partita.runtime import Measurements, deploy

        stages = [((f"s{p.index}",), p.start, p.end) for p in programs]
        # deploy's own profiling is skipped on purpose. With the split given, its segment times only
        # feed the plan's predictions; but a LocalCluster worker also paces each stage to the profiled
        # host time (the emulation basis), so a profile taken while the peers' processes start would
        # slow partita down. Without a host profile, workers pace to their own compute time: at speed
        # 1 and dilation 1 that is no pacing at all. The times below are the flops estimate.
        estimate = tuple(segment.flops / HOST_FLOPS for segment in graph.segments)
        measurements = Measurements({name: estimate for name in cluster.spec.names}, None, {})
        self.pipe = deploy(model, example, cluster, graph=graph, stages=stages, measurements=measurements)
        deployed = [(p.start, p.end) for p in self.pipe.stages]
        if deployed != [(p.start, p.end) for p in programs]:
            self.pipe.close()
            raise RuntimeError(f"partita deployed stages {deployed}, not the benchmark's split")

    def ready(self) -> None:
        pass

    def outputs(self, requests):
        return [tuple(flatten_inputs(self.pipe(*r))) for r in requests]

    def stream(self, requests) -> float:
        t0 = time.perf_counter()
        for _ in self.pipe.map(requests, in_flight=IN_FLIGHT):
            pass
        return time.perf_counter() - t0

    def latency(self, requests) -> list[float]:
        times = []
        for r in requests:
            t0 = time.perf_counter()
            self.pipe(*r)
            times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        self.pipe.close()


class RayRunner:
    def __init__(self, programs) -> None:
        from _peer_ray import RayChain

        self.chain = RayChain([p.to_bytes() for p in programs], wait=False)

    def ready(self) -> None:
        self.chain.wait_ready()

    def outputs(self, requests):
        return [self.chain(tuple(r)) for r in requests]

    def stream(self, requests) -> float:
        t0 = time.perf_counter()
        self.chain.stream(requests, IN_FLIGHT)
        return time.perf_counter() - t0

    def latency(self, requests) -> list[float]:
        times = []
        for r in requests:
            t0 = time.perf_counter()
            self.chain(tuple(r))
            times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        self.chain.close()


class TorchPipeliningRunner:
    def __init__(self, programs) -> None:
        from _peer_torchpp import TorchPipelining

        last = programs[-1].outputs
        shapes = [tuple(1 if d is None else d for d in spec.shape) for spec in last]
        dtypes = [getattr(torch, spec.dtype) for spec in last]
        self.peer = TorchPipelining([p.to_bytes() for p in programs], shapes, dtypes, wait=False)

    def ready(self) -> None:
        self.peer.wait_ready()

    def outputs(self, requests):
        _, merged = self.peer.stream(requests)
        return [tuple(t[i:i + 1] for t in merged) for i in range(len(requests))]

    def stream(self, requests) -> float:
        return self.peer.stream(requests)[0]

    def latency(self, requests) -> list[float]:
        return self.peer.latency(requests)

    def close(self) -> None:
        self.peer.close()


# ----------------------------------------------------------------------------- measuring


@dataclass
class Row:
    system: str
    reason: str | None = None  # why this system has no figures (None: it ran)
    outputs_match: bool | None = None
    throughput_rps: list[float] = field(default_factory=list)  # one per round
    latency_s: list[float] = field(default_factory=list)  # every single request of every round
    notes: str = ""

    def summary(self) -> dict:
        return {
            "system": self.system,
            "ran": self.reason is None,
            "reason": self.reason,
            "outputs_match": self.outputs_match,
            "throughput_rps": statistics.median(self.throughput_rps) if self.throughput_rps else None,
            "throughput_rps_rounds": self.throughput_rps,
            "latency_p50_s": statistics.median(self.latency_s) if self.latency_s else None,
            "latency_samples": len(self.latency_s),
            "notes": self.notes,
        }


def _failure(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]


def bench_model(name: str, args, shared: dict) -> dict:
    console.rule(f"[bold]{name}")
    model, example = MODELS[name]()
    t0 = time.perf_counter()
    graph = capture(model, example)
    chosen = plan(graph, homogeneous_cluster(args.stages), objective="throughput", planner="optimal",
                  replicate=False, max_stages=args.stages)
    cuts = chosen.cuts()
    programs = split(graph, cuts)
    console.print(f"captured {len(graph.segments)} segments in {time.perf_counter() - t0:.1f} s; cuts {cuts} -> "
                  f"{len(programs)} stages {[(p.start, p.end) for p in programs]}")

    n_stream = args.requests or (200 if name == "mlp" else 40)
    n_single = args.singles or (30 if name == "mlp" else 5)
    if args.quick:
        n_stream, n_single = max(4, n_stream // 4), max(2, n_single // 2)
    stream_requests = requests_for(example, n_stream)
    single_requests = stream_requests[:n_single]
    check_requests = requests_for(example, 4)
    with torch.no_grad():
        expected = [tuple(flatten_inputs(model(*r))) for r in check_requests]

    rows = {s: Row(s) for s in SYSTEMS}
    runners: dict = {}
    # Started in this order so the peers' processes load while partita deploys (setup is not timed).
    factories = {
        "torch.pipelining": lambda: TorchPipeliningRunner(programs),
        "ray": lambda: RayRunner(programs),
        "partita": lambda: PartitaRunner(shared["cluster"], model, example, graph, programs),
    }
    for system, reason in shared["errors"].items():
        rows[system].reason = reason
    rows["partita"].notes = f"map, {IN_FLIGHT} in flight, {'CURVE' if args.secure else 'plaintext'}"
    rows["ray"].notes = f"{IN_FLIGHT} chains in flight"
    rows["torch.pipelining"].notes = "GPipe: 1 step, all as microbatches; gloo, unencrypted"
    start = time.perf_counter()
    try:
        for system, make in factories.items():
            if rows[system].reason:
                continue
            try:
                runners[system] = make()
            except Exception as exc:  # a system that cannot run gets its reason in the table, not a number
                rows[system].reason = _failure(exc)
                if args.verbose:
                    traceback.print_exc()
        for system in SYSTEMS:
            runner = runners.get(system)
            if runner is None:
                continue
            try:
                runner.ready()
                got = runner.outputs(check_requests)
                rows[system].outputs_match = all(
                    len(g) == len(e) and all(torch.equal(a, b) for a, b in zip(g, e, strict=True))
                    for g, e in zip(got, expected, strict=True)
                )
                if not rows[system].outputs_match:
                    raise RuntimeError("outputs differ from the unsplit model's; not timed")
            except Exception as exc:  # as above: the row says why
                rows[system].reason = _failure(exc)
                if args.verbose:
                    traceback.print_exc()
                runners.pop(system).close()
                continue
            console.print(f"  {system}: ready after {time.perf_counter() - start:.1f} s, "
                          f"outputs equal to the unsplit model: {rows[system].outputs_match}")

        # Warm-up: a short stream and a few single requests each, not timed.
        for system, runner in list(runners.items()):
            try:
                runner.stream(stream_requests[: min(len(stream_requests), 2 * IN_FLIGHT, 16)])
                runner.latency(single_requests[:2])
            except Exception as exc:  # as above: the row says why
                rows[system].reason = _failure(exc)
                runners.pop(system).close()

        order = list(runners)
        for round_index in range(args.rounds):
            rotated = order[round_index % len(order):] + order[: round_index % len(order)] if order else []
            for system in rotated:
                runner = runners.get(system)
                if runner is None:
                    continue
                try:
                    seconds = runner.stream(stream_requests)
                    rows[system].throughput_rps.append(len(stream_requests) / seconds)
                    rows[system].latency_s += runner.latency(single_requests)
                except Exception as exc:  # as above: the row says why, and its figures are dropped
                    rows[system].reason = _failure(exc)
                    rows[system].throughput_rps, rows[system].latency_s = [], []
                    runners.pop(system).close()
            console.print(f"  round {round_index + 1}/{args.rounds}: "
                          + ", ".join(f"{s} {rows[s].throughput_rps[-1]:.1f} rps" for s in runners))
    finally:
        for runner in runners.values():
            runner.close()

    summaries = {s: rows[s].summary() for s in SYSTEMS}
    base = summaries["partita"]
    torch_pp = summaries["torch.pipelining"]
    compute_s = sum(stage_compute_s(p, example) for p in programs) if base["latency_p50_s"] else None
    versus = {
        "latency_ratio": base["latency_p50_s"] / torch_pp["latency_p50_s"]
        if base["latency_p50_s"] and torch_pp["latency_p50_s"] else None,
        "throughput_ratio": base["throughput_rps"] / torch_pp["throughput_rps"]
        if base["throughput_rps"] and torch_pp["throughput_rps"] else None,
    }
    hop_overhead_s = (base["latency_p50_s"] - compute_s) / (len(programs) + 1) if compute_s is not None else None
    for s in SYSTEMS:
        ok = base["throughput_rps"] and summaries[s]["throughput_rps"]
        summaries[s]["throughput_ratio"] = summaries[s]["throughput_rps"] / base["throughput_rps"] if ok else None
        ok = base["latency_p50_s"] and summaries[s]["latency_p50_s"]
        summaries[s]["latency_ratio"] = summaries[s]["latency_p50_s"] / base["latency_p50_s"] if ok else None
    return {
        "model": name,
        "segments": len(graph.segments),
        "cuts": cuts,
        "stages": [[p.start, p.end] for p in programs],
        "stream_requests": n_stream,
        "single_requests_per_round": n_single,
        "rounds": args.rounds,
        "in_flight": IN_FLIGHT,
        "systems": summaries,
        "partita_vs_torch_pipelining": versus,
        "stages_compute_s": compute_s,
        "partita_hop_overhead_s": hop_overhead_s,
    }


def stage_compute_s(program, example: tuple[torch.Tensor, ...], runs: int = 200) -> float:
    """Median seconds of one stage program's `run` on its batch-1 inputs, here, one thread."""
    inputs = tuple(torch.randn([1 if d is None else d for d in spec.shape], dtype=getattr(torch, spec.dtype))
                   for spec in program.inputs)
    runs = max(5, runs if example[0].numel() < 10**5 else 5)
    times = []
    with torch.no_grad():
        program.run(*inputs)
        for _ in range(runs):
            t0 = time.perf_counter()
            program.run(*inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(result: dict) -> None:
    table = Table(title=f"{result['model']}: {len(result['stages'])} stages {result['stages']}, batch 1, "
                        f"{result['stream_requests']} streamed requests x {result['rounds']} rounds")
    for column in ("system", "outputs equal", "throughput (req/s)", "× partita", "latency p50 (ms)", "× partita",
                   "note"):
        table.add_column(column, justify="left" if column in ("system", "note") else "right")
    for s in SYSTEMS:
        r = result["systems"][s]
        if not r["ran"]:
            match = {True: "yes", False: "[red]NO", None: "-"}[r["outputs_match"]]
            table.add_row(s, match, "-", "-", "-", "-", f"[red]did not run: {r['reason']}")
            continue
        table.add_row(
            s,
            {True: "[green]yes", False: "[red]NO", None: "-"}[r["outputs_match"]],
            f"{r['throughput_rps']:.1f}" if r["throughput_rps"] else "-",
            f"{r['throughput_ratio']:.2f}" if r["throughput_ratio"] else "-",
            f"{r['latency_p50_s'] * 1e3:.2f}" if r["latency_p50_s"] else "-",
            f"{r['latency_ratio']:.2f}" if r["latency_ratio"] else "-",
            r["notes"],
        )
    console.print(table)
    versus = result["partita_vs_torch_pipelining"]
    if versus["latency_ratio"] or versus["throughput_ratio"]:
        latency = f"{versus['latency_ratio']:.2f}" if versus["latency_ratio"] else "-"
        throughput = f"{versus['throughput_ratio']:.2f}" if versus["throughput_ratio"] else "-"
        console.print(f"partita / torch.pipelining, same run: single-request latency {latency}x (<= 1: partita as fast "
                      f"or faster), throughput {throughput}x (>= 1: partita as fast or faster)")
    if result["partita_hop_overhead_s"] is not None:
        console.print(f"partita per-hop overhead: {result['partita_hop_overhead_s'] * 1e3:.3f} ms "
                      f"(latency p50 less {result['stages_compute_s'] * 1e3:.3f} ms of stage compute, over "
                      f"{len(result['stages']) + 1} hops)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated, from: " + ", ".join(MODELS) + " (default: all; mlp with --quick)")
    parser.add_argument("--stages", type=int, default=3, help="pipeline stages (one process each, per system)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (medians reported)")
    parser.add_argument("--requests", type=int, default=0, help="streamed requests per round (0: 200 mlp, 40 resnet50)")
    parser.add_argument("--singles", type=int, default=0, help="single requests per round (0: 30 mlp, 5 resnet50)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the mlp only, 1 round, a quarter of the requests")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out (its rows say so)")
    parser.add_argument("--secure", action="store_true",
                        help="run partita with CURVE encryption, its default (the peers do not encrypt; without "
                             "this flag partita runs plaintext too, like with like)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of peers that fail")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    models = args.models or ("mlp" if args.quick else ",".join(MODELS))
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(1)

    started = time.perf_counter()
    shared: dict = {"errors": {}, "cluster": None}
    ray = None
    if args.no_ray:
        shared["errors"]["ray"] = "left out (--no-ray)"
    else:
        try:
            from _peer_ray import start_ray

            ray = start_ray(num_cpus=args.stages)
            shared["ray_version"] = ray.__version__
        except ImportError as exc:
            shared["errors"]["ray"] = f"ray is not installed ({exc.name}); pip install ray"
        except Exception as exc:  # Ray could not start here: its rows say why
            shared["errors"]["ray"] = f"ray did not start: {_failure(exc)}"
    results = []
    try:
        try:
            from partita.runtime import LocalCluster

            if not args.secure:
                logging.getLogger("partita.runtime.keys").setLevel(logging.ERROR)  # plaintext is chosen explicitly
            # One worker per stage at host speed (host_flops only names the unit: speed 1.0 is given).
            shared["cluster"] = LocalCluster(homogeneous_cluster(args.stages), dilation=1.0, secure=args.secure,
                                             host_flops=HOST_FLOPS).start()
        except Exception as exc:  # partita's rows say why; the peers still run
            shared["errors"]["partita"] = f"LocalCluster did not start: {_failure(exc)}"
        for name in names:
            result = bench_model(name, args, shared)
            print_table(result)
            results.append(result)
    finally:
        if shared["cluster"] is not None:
            shared["cluster"].close()
        if ray is not None:
            ray.shutdown()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "peers",
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                 "ray": shared.get("ray_version"), "cpus": __import__("os").cpu_count()},
        "budget": "one process per stage per system, torch.set_num_threads(1) each, loopback, no emulation",
        "partita_encryption": "CURVE" if args.secure else "none (the peers do not encrypt)",
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
        "models": results,
    }, indent=2))
    console.print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
