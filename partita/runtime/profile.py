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
    return _matmul_window(torch.device(device), size, min_time_s, warm=True)


def matmul_flops(device: torch.device | str = "cpu", *, size: int = 384, window_s: float = 0.05,
                 min_samples: int = 3, max_samples: int = 9, with_count: bool = False) -> tuple:
    """(median FLOP/s, relative spread[, windows taken]) of repeated windows of `matmul_flops_per_s`.

    Windows repeat, `min_samples` at least, until they agree within ±10% (see `spread`) or
    `max_samples` were taken: what a worker reports in `hello` as `flops_per_s` and `flops_spread`.
    """
    device = torch.device(device)
    samples = [_matmul_window(device, size, window_s, warm=True)]
    while len(samples) < min_samples or (spread(samples) > STABLE_SPREAD and len(samples) < max_samples):
        samples.append(_matmul_window(device, size, window_s, warm=False))
    figures = (statistics.median(samples), spread(samples))
    return (*figures, len(samples)) if with_count else figures


def _matmul_window(device: torch.device, size: int, min_time_s: float, *, warm: bool) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    if warm:
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


STABLE_SPREAD = 0.10  # a figure is stable when its repeats agree within ±10% of their median
LATENCY_FLOOR_S = 0.0005  # RTT jitter below half a millisecond is stable whatever its relative size


def spread(samples: Sequence[float]) -> float:
    """Relative spread of repeated measurements: half their range around the median, over the median.

    With five samples or more the lowest and the highest are left out first, so one outlier (a
    scheduler hiccup on a busy host) does not make a good estimate look unstable.
    """
    values = sorted(samples)
    if len(values) >= 5:
        values = values[1:-1]
    middle = statistics.median(samples)
    if middle <= 0:
        return math.inf
    return (values[-1] - values[0]) / 2 / middle


def measure_link(
    socket: zmq.Socket,
    *,
    payload_bytes: int = 4 * 2**20,
    reps: int = 5,
    timeout_s: float = 10.0,
    target_s: float = 0.06,
    emulate: tuple[float | None, float | None] | None = None,
    dilation: float = 1.0,
    min_samples: int = 3,
    max_samples: int = 7,
) -> dict[str, Any]:
    """RTT, one-way latency (s) and bandwidth (bytes/s) each way to the peer of a connected DEALER `socket`.

    RTT is the median of `reps` empty echoes; `latency_s` is half of it (the cost model's one-way
    latency). Bandwidth is measured with trains: several payloads sent back to back, so the pipe
    is full, timed by the spacing of their echoes (the first one's arrival is left out, which
    takes the TCP ramp-up and the shaper's burst allowance out of the figure), or by the whole
    train from its first send, whichever is slower (a late first timestamp on a busy host
    squeezes the spacing). Forward, the
    payloads go to the peer and tiny echoes come back (`bandwidth_bytes_per_s`); backward, tiny
    requests ask for payload-sized replies (`bandwidth_back_bytes_per_s`). A train lasts about
    `target_s` (the payloads are sized from the previous estimate, each at most `payload_bytes`),
    and trains repeat, `min_samples` at least, until the samples agree within ±10% (`spread`)
    or `max_samples` were taken; the figures are medians. `stable` says whether they agreed.

    `emulate` = (bandwidth_bytes_per_s, latency_s) shapes the probe as the runtime shapes
    activations on an emulated link (None in either place: not shaped), in both directions,
    with the world `dilation` times slower than real time; the figures returned are then in
    device time (real / dilation), and the same both ways: an emulated probe shapes both directions
    with the one figure it is given (`measure.probe` runs it once per direction on an emulated
    link slower one way). Without
    it the probe measures the real transport, in real seconds (`dilation` is ignored).
    """
    shape = _probe_shaper(emulate, dilation)
    k = dilation if shape is not None else 1.0
    rtts = [_echo(socket, None, timeout_s, shape) for _ in range(reps + 1)][1:]
    rtt_s = statistics.median(rtts)
    latency_spread = spread(rtts) if statistics.median(rtts) / 2 > LATENCY_FLOOR_S else 0.0
    if shape is not None:
        forward = _emulated_samples(socket, rtt_s, payload_bytes, timeout_s, target_s, shape, min_samples)
        backward = forward
    else:
        forward = _train_samples(socket, "forward", payload_bytes, timeout_s, target_s, min_samples, max_samples,
                                 rtt_s)
        backward = _train_samples(socket, "backward", payload_bytes, timeout_s, target_s, min_samples, max_samples,
                                  rtt_s)
    bandwidth, back = statistics.median(forward), statistics.median(backward)
    spreads = (spread(forward), spread(backward))
    return {
        "rtt_s": rtt_s / k,
        "latency_s": rtt_s / 2 / k,
        "bandwidth_bytes_per_s": bandwidth * k,
        "bandwidth_back_bytes_per_s": back * k,
        "bandwidth_spread": spreads[0],
        "bandwidth_back_spread": spreads[1],
        "latency_spread": latency_spread,
        "samples": min(len(forward), len(backward)),
        "stable": max(spreads) <= STABLE_SPREAD and latency_spread <= STABLE_SPREAD,
        "payload_bytes": payload_bytes,
    }


