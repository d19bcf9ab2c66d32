"""Emulating slower devices and network links on this machine, honestly and without burning CPU.

Time dilation: with factor ``k`` (``dilation``) the whole emulated world runs k times slower than
real time, so devices *faster* than this host can still be emulated. Every emulated duration is
multiplied by k in real time, and every figure should be reported in device time = real time / k.
Both classes here take real seconds in and hand real seconds out (what to sleep); `device_time`
converts for reporting.

- `LinkShaper`: a link at the sender. A token bucket paces bytes at the link bandwidth (the bucket
  holds at most `burst_bytes` of credit earned while idle, 0 by default: the link serialises
  messages back to back, as the cost model's occupancy = bytes / bandwidth); then each message
  is delayed by the latency, which overlaps between messages as on a real network. Messages keep
  their order (a link is FIFO).
- `SpeedEmulator`: a device `speed` times as fast as this host (0.25 = four times slower). After
  the real computation took `host_s`, it waits so the computation appears to have taken
  ``host_s / speed`` device seconds, i.e. ``host_s / speed * k`` real seconds. When the host is
  slower than that target even under dilation, it cannot wait a negative time: it reports the
  shortfall instead of hiding it.
- `reference_at`: the reference host time of a step whose work grows with its size (a decoder
  stage's prefill of T tokens, or decode step at position p), from points measured once at deploy.

Both are thread-safe and can be changed while they run (`.set(...)`); a change applies to the
messages and computations that start after it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from partita.errors import EmulationError


def device_time(real_s: float, dilation: float) -> float:
    """Real seconds measured under dilation k, as device seconds (real / k)."""
    return real_s / dilation


def reference_at(points: Sequence[Sequence[float]], x: float) -> float:
    """The reference host seconds of a step of size `x`, from measured `(size, seconds)` points.

    The first point is the anchor (the size the cost model's prediction is made at: it gets exactly
    its measured time); a second point gives the slope of a line through the anchor, clamped at 0
    so that a larger step never takes less time (two noisy measurements can disagree). One point:
    its time at every size. Never negative.
    """
    anchor_x, anchor_s = float(points[0][0]), float(points[0][1])
    if len(points) < 2 or float(points[1][0]) == anchor_x:
        return max(0.0, anchor_s)
    other_x, other_s = float(points[1][0]), float(points[1][1])
    slope = max(0.0, (other_s - anchor_s) / (other_x - anchor_x))
    return max(0.0, anchor_s + slope * (x - anchor_x))


def check_reference_steps(value: Any) -> dict[str, tuple[tuple[float, float], ...]] | None:
    """`value` as reference step points ({kind: ((size, seconds), ...)}, 1 or 2 points a kind), or None.

    EmulationError when it is not of that shape (sizes and seconds finite and >= 0).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise EmulationError(f"reference steps must be a mapping of kind to points, got {type(value).__name__}")
    out: dict[str, tuple[tuple[float, float], ...]] = {}
    for kind, points in value.items():
        ok = isinstance(kind, str) and isinstance(points, list | tuple) and 1 <= len(points) <= 2
        pairs = []
        for point in points if ok else ():
            numbers = isinstance(point, list | tuple) and len(point) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in point)
            if not numbers:
                ok = False
                break
            pairs.append((float(point[0]), float(point[1])))
        if not ok:
            raise EmulationError(f"reference steps of {kind!r} must be 1 or 2 (size, seconds) pairs of numbers >= 0")
        out[kind] = tuple(pairs)
    return out


def _check_dilation(dilation: float) -> float:
    if not (isinstance(dilation, int | float) and math.isfinite(dilation) and dilation > 0):
        raise EmulationError(f"dilation must be a positive finite number, got {dilation!r}")
    return float(dilation)


def _check_bandwidth(bandwidth: float) -> float:
    if not (isinstance(bandwidth, int | float) and bandwidth > 0):
        raise EmulationError(
            f"link bandwidth must be positive bytes/s (math.inf for unlimited), got {bandwidth!r}"
        )
    return float(bandwidth)


def _check_latency(latency: float) -> float:
    if not (isinstance(latency, int | float) and math.isfinite(latency) and latency >= 0):
        raise EmulationError(f"link latency must be a non-negative finite number of seconds, got {latency!r}")
    return float(latency)


