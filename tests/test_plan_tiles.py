"""Tiled plans (pure): the latency planner's three shapes, the cost model of a tiled stage, the simulator.

The profile is written by hand: four 3x3 convolutions on a 64 x 64 map, then a head that cannot be
tiled. Reference latencies are computed here from the halo arithmetic's closed form, not by the planner.
"""

from __future__ import annotations

import json

import pytest

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec
from partita.errors import PlanError
from partita.plan import Plan, load_profile, plan, predict
from partita.sim import simulate

SIZE, CHANNELS = 64, 16
PX_FLOPS = 2 * CHANNELS * CHANNELS * 9
MAP_BYTES = CHANNELS * SIZE * SIZE * 4


def _conv_block(c_in: int) -> dict:
    return {"in_shape": [c_in, SIZE, SIZE], "batch": 1, "itemsize": 4, "layers": [
        {"name": "conv", "inputs": [-1], "shape": [CHANNELS, SIZE, SIZE], "flops_per_px": 2 * c_in * CHANNELS * 9,
         "window": {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}},
        {"name": "relu", "inputs": [0], "shape": [CHANNELS, SIZE, SIZE]},
    ]}


PROFILE = {
    "model": "convs",
    "input_bytes": 3 * SIZE * SIZE * 4,
    "segments": [
        {"name": f"conv{i}", "flops": (2 * (3 if i == 0 else CHANNELS) * CHANNELS * 9) * SIZE * SIZE,
         "param_bytes": 10_000, "act_bytes": 2 * MAP_BYTES, "out_bytes": MAP_BYTES}
        for i in range(4)
    ] + [{"name": "head", "flops": 10**6, "param_bytes": 1_000_000, "act_bytes": MAP_BYTES, "out_bytes": 40}],
    "blocks": [_conv_block(3)] + [_conv_block(CHANNELS) for _ in range(3)] + [None],
}
TOTAL_FLOPS = sum(s["flops"] for s in PROFILE["segments"])


def cluster(speeds=(1e9,) * 4, bandwidth=125e6, latency=0.0005, memory=2**30) -> ClusterSpec:
    devices = tuple(DeviceSpec(f"d{i}", s, memory) for i, s in enumerate(speeds))
    return ClusterSpec(devices, "src", LinkSpec(bandwidth, latency))


def test_four_equal_devices_on_gigabit_get_tiles_then_a_chain():
    spec = cluster()
    chosen = plan(PROFILE, spec, objective="latency")
    chain = plan(PROFILE, spec, objective="latency", tiles=False)
    tiled = chosen.stages[0]
    assert tiled.kind == "tiled" and chosen.stages[-1].kind == "chain"
    assert tiled.grid[0] * tiled.grid[1] == 4 and len(set(tiled.devices)) == 4
    assert all(stage.kind == "chain" for stage in chain.stages)
    assert chosen.latency_s < chain.latency_s / 2
    # the tiles cover the output map exactly once
    covered = sorted((t.rows, t.cols) for t in tiled.tiles)
    area = sum((r[1] - r[0]) * (c[1] - c[0]) for r, c in covered)
    assert area == SIZE * SIZE


def test_a_tiled_plans_latency_follows_the_closed_form():
    # 2x2 grid of 32x32 tiles over all 4 convs: a corner tile reads 32+4 rows and cols (a 4-wide halo on its
    # inner sides), and each conv computes a region that shrinks by one per layer: 35, 34, 33, 32.
    spec = cluster()
    tiles = [("d0", ((0, 32), (0, 32))), ("d1", ((0, 32), (32, 64))), ("d2", ((32, 64), (0, 32))),
             ("d3", ((32, 64), (32, 64)))]
    from partita.plan.tiles import tiled_plan

    got = tiled_plan(load_profile(PROFILE), spec, end=4, grid=(2, 2), tiles=tiles, tail="d0")
    flops = 2 * 3 * CHANNELS * 9 * 35**2 + PX_FLOPS * (34**2 + 33**2 + 32**2)
    crop_bytes = 3 * 36 * 36 * 4
    out_bytes = CHANNELS * 32 * 32 * 4
    scatter = 0.0005 + crop_bytes / 125e6
    gather = 0.0005 + out_bytes / 125e6  # every tile back to the source, which stitches
    head = 0.0005 + 4 * out_bytes / 125e6 + 10**6 / 1e9 + 0.0005 + 40 / 125e6  # the map to d0, the head, back
    want = scatter + flops / 1e9 + gather + head
    assert got.latency_s == pytest.approx(want, rel=1e-9)
    assert got.stages[0].tiles[0].in_bytes == crop_bytes


