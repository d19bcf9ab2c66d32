"""Measuring devices and links: what deploy feeds the planner instead of catalog guesses.

* `matmul_flops_per_s`: a short fp32 matmul benchmark of a torch device (what a worker reports).
* `time_programs`: per-program seconds of a chain of stage programs (one per segment, say), run
  in order on real inputs, median of `reps` after a warm-up. This is what the planner gets as
  `segment_times_s`: it captures what FLOP counts miss (memory-bound layers, kernel choice).
* `measure_link`: RTT, latency and bandwidth over the real transport, through a connected DEALER
  socket whose peer answers `echo` messages (every worker's data socket does); on an emulated
  link, shaped as the runtime shapes activations, so it measures the emulation.

All times are seconds of the machine that runs them; an emulated worker scales them.
"""

from __future__ import annotations

import math
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
    socket: zmq.Socket,
    *,
    payload_bytes: int = 4 * 2**20,
    reps: int = 5,
    timeout_s: float = 10.0,
    target_s: float = 0.1,
    emulate: tuple[float | None, float | None] | None = None,
    dilation: float = 1.0,
) -> dict[str, float]:
    """RTT, one-way latency (s) and bandwidth (bytes/s) to the peer at the other end of a connected DEALER `socket`.

    RTT is the median of `reps` empty echoes; `latency_s` is half of it (the cost model's one-way
    latency). Bandwidth divides a payload by the time its echo took beyond one RTT (the reply
    carries no payload), best of a few. The payload is sized so one transfer takes about
    `target_s` (estimated from a 64 KiB echo), at most `payload_bytes`: a slow link is not held
    for seconds, a fast one still moves enough bytes to be timed.

    `emulate` = (bandwidth_bytes_per_s, latency_s) shapes the probe as the runtime shapes
    activations on an emulated link (None in either place: not shaped), in both directions,
    with the world `dilation` times slower than real time; the figures returned are then in
    device time (real / dilation). Without it the probe measures the real transport, in real
    seconds (`dilation` is ignored: a real link is not slowed down).
    """
    shape = _probe_shaper(emulate, dilation)
    k = dilation if shape is not None else 1.0
    rtts = [_echo(socket, None, timeout_s, shape) for _ in range(reps + 1)][1:]
    rtt_s = statistics.median(rtts)
    small = min(64 * 2**10, payload_bytes)
    estimate = small / max(_echo(socket, blob_tensor(bytes(small)), timeout_s, shape) - rtt_s, 1e-9)
    size = int(min(max(estimate * target_s, small), payload_bytes))
    blob = blob_tensor(bytes(size))
    best_s = min(_echo(socket, blob, timeout_s, shape) for _ in range(max(2, reps // 2)))
    transfer_s = max(best_s - rtt_s, 1e-9)
    return {
        "rtt_s": rtt_s / k,
        "latency_s": rtt_s / 2 / k,
        "bandwidth_bytes_per_s": size / transfer_s * k,
        "payload_bytes": size,
    }


def _probe_shaper(emulate: tuple[float | None, float | None] | None, dilation: float) -> Any:
    """(forward, backward) shapers of the emulated link, or None when the link is not emulated."""
    if emulate is None or (emulate[0] is None and emulate[1] is None):
        return None
    from partita.runtime.emulation import LinkShaper

    bandwidth, latency = emulate
    forward = LinkShaper(bandwidth if bandwidth is not None else math.inf, latency or 0.0, dilation=dilation)
    backward = LinkShaper(bandwidth if bandwidth is not None else math.inf, latency or 0.0, dilation=dilation)
    return forward, backward


def _echo(socket: zmq.Socket, blob: torch.Tensor | None, timeout_s: float, shape: Any = None) -> float:
    """Real seconds for one echo; with `shape` (forward, backward shapers) each direction waits out its link."""
    started = time.perf_counter()
    if shape is not None:
        time.sleep(shape[0].delay_for(0 if blob is None else blob.numel()))
    socket.send_multipart(encode("echo", {}, () if blob is None else (blob,)), copy=False)
    if not socket.poll(math.ceil(timeout_s * 1000)):
        raise ProfileError(f"no echo from the probed peer within {timeout_s} s; is it running and does it allow this key?")
    reply = decode(socket.recv_multipart(copy=False), kinds={"echo", "error"})
    if reply.kind == "error":
        raise ProfileError(f"the probed peer refused the probe: {reply.header.get('reason')}")
    if shape is not None:
        time.sleep(shape[1].delay_for(0))
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
