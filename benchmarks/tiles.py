"""Fused tiles: one request's latency against the single fastest device and the best chain, in one run.

    .venv/bin/python benchmarks/tiles.py [--reps 3] [--models vgg16,resnet18]

For vgg16 and resnet18 at 224 x 224 (batch 1, random weights) on four emulated clusters, every
figure is measured in this run on this machine, one torch thread:

- the model's segments are timed on this host (`time_programs`); an emulated device of F FLOP/s
  has speed s = F / this host's matmul FLOP/s and takes host time / s (as `LocalCluster` paces an
  emulated worker): Pi-class devices of 10 GFLOP/s, a Jetson-class one of 40 GFLOP/s;
- the planner (`partita.plan.plan`, objective latency, fed those segment times) chooses the best
  chain (`--no-tiles`) and the best plan with tiles;
- the tiled plan's tile programs are built from the captured graph, exported, and each is run on
  its halo'd crop and timed; its latency is max over tiles (scatter from the source + tile time /
  speed + gather to the source, which stitches) + the map's way to the next device + the rest of
  the model there + the result's way back, with link times from the cluster (latency + bytes /
  bandwidth), and the stitched output is compared with the unsplit model.

So "measured" tile latencies use real tile programs but emulated device speeds and link times,
composed as the runtime routes them, not a run on ZeroMQ workers (a 2-core machine cannot run four
vgg16 tiles at once faithfully; tests/test_tiles_runtime.py runs tiles on workers). The
single-device and chain latencies are the cost model on the measured segment times.

A last table gives the memory a device needs for the first 16 layers of a Darknet-19/YOLOv2-like
conv stack (defined here) at 608 x 608 on a 5 x 5 grid, against the untiled stack, beside
DeepThings' reported 68%.

Writes benchmarks/results/tiles.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec  # noqa: E402
from partita.halo import Block, Layer, Window, tile_cost, tile_grid  # noqa: E402
from partita.model import capture, split  # noqa: E402
from partita.model.tiles import stitch, tile_programs  # noqa: E402
from partita.plan import load_profile, plan  # noqa: E402
from partita.runtime.local import host_flops_per_s  # noqa: E402
from partita.runtime.profile import time_programs  # noqa: E402

console = Console(width=max(Console().width, 160))
GIGABIT = LinkSpec(125e6, 0.0005)
WIFI = LinkSpec(50e6 / 8, 0.003)  # 802.11n as measured in homes: ~50 Mbit/s, 3 ms
SLOW_WIFI = LinkSpec(10e6 / 8, 0.005)


PI = 10e9  # a Raspberry Pi 4-class device: ~10 GFLOP/s fp32
JETSON = 40e9  # a Jetson-class device


@dataclass(frozen=True)
class Scenario:
    name: str
    flops: tuple[float, ...]  # each device's FLOP/s; its speed is that over this host's (as LocalCluster emulates)
    link: LinkSpec
    source: str = "client"  # "d0": the camera is on the first device (its own input costs no link)


SCENARIOS = [
    Scenario("4 equal (Pi-class), Gigabit", (PI,) * 4, GIGABIT),
    Scenario("1 fast (Jetson) + 3 slow (Pi), Gigabit", (JETSON, PI, PI, PI), GIGABIT),
    Scenario("4 equal (Pi-class), Wi-Fi 50 Mbit/s", (PI,) * 4, WIFI),
    Scenario("4 equal (Pi-class), Wi-Fi 10 Mbit/s, camera on d0", (PI,) * 4, SLOW_WIFI, source="d0"),
]


def cluster_for(scenario: Scenario) -> ClusterSpec:
    # memory is ample: latency is the point here
    devices = tuple(DeviceSpec(f"d{i}", f, 8 * 2**30) for i, f in enumerate(scenario.flops))
    return ClusterSpec(devices, scenario.source, scenario.link)


def transfer_s(cluster: ClusterSpec, a: str, b: str, nbytes: float) -> float:
    if a == b:
        return 0.0
    link = cluster.link(a, b)
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


def best_of(reps: int, fn) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def model_rows(name: str, reps: int, host_flops: float) -> list[dict]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    graph = capture(model, (x,), name=name)
    profile = load_profile(graph)
    segments = split(graph, list(range(len(graph.segments) - 1)))
    host_s = time_programs(segments, (x,), reps=reps)
    with torch.no_grad():
        reference = model(x)
    rows = []
    for scenario in SCENARIOS:
        spec = cluster_for(scenario)
        speeds = {d.name: d.flops_per_s / host_flops for d in spec.devices}
        times = {d.name: [t / speeds[d.name] for t in host_s] for d in spec.devices}
        fastest = max(spec.devices, key=lambda d: d.flops_per_s).name
        single = (transfer_s(spec, spec.source, fastest, profile.input_bytes) + sum(times[fastest])
                  + transfer_s(spec, fastest, spec.source, profile.cut_bytes(len(profile.segments))))
        chain = plan(profile, spec, objective="latency", tiles=False, segment_times_s=times)
        chosen = plan(profile, spec, objective="latency", segment_times_s=times)
        row = {"model": name, "cluster": scenario.name, "single_s": single, "chain_s": chain.latency_s,
               "predicted_s": chosen.latency_s, "shape": "chain", "measured_s": chain.latency_s,
               "bit_identical": None, "grid": None}
        first = chosen.stages[0]
        if first.kind == "tiled":
            row.update(_run_tiles(graph, spec, speeds, chosen, x, reference, reps))
        row["vs_single"] = single / row["measured_s"]
        row["vs_chain"] = chain.latency_s / row["measured_s"]
        rows.append(row)
        console.print(f"  {name} · {scenario.name}: {row['shape']} {row['measured_s'] * 1e3:.1f} ms", highlight=False)
    return rows


def _run_tiles(graph, spec, speeds, chosen, x, reference, reps) -> dict:
    tiled = chosen.stages[0]
    regions = [(t.rows, t.cols) for t in tiled.tiles]
    tiles = tile_programs(graph, 0, tiled.end, regions)
    crops = [t.take(x) for t in tiles]
    outputs = [t.run(c) for t, c in zip(tiles, crops, strict=True)]
    tail_device = chosen.stages[1].devices[0] if len(chosen.stages) > 1 else None
    gather_to = spec.source  # the source stitches, as the runtime does
    finish = 0.0
    for tile, plan_tile, crop, out in zip(tiles, tiled.tiles, crops, outputs, strict=True):
        host = best_of(reps, lambda tile=tile, crop=crop: tile.run(crop))
        finish = max(finish, transfer_s(spec, spec.source, plan_tile.device, crop.numel() * crop.element_size())
                     + host / speeds[plan_tile.device]
                     + transfer_s(spec, plan_tile.device, gather_to, out.numel() * out.element_size()))
    stitched = stitch(tiles, outputs)
    if tail_device is not None:
        rest = split(graph, [tiled.end - 1])[1]
        result = rest.run(stitched)[0]
        host = best_of(reps, lambda: rest.run(stitched))
        finish += (transfer_s(spec, spec.source, tail_device, stitched.numel() * stitched.element_size())
                   + host / speeds[tail_device] + transfer_s(spec, tail_device, spec.source, result.numel() * 4))
    else:
        result = stitched
    return {"shape": f"{tiled.grid[0]}x{tiled.grid[1]} tiles [0, {tiled.end}) + chain", "measured_s": finish,
            "grid": list(tiled.grid), "bit_identical": bool(torch.equal(result, reference)),
            "max_abs_diff": float((result - reference).abs().max()),
            "tile_rows_cols": [[list(t.rows), list(t.cols), t.device] for t in tiled.tiles]}


# --------------------------------------------------------------------------- memory (DeepThings)


def darknet16() -> list[tuple[str, int, int, int]]:
    """The first 16 layers of YOLOv2 (Darknet-19's trunk): (kind, out channels, kernel, stride)."""
    c = "conv"
    return [(c, 32, 3, 1), ("max", 32, 2, 2), (c, 64, 3, 1), ("max", 64, 2, 2), (c, 128, 3, 1), (c, 64, 1, 1),
            (c, 128, 3, 1), ("max", 128, 2, 2), (c, 256, 3, 1), (c, 128, 1, 1), (c, 256, 3, 1), ("max", 256, 2, 2),
            (c, 512, 3, 1), (c, 256, 1, 1), (c, 512, 3, 1), (c, 256, 1, 1)]


def darknet_block(size: int) -> tuple[Block, int]:
    """The stack as fused-block geometry (BN + leaky ReLU are pointwise: folded into each conv's output)."""
    layers, c_in, h, params = [], 3, size, 0
    for i, (kind, c_out, k, s) in enumerate(darknet16()):
        if kind == "conv":
            window = Window((k, k), (1, 1), (k // 2, k // 2))
            flops = 2 * c_in * c_out * k * k
            params += (c_in * c_out * k * k + 4 * c_out) * 4
        else:
            window, flops, h = Window((k, k), (s, s)), 0, h // s
        layers.append(Layer(f"{kind}{i}", (i - 1,), (c_out, h, h), window, flops))
        c_in = c_out
    return Block((3, size, size), tuple(layers)), params


def memory_rows() -> list[dict]:
    rows = []
    for size in (608, 416):
        block, params = darknet_block(size)
        height = block.out_shape[1]
        whole = tile_cost(block, ((0, height), (0, height)))
        tiles = [tile_cost(block, region) for region in tile_grid(height, height, 5, 5)]
        worst = max(t.act_bytes for t in tiles)
        rows.append({
            "input": size, "grid": [5, 5], "weights_bytes": params,
            "untiled_act_bytes": whole.act_bytes, "tile_act_bytes_max": worst,
            "act_reduction": 1 - worst / whole.act_bytes,
            "total_reduction": 1 - (params + worst) / (params + whole.act_bytes),
            "flops_overhead": sum(t.flops for t in tiles) / whole.flops - 1,
        })
    return rows


def check_darknet_tiles() -> bool:
    """The Darknet stack as a real model at 96 x 96: its 5x5 tiles stitched back equal it bit for bit."""
    torch.manual_seed(0)
    modules, c_in = [], 3
    for kind, c_out, k, s in darknet16():
        if kind == "conv":
            modules += [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
        else:
            modules.append(nn.MaxPool2d(k, s))
        c_in = c_out
    model = nn.Sequential(*modules).eval()
    x = torch.randn(1, 3, 160, 160)
    graph = capture(model, (x,))
    tiles = tile_programs(graph, 0, len(graph.segments), tile_grid(10, 10, 5, 5))
    with torch.no_grad():
        return bool(torch.equal(stitch(tiles, [t.run(t.take(x)) for t in tiles]), model(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default="vgg16,resnet18")
    args = parser.parse_args()
    torch.set_num_threads(1)
    host_flops = host_flops_per_s(1)
    console.print(f"this host: {host_flops / 1e9:.1f} GFLOP/s on one thread (emulated speeds are relative to it)",
                  highlight=False)
    rows = []
    for name in args.models.split(","):
        console.print(f"{name}: capture, time segments, plan, run tiles …", highlight=False)
        rows += model_rows(name, args.reps, host_flops)

    table = Table(title="One request's latency (ms): single fastest device, best chain, best plan with tiles")
    for column in ("model", "cluster", "single", "best chain", "chosen", "predicted", "measured", "× vs single",
                   "× vs chain", "bit-identical"):
        table.add_column(column, justify="left" if column in ("model", "cluster", "chosen") else "right")
    for r in rows:
        table.add_row(r["model"], r["cluster"], f"{r['single_s'] * 1e3:.1f}", f"{r['chain_s'] * 1e3:.1f}", r["shape"],
                      f"{r['predicted_s'] * 1e3:.1f}", f"{r['measured_s'] * 1e3:.1f}", f"{r['vs_single']:.2f}",
                      f"{r['vs_chain']:.2f}", "-" if r["bit_identical"] is None else str(r["bit_identical"]))
    console.print(table)

    memory = memory_rows()
    identical = check_darknet_tiles()
    mem = Table(title="First 16 layers of a YOLOv2-like Darknet stack on a 5x5 grid: memory per device")
    for column in ("input", "weights MiB", "untiled act. MiB", "largest tile act. MiB", "activation reduction",
                   "weights+act. reduction", "FLOPs overhead (halos)", "DeepThings"):
        mem.add_column(column, justify="right")
    for r in memory:
        mem.add_row(f"{r['input']}²", f"{r['weights_bytes'] / 2**20:.2f}", f"{r['untiled_act_bytes'] / 2**20:.1f}",
                    f"{r['tile_act_bytes_max'] / 2**20:.2f}", f"{r['act_reduction']:.1%}",
                    f"{r['total_reduction']:.1%}", f"{r['flops_overhead']:.1%}", "68% (608², 5x5)")
    console.print(mem)
    console.print(f"Darknet stack at 160² on a 5x5 grid, stitched tiles bit-identical to the model: {identical}")

    out = ROOT / "benchmarks" / "results" / "tiles.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host_flops_per_s": host_flops, "latency": rows, "memory": memory,
                               "darknet_tiles_bit_identical": identical}, indent=2))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
