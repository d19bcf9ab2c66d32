"""Peer for benchmarks/peers.py: the same stage programs under torch.distributed.pipelining over gloo.

One spawned process per stage (rank k holds stage k), `torch.set_num_threads(1)` in each, gloo
on loopback. Each rank wraps its `StageProgram.run` in an `nn.Module` and hands it to a
`PipelineStage`; a `ScheduleGPipe` runs forward only (`schedule.eval`, no loss, no backward).
The computation is the stage archive's, byte for byte the one partita and Ray run.

Rank 0 takes the requests (one microbatch of batch 1 per request) and, so that a figure covers
the same path as partita's and Ray's (requests in, results back to the client), the last rank
sends the merged outputs back to rank 0 over gloo. Rank 0 times from the start of the schedule
step to the arrival of those outputs; the parent only sends commands and reads timings.

    with TorchPipelining(archives, example_outputs) as peer:
        seconds, outputs = peer.stream(inputs)           # one step, len(inputs) microbatches
        seconds_each = peer.latency(inputs)              # one step per request
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
STEP_TIMEOUT_S = 600.0


class TorchPipelining:
    """Ranks 0..n-1 of a gloo process group, stage k on rank k, driven through pipes from here.

    `archives` are the stage archives (`StageProgram.to_bytes()`), in pipeline order.
    `wait` False returns once the processes are spawned (call `wait_ready` before use), so the
    ranks can start while something else is set up. `output_shapes` are the shapes of the last stage's flat outputs at batch 1 (rank 0 receives
    into buffers of these shapes, batch dimension 0 scaled by the request count).
    """

    def __init__(self, archives: Sequence[bytes], output_shapes: Sequence[tuple[int, ...]],
                 output_dtypes: Sequence[torch.dtype], *, wait: bool = True) -> None:
        self.world = len(archives)
        if self.world < 2:
            raise ValueError("torch.distributed.pipelining needs at least 2 stages here (one rank each)")
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._conns = []
        self._procs = []
        for rank, archive in enumerate(archives):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main,
                args=(rank, self.world, port, archive, child, tuple(output_shapes), tuple(output_dtypes)),
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._ready = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every rank has joined the group and loaded its stage (`wait=False` starts without waiting)."""
        if not self._ready:
            for rank, conn in enumerate(self._conns):
                self._expect(conn, rank, "ready", START_TIMEOUT_S)
            self._ready = True

    def __enter__(self) -> TorchPipelining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, inputs: Sequence[tuple[torch.Tensor, ...]]) -> tuple[float, tuple[torch.Tensor, ...]]:
        """All requests as microbatches of one step: (seconds, the last stage's outputs, concatenated)."""
        seconds, outputs = self._command("stream", inputs)
        return seconds[0], outputs

    def latency(self, inputs: Sequence[tuple[torch.Tensor, ...]]) -> list[float]:
        """One step of one microbatch per request, one after the other: seconds per request."""
        seconds, _ = self._command("single", inputs)
        return seconds

    def _command(self, kind: str, inputs: Sequence[tuple[torch.Tensor, ...]]) -> tuple[list[float], tuple]:
        # Ranks after 0 first, so they are waiting to receive when rank 0 starts sending.
        for rank in range(self.world - 1, 0, -1):
            self._conns[rank].send((kind, len(inputs), None))
        self._conns[0].send((kind, len(inputs), list(inputs)))
        for rank in range(self.world - 1, 0, -1):
            self._expect(self._conns[rank], rank, "done", STEP_TIMEOUT_S)
        _, seconds, outputs = self._expect(self._conns[0], 0, "done", STEP_TIMEOUT_S)
        return seconds, outputs

    def _expect(self, conn, rank: int, kind: str, timeout_s: float) -> tuple:
        if not conn.poll(timeout_s):
            raise RuntimeError(f"torch.distributed.pipelining rank {rank} did not answer within {timeout_s:g} s")
        reply = conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"torch.distributed.pipelining rank {rank} failed: {reply[1]}")
        if reply[0] != kind:
            raise RuntimeError(f"torch.distributed.pipelining rank {rank} answered {reply[0]!r}, expected {kind!r}")
        return reply

    def close(self) -> None:
        """Stop every rank (they leave the process group and exit); kill any that does not. Idempotent."""
        for conn in self._conns:
            try:
                conn.send(("stop", 0, None))
            except (BrokenPipeError, OSError):
                # The rank is already gone; nothing to tell it.
                pass
        for proc in self._procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one rank (child process)


class _StageModule(torch.nn.Module):
    """A StageProgram as the nn.Module PipelineStage wants: flat tensors in, flat tensors out."""

    def __init__(self, program) -> None:
        super().__init__()
        self.program = program

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.program.run(*tensors)


def _rank_main(rank, world, port, archive, conn, output_shapes, output_dtypes) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from partita.model import StageProgram

    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        module = _StageModule(StageProgram.from_bytes(archive))
        schedules: dict[int, ScheduleGPipe] = {}

        def schedule(n: int) -> ScheduleGPipe:
            if n not in schedules:
                stage = PipelineStage(module, rank, world, torch.device("cpu"))
                schedules[n] = ScheduleGPipe(stage, n_microbatches=n)
            return schedules[n]

        def step(n: int, mbs: list | None) -> tuple[float, tuple[torch.Tensor, ...] | None]:
            """One schedule step of n microbatches; on rank 0: (seconds, outputs returned by the last rank)."""
            import time

            t0 = time.perf_counter()
            with torch.no_grad():
                merged = schedule(n).eval(arg_mbs=mbs) if rank == 0 else schedule(n).eval()
            if rank == world - 1:
                flat = (merged,) if isinstance(merged, torch.Tensor) else tuple(merged)
                for tensor in flat:
                    dist.send(tensor.contiguous(), dst=0)
            if rank != 0:
                return 0.0, None
            back = tuple(torch.empty((n, *shape[1:]), dtype=dtype) for shape, dtype in zip(output_shapes, output_dtypes,
                                                                                            strict=True))
            for buffer in back:
                dist.recv(buffer, src=world - 1)
            return time.perf_counter() - t0, back

        conn.send(("ready",))
        while True:
            kind, count, inputs = conn.recv()
            if kind == "stop":
                break
            if kind == "stream":
                seconds, outputs = step(count, [tuple(x) for x in inputs] if rank == 0 else None)
                conn.send(("done", [seconds], outputs))
            elif kind == "single":
                times = []
                for i in range(count):
                    seconds, _ = step(1, [tuple(inputs[i])] if rank == 0 else None)
                    times.append(seconds)
                conn.send(("done", times, None))
    except Exception as exc:  # reported to the parent, which names the peer's failure in its table row
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
