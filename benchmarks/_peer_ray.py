"""Peer for benchmarks/peers.py: the same stage programs as a chain of Ray actors.

One actor per stage (`num_cpus=1`, `torch.set_num_threads(1)`), each loading the stage archive
with `StageProgram.from_bytes` and calling `.run`. A request is a chain of actor calls composed
by the driver: `ref = a0.run.remote(x); ref = a1.run.remote(ref); ...; ray.get(ref)`. Ray moves
the activations (small ones inline through the driver, large ones through its shared-memory
object store); calls to one actor run in submission order, one at a time, so streaming many
requests pipelines the stages. This is the plain actor API, not Ray Compiled Graphs.

    ray_session = start_ray(num_cpus=3)
    with RayChain(archives) as chain:
        outputs = chain(x_flat)                 # one request
        results = chain.stream(requests, 32)    # many in flight, in order
    ray_session.shutdown()
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def start_ray(num_cpus: int):
    """Start a local Ray (no dashboard, no cluster) whose workers can import partita; returns the ray module."""
    import ray

    # Workers inherit the driver's environment at ray.init: partita importable, one OpenMP thread.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    return ray


class _StageActor:
    """One stage: loads the archive once, then runs it per call (flat tuple in, flat tuple out)."""

    def __init__(self, archive: bytes) -> None:
        torch.set_num_threads(1)
        sys.path.insert(0, str(ROOT))
        from partita.model import StageProgram

        self.program = StageProgram.from_bytes(archive)

    def run(self, flat: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.program.run(*flat)


class RayChain:
    """Actors for `archives` (stage archives in pipeline order), on a Ray started by `start_ray`.

    `wait` False returns once the actors are requested (call `wait_ready` before use).
    """

    def __init__(self, archives: Sequence[bytes], *, wait: bool = True) -> None:
        import ray

        self._ray = ray
        actor = ray.remote(num_cpus=1)(_StageActor)
        self.actors = [actor.remote(ray.put(archive)) for archive in archives]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every actor has loaded its stage (its constructor ran), so setup is not timed."""
        self._ray.get([a.__ray_ready__.remote() for a in self.actors])

    def __enter__(self) -> RayChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, flat: tuple[torch.Tensor, ...]):
        ref = flat
        for actor in self.actors:
            ref = actor.run.remote(ref)
        return ref

    def __call__(self, flat: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self._ray.get(self.submit(flat))

    def stream(self, requests: Sequence[tuple[torch.Tensor, ...]], in_flight: int) -> list[tuple[torch.Tensor, ...]]:
        """Submit requests keeping up to `in_flight` chains ahead; results in order (as Pipeline.map)."""
        window, results = [], []
        for flat in requests:
            window.append(self.submit(flat))
            if len(window) >= in_flight:
                results.append(self._ray.get(window.pop(0)))
        results.extend(self._ray.get(window))
        return results

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