def test_unequal_devices_get_strips_proportional_to_speed():
    spec = cluster(speeds=(4e9, 1e9, 1e9, 1e9))
    chosen = plan(PROFILE, spec, objective="latency")
    tiled = chosen.stages[0]
    assert tiled.kind == "tiled" and 1 in tiled.grid
    sizes = {t.device: (t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in tiled.tiles}
    assert sizes["d0"] > 2.5 * max(sizes[d] for d in sizes if d != "d0")
    computes = [t.compute_s for t in tiled.tiles]
    assert max(computes) < 1.25 * min(computes)  # balanced, halos included
    even = plan(PROFILE, cluster(speeds=(1e9,) * 4), objective="latency")
    assert chosen.latency_s < even.latency_s


def test_slow_links_make_the_chain_win():
    spec = cluster(bandwidth=0.2e6, latency=0.01)
    chosen = plan(PROFILE, ClusterSpec(spec.devices, "d0", spec.default_link), objective="latency")
    assert all(stage.kind == "chain" for stage in chosen.stages)


def test_tiles_respect_each_devices_memory_where_the_untiled_block_does_not_fit():
    # the untiled block needs its weights and two 256 KiB maps: more than 200 KB; a 2x2 tile needs a quarter
    small = ClusterSpec(tuple(DeviceSpec(f"d{i}", 1e9, 200_000) for i in range(4)), "src", cluster().default_link)
    profile = {**PROFILE, "segments": PROFILE["segments"][:4], "blocks": PROFILE["blocks"][:4]}
    with pytest.raises(PlanError, match="needs"):
        plan(profile, small, objective="latency", tiles=False)
    chosen = plan(profile, small, objective="latency")
    assert chosen.stages[0].kind == "tiled"
    assert all(t.memory_bytes <= 200_000 for t in chosen.stages[0].tiles)


def test_no_tiles_and_the_throughput_objective_plan_chains_only():
    spec = cluster()
    assert all(s.kind == "chain" for s in plan(PROFILE, spec, objective="latency", tiles=False).stages)
    assert all(s.kind == "chain" for s in plan(PROFILE, spec, objective="throughput").stages)


def test_tiled_plan_json_round_trips_with_the_contract_keys_and_predict_reproduces_it():
    spec = cluster()
    chosen = plan(PROFILE, spec, objective="latency")
    data = json.loads(chosen.to_json())
    stage = data["stages"][0]
    assert stage["kind"] == "tiled" and len(stage["grid"]) == 2
    assert set(stage["tiles"][0]) >= {"device", "rows", "cols"}
    assert data["stages"][1]["kind"] == "chain"
    assert Plan.from_json(chosen.to_json()) == chosen
    assert predict(PROFILE, spec, chosen.stages, objective="latency", planner="optimal") == chosen
    assert "2x2 tiles" in str(chosen) or "1x4 tiles" in str(chosen) or "4x1 tiles" in str(chosen)


def test_the_simulator_reproduces_a_tiled_plans_latency_and_period():
    spec = cluster(speeds=(4e9, 1e9, 1e9, 1e9))
    chosen = plan(PROFILE, spec, objective="latency")
    one = simulate(chosen, spec, PROFILE, requests=1, in_flight=1)
    assert one.latency_p50_s == pytest.approx(chosen.latency_s, rel=1e-9)
    many = simulate(chosen, spec, PROFILE, requests=400)
    assert many.throughput_rps == pytest.approx(chosen.throughput_rps, rel=0.02)


def test_partita_plan_considers_tiles_for_latency_unless_no_tiles(capsys, tmp_path):
    from partita.cli import main

    profile = tmp_path / "convs.json"
    profile.write_text(json.dumps(PROFILE))
    quad = tmp_path / "quad.yaml"  # four slow devices on Gigabit: tiles pay for this small model
    quad.write_text("source: client\ndevices:\n" + "".join(
        f"  - {{name: {n}, compute: 1GFLOPS, memory: 1GiB}}\n" for n in "abcd"
    ) + "links:\n  default: {bandwidth: 1Gbit/s, latency: 0.5ms}\n")

    def run(*args: str) -> str:
        try:
            main(["plan", "--profile", str(profile), "--cluster", str(quad), "--objective", "latency", *args])
        except SystemExit as exc:
            assert not exc.code
        return capsys.readouterr().out

    tiled = json.loads(run("--json"))
    assert tiled["stages"][0]["kind"] == "tiled" and tiled["stages"][0]["grid"] == [2, 2]
    chain = json.loads(run("--json", "--no-tiles"))
    assert [stage["kind"] for stage in chain["stages"]] == ["chain"] * len(chain["stages"])
    assert "2x2 tiles" in run()  # the stage table names the grid
