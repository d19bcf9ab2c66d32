"""A tiled stage on real workers over ZeroMQ: the source scatters halo'd crops, gathers and stitches the tiles.

A LocalCluster of two emulated devices on loopback; a small conv model whose first segments are
split into two strips, one per worker, and whose head runs on the first of them (so that worker
holds a tile and the rest of the model). Outputs are compared with the unsplit model with
torch.equal, several requests in flight; then the other tile's worker is killed mid-stream and
every request is still answered, exactly.
"""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn
from zoo import local_cluster

from partita.halo import tile_grid
from partita.model import capture
from partita.plan import load_profile
from partita.plan.tiles import tiled_plan
from partita.runtime.coordinator import deploy
from partita.runtime.supervisor import Supervision

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

DEVICES = ("a", "b")


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(DEVICES) as local:
        yield local


def test_tiles_on_workers_equal_the_unsplit_model_in_flight_and_survive_a_killed_tile_worker(cluster):
    model, x = conv_model(), torch.randn(2, 3, 32, 32)
    graph = capture(model, (x,))
    profile = load_profile(graph)
    end = next(i for i in range(len(graph.segments), 0, -1) if profile.block(0, i) is not None)
    block = profile.block(0, end)
    regions = tile_grid(block.out_shape[1], block.out_shape[2], 2, 1)
    stages = tiled_plan(profile, cluster.spec, end=end, grid=(2, 1), tiles=list(zip(DEVICES, regions, strict=True)),
                        tail="a").stages
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(16)]
    with deploy(model, (x,), cluster, objective="latency", graph=graph, stages=stages, reps=1,
                supervise=Supervision(detection_s=1.0, drift=False)) as pipe:
        assert pipe.plan.stages[0].kind == "tiled" and pipe.plan.stages[0].grid == (2, 1)
        first = list(pipe.map(inputs[:8], in_flight=8))
        stats = pipe.stats()
        futures = [pipe.submit(xi) for xi in inputs[8:12]]
        cluster.processes["b"].send_signal(signal.SIGKILL)  # the lower strip's worker, mid-stream
        futures += [pipe.submit(xi) for xi in inputs[12:]]
        rest = [f.result(timeout=120) for f in futures]
        after = pipe.plan
    assert stats["delivered"] == 8 and stats["max_in_flight"] > 1
    assert stats["stages"][0]["requests"] == 2 * 8  # every tile computed every request
    assert [stage.devices for stage in after.stages] == [("a",)]  # re-planned around b, as a chain
    with torch.no_grad():
        for got, xi in zip(first + rest, inputs, strict=True):
            assert torch.equal(got, model(xi))