class LinkShaper:
    """One direction of an emulated link: bandwidth (bytes per device second) + latency (device seconds).

    `delay_for(nbytes)` reserves the link for a message that is ready now and returns the real
    seconds the sender must hold it before handing it to the socket: the wait behind messages
    already on the link, plus its own serialisation ``nbytes / bandwidth * k``, plus ``latency * k``.
    Call it once per message, when the message is ready (not when it is finally sent): the
    reservation is the link's schedule.
    """

    def __init__(
        self,
        bandwidth_bytes_per_s: float,
        latency_s: float,
        dilation: float = 1.0,
        *,
        burst_bytes: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._bandwidth = _check_bandwidth(bandwidth_bytes_per_s)
        self._latency = _check_latency(latency_s)
        self.dilation = _check_dilation(dilation)
        if not (isinstance(burst_bytes, int | float) and 0 <= burst_bytes < math.inf):
            raise EmulationError(f"burst_bytes must be a non-negative finite number, got {burst_bytes!r}")
        self._burst = float(burst_bytes)
        self._clock = clock
        self._tokens = self._burst  # bytes of credit; negative = debt still being paid (link busy)
        self._stamp = clock()
        self._last_departure = -math.inf
        self.messages = 0
        self.bytes = 0

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self._bandwidth

    @property
    def latency_s(self) -> float:
        return self._latency

    def set(self, *, bandwidth: float | None = None, latency: float | None = None) -> None:
        """Change bandwidth (bytes/s) and/or latency (s), in device units, for messages from now on."""
        with self._lock:
            self._refill(self._clock())
            if bandwidth is not None:
                self._bandwidth = _check_bandwidth(bandwidth)
            if latency is not None:
                self._latency = _check_latency(latency)

    def delay_for(self, nbytes: int) -> float:
        """Real seconds to hold a message of `nbytes` that is ready now before it may leave."""
        now = self._clock()
        return max(0.0, self.departure_at(nbytes, now=now) - now)

    def departure_at(self, nbytes: int, *, now: float | None = None) -> float:
        """Like `delay_for`, as an absolute time on the shaper's clock (time.monotonic by default)."""
        if not (isinstance(nbytes, int) and nbytes >= 0):
            raise EmulationError(f"message size must be a non-negative int of bytes, got {nbytes!r}")
        with self._lock:
            now = self._clock() if now is None else now
            self._refill(now)
            self._tokens -= nbytes
            rate = self._bandwidth / self.dilation  # bytes per real second
            serialised_at = now + (max(0.0, -self._tokens) / rate if rate < math.inf else 0.0)
            departure = max(serialised_at + self._latency * self.dilation, self._last_departure)
            self._last_departure = departure
            self.messages += 1
            self.bytes += nbytes
            return departure

    def _refill(self, now: float) -> None:
        rate = self._bandwidth / self.dilation
        elapsed = max(0.0, now - self._stamp)
        self._stamp = max(self._stamp, now)
        if rate == math.inf:
            self._tokens = self._burst
        else:
            self._tokens = min(self._burst, self._tokens + elapsed * rate)


def shaper_for(bandwidth_bytes_per_s: float | None, latency_s: float | None, dilation: float) -> LinkShaper | None:
    """The shaper of an emulated link (device units); None when neither part is given (a real, unshaped link).

    `bandwidth_bytes_per_s` None means unlimited; `latency_s` None means none.
    """
    if bandwidth_bytes_per_s is None and latency_s is None:
        return None
    bandwidth = bandwidth_bytes_per_s if bandwidth_bytes_per_s is not None else math.inf
    return LinkShaper(bandwidth, latency_s or 0.0, dilation=dilation)


@dataclass(frozen=True)
class Emulated:
    """What one emulated computation looked like, in device seconds.

    `device_s`: the time it appears to take (host time / speed, or the host time itself when the
    host could not keep up); `target_s`: host time / speed; `shortfall_s`: device_s - target_s
    (0 when emulation was exact); `waited_s`: real seconds slept.
    """

    device_s: float
    target_s: float
    shortfall_s: float
    waited_s: float


class SpeedEmulator:
    """A device `speed` times as fast as this host, under dilation k (see the module docstring).

    `speed` > k cannot be reached (the host would need to be faster than real time allows): each
    such computation reports a positive `shortfall_s`, counted in `.shortfalls`.
    """

    def __init__(self, speed: float, dilation: float = 1.0, *, sleep: Callable[[float], None] = time.sleep):
        self._lock = threading.Lock()
        self._speed = self._check_speed(speed)
        self.dilation = _check_dilation(dilation)
        self._sleep = sleep
        self.shortfalls = 0
        self.shortfall_s = 0.0

    @property
    def speed(self) -> float:
        return self._speed

    def set(self, *, speed: float) -> None:
        """Change the emulated speed factor for computations that finish from now on."""
        checked = self._check_speed(speed)
        with self._lock:
            self._speed = checked

    def plan_wait(self, host_seconds: float) -> Emulated:
        """The emulation of a computation that took `host_seconds` real seconds, without sleeping."""
        if not (isinstance(host_seconds, int | float) and math.isfinite(host_seconds) and host_seconds >= 0):
            raise EmulationError(f"host time must be a non-negative number of seconds, got {host_seconds!r}")
        with self._lock:
            speed = self._speed
        target_real = host_seconds / speed * self.dilation
        wait = max(0.0, target_real - host_seconds)
        device_s = (host_seconds + wait) / self.dilation
        target_s = host_seconds / speed
        return Emulated(device_s=device_s, target_s=target_s, shortfall_s=device_s - target_s, waited_s=wait)

    def wait_after(self, host_seconds: float) -> Emulated:
        """Sleep so that a computation of `host_seconds` real seconds appears to take host_seconds/speed."""
        result = self.plan_wait(host_seconds)
        if result.waited_s > 0:
            self._sleep(result.waited_s)
        if result.shortfall_s > 1e-12:
            with self._lock:
                self.shortfalls += 1
                self.shortfall_s += result.shortfall_s
        return result

    @staticmethod
    def _check_speed(speed: float) -> float:
        if not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
            raise EmulationError(
                f"speed factor must be a positive finite number (1.0 = this host), got {speed!r}"
            )
        return float(speed)
