"""Measuring devices and links: what deploy feeds the planner instead of catalog guesses.

* `matmul_flops_per_s`: a short fp32 matmul benchmark of a torch device (what a worker reports).
* `time_programs`: per-program seconds of a chain of stage programs (one per segment, say), run
  in order on real inputs, median of `reps` after a warm-up. This is what the planner gets as
  `segment_times_s`: it captures what FLOP counts miss (memory-bound layers, kernel choice).
* `measure_link`: RTT and bandwidth over the real transport, through a connected DEALER socket
  whose peer answers `echo` messages (every worker's data socket does).

All times are seconds of the machine that runs them; an emulated worker scales them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import zmq

from partita.errors import ProfileError
from partita.runtime.wire import blob_tensor, decode, encode


def matmul_flops_per_s(device: torch.device | str = "cpu", *, size: int = 384, min_time_s: float = 0.15) -> float:
    """Sustained fp32 FLOP/s of `device` on square matmuls of `size` (2 * size**3 FLOPs each)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up: kernel selection and allocation
    _sync(device)
    reps = 0
    started = time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        if reps % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= min_time_s:
                return 2.0 * size**3 * reps / elapsed


def time_programs(
    programs: Sequence[Any], inputs: Sequence[torch.Tensor], *, reps: int = 3, device: torch.device | str = "cpu"
) -> list[float]:
    """Median seconds of each program in a chain; program k+1 takes program k's outputs.

    One warm-up pass runs first (allocations, lazy initialisation), so the figures are steady-state.
    """
    if reps < 1:
        raise ProfileError(f"reps must be at least 1, got {reps}")
    device = torch.device(device)
    samples: list[list[float]] = [[] for _ in programs]
    with torch.no_grad():
        for rep in range(reps + 1):
            values = tuple(t.to(device) for t in inputs)
            for k, program in enumerate(programs):
                _sync(device)
                started = time.perf_counter()
                values = tuple(program.run(*values))
                _sync(device)
                if rep > 0:
                    samples[k].append(time.perf_counter() - started)
    return [statistics.median(s) for s in samples]


def measure_link(
    socket: zmq.Socket, *, payload_bytes: int = 4 * 2**20, reps: int = 5, timeout_s: float = 10.0
) -> dict[str, float]:
    """RTT (s) and bandwidth (bytes/s) to the peer at the other end of a connected DEALER `socket`.

    RTT is the median of `reps` empty echoes; bandwidth divides `payload_bytes` by the time a
    payload's echo took beyond one RTT (the reply carries no payload), best of `reps`.
    """
    rtts = [_echo(socket, None, timeout_s) for _ in range(reps + 1)][1:]
    rtt_s = statistics.median(rtts)
    blob = blob_tensor(bytes(payload_bytes))
    best_s = min(_echo(socket, blob, timeout_s) for _ in range(max(2, reps // 2)))
    transfer_s = max(best_s - rtt_s, 1e-9)
    return {"rtt_s": rtt_s, "bandwidth_bytes_per_s": payload_bytes / transfer_s, "payload_bytes": payload_bytes}


def _echo(socket: zmq.Socket, blob: torch.Tensor | None, timeout_s: float) -> float:
    started = time.perf_counter()
    socket.send_multipart(encode("echo", {}, () if blob is None else (blob,)), copy=False)
    if not socket.poll(timeout_s * 1000):
        raise ProfileError(f"no echo from the probed peer within {timeout_s} s; is it running and does it allow this key?")
    reply = decode(socket.recv_multipart(copy=False), kinds={"echo", "error"})
    if reply.kind == "error":
        raise ProfileError(f"the probed peer refused the probe: {reply.header.get('reason')}")
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