TRAIN_LENGTH = 6  # payloads per train: five spacings are timed
MIN_CHUNK_BYTES = 32 * 2**10  # a train carries at least 192 KiB, several times a shaper's burst


def _train_samples(socket: zmq.Socket, direction: str, payload_bytes: int, timeout_s: float, target_s: float,
                   min_samples: int, max_samples: int, rtt_s: float) -> list[float]:
    """Bandwidth samples (bytes/s) of trains in one direction, until they agree or `max_samples` were taken."""
    chunk = min(16 * 2**10, payload_bytes)
    estimate = _train(socket, direction, chunk, TRAIN_LENGTH, timeout_s, rtt_s)  # warm-up and a first estimate
    samples: list[float] = []
    while len(samples) < min_samples or (spread(samples) > STABLE_SPREAD and len(samples) < max_samples):
        chunk = int(min(max(estimate * target_s / TRAIN_LENGTH, MIN_CHUNK_BYTES), payload_bytes))
        estimate = _train(socket, direction, chunk, TRAIN_LENGTH, timeout_s, rtt_s)
        samples.append(estimate)
    return samples


def _train(socket: zmq.Socket, direction: str, chunk: int, length: int, timeout_s: float, rtt_s: float) -> float:
    """Bytes/s of one train of `length` payloads of `chunk` bytes, from the spacing of their arrivals."""
    sent = time.perf_counter()
    if direction == "forward":
        blob = blob_tensor(bytes(chunk))
        for _ in range(length):
            socket.send_multipart(encode("echo", {}, (blob,)), copy=False)
    else:
        for _ in range(length):
            socket.send_multipart(encode("echo", {"reply_bytes": chunk}, ()), copy=False)
    arrivals = []
    for _ in range(length):
        _receive_echo(socket, timeout_s)
        arrivals.append(time.perf_counter())
    # The spacing of the arrivals leaves out the ramp-up and the shaper's burst, but on a busy host
    # a late first timestamp squeezes it; the whole train from its first send (one RTT and the
    # burst in it) is not squeezed. The lower of the two is the figure.
    spacing = chunk * (length - 1) / max(arrivals[-1] - arrivals[0], 1e-9)
    whole = chunk * length / max(arrivals[-1] - sent - rtt_s, 1e-9)
    return min(spacing, whole)


def _emulated_samples(socket: zmq.Socket, rtt_s: float, payload_bytes: int, timeout_s: float, target_s: float,
                      shape: Any, count: int) -> list[float]:
    """Bandwidth samples through the runtime's own shaper: one payload's echo beyond one RTT."""
    small = min(64 * 2**10, payload_bytes)
    estimate = small / max(_echo(socket, blob_tensor(bytes(small)), timeout_s, shape) - rtt_s, 1e-9)
    size = int(min(max(estimate * target_s, small), payload_bytes))
    blob = blob_tensor(bytes(size))
    return [size / max(_echo(socket, blob, timeout_s, shape) - rtt_s, 1e-9) for _ in range(count)]


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
    _receive_echo(socket, timeout_s)
    if shape is not None:
        time.sleep(shape[1].delay_for(0))
    return time.perf_counter() - started


def _receive_echo(socket: zmq.Socket, timeout_s: float) -> None:
    if not socket.poll(math.ceil(timeout_s * 1000)):
        raise ProfileError(f"no echo from the probed peer within {timeout_s} s; is it running and does it allow this key?")
    reply = decode(socket.recv_multipart(copy=False), kinds={"echo", "error"})
    if reply.kind == "error":
        raise ProfileError(f"the probed peer refused the probe: {reply.header.get('reason')}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
