"""Measured figures against the plan's: robust estimates, drift with hysteresis, and updated planning inputs.

The runtime measures per-device stage times and per-link throughput while a plan runs. This module
turns those measurements into what the planner takes, and says when they have *drifted* from what
the plan assumed. It is pure (no clock is read: every observation carries its own `time_s`), so the
same observations always give the same answers.

- `Estimator`: one measured quantity. Each observation goes through a median of the last `window`
  values (so, once `window` values have arrived, up to (window - 1) // 2 outliers among any `window`
  consecutive observations move nothing), then an EWMA with weight `alpha` (so noise is smoothed). `value` is None until the first
  observation; `samples` counts observations.
- `DriftRule` / `Signal`: one figure the plan believes (a device's compute factor, a link's
  bandwidth or latency) tracked against its estimate. The relative change is
  `max(e + f, b + f) / min(e + f, b + f) - 1` for estimate e, believed b and floor f (0 for compute
  and bandwidth, `latency_floor_s` for latency), the same for "2x slower" as for "2x faster". A
  signal *enters* drift when the change exceeds `threshold`, *stays* in drift while it exceeds
  `threshold * clear_fraction` (hysteresis), and is *sustained* once it has been in drift for at
  least `min_observations` observations and `min_duration_s` seconds.
- Conversions: a device's compute *factor* is measured stage time / the stage time its base
  segment times give (1.0 = as profiled, 5.0 = five times slower). `scaled_segment_times` turns
  factors into the per-device per-segment seconds that `plan(..., segment_times_s=...)` takes
  (the whole row is scaled: a busy device is taken to be slower on every segment), and
  `updated_cluster` puts measured links into a `ClusterSpec` (`with_link`). `DeltaMeans` turns the
  running means workers report (`Pipeline.stats()`) into per-interval observations.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import PlanError
from partita.plan.profile import Profile

__all__ = [
    "DeltaMeans",
    "DriftRule",
    "Estimator",
    "Signal",
    "base_segment_times",
    "compute_factor",
    "relative_change",
    "scaled_segment_times",
    "updated_cluster",
]


class Estimator:
    """A robust running estimate of one positive quantity: EWMA (`alpha`) over a moving median (`window`).

    `alpha` in (0, 1]: 1 follows the median exactly, smaller smooths more. Until `window`
    observations have arrived the estimate is their median; after that an EWMA seeded with it. A
    step change shows in the median after (window + 1) // 2 observations; the EWMA then closes a
    fraction `alpha` of the remaining gap per observation.
    """

    def __init__(self, *, alpha: float = 0.5, window: int = 5) -> None:
        if not (0.0 < alpha <= 1.0):
            raise PlanError(f"estimator alpha must be in (0, 1], got {alpha!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise PlanError(f"estimator window must be a whole number >= 1, got {window!r}")
        self.alpha = alpha
        self._recent: deque[float] = deque(maxlen=window)
        self._value: float | None = None
        self.samples = 0
        self.last_time_s: float | None = None

    @property
    def value(self) -> float | None:
        """The current estimate (None before the first observation)."""
        return self._value

    def observe(self, value: float, time_s: float) -> float:
        """Add one observation taken at `time_s` (seconds on the caller's clock); returns the new estimate."""
        value = _finite(value, "an observed value", minimum=0.0)
        self.last_time_s = _finite(time_s, "time_s")
        self._recent.append(value)
        middle = statistics.median(self._recent)
        if self._value is None or self.samples < (self._recent.maxlen or 0):
            self._value = middle  # until the window is full its median is the best estimate there is
        else:
            self._value += self.alpha * (middle - self._value)
        self.samples += 1
        return self._value


@dataclass(frozen=True)
class DriftRule:
    """When a measured figure counts as drifted from the one the plan believes.

    threshold: relative change that enters drift (0.3: 30% slower, or 1 / 1.3 as fast).
    clear_fraction: drift ends when the change falls below threshold * clear_fraction (hysteresis).
    min_observations / min_duration_s: drift must last this many observations and seconds before it
        is acted on (both must hold).
    latency_floor_s: added to both sides of a latency comparison, so 0 -> 0.2 ms is not "infinite".
    alpha / window: the `Estimator` settings used for every signal.
    """

    threshold: float = 0.3
    clear_fraction: float = 0.5
    min_observations: int = 3
    min_duration_s: float = 1.0
    latency_floor_s: float = 1e-3
    alpha: float = 0.5
    window: int = 5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise PlanError(f"drift threshold must be a finite number > 0, got {self.threshold!r}")
        if not (0.0 <= self.clear_fraction <= 1.0):
            raise PlanError(f"clear_fraction must be in [0, 1], got {self.clear_fraction!r}")
        if isinstance(self.min_observations, bool) or self.min_observations < 1:
            raise PlanError(f"min_observations must be >= 1, got {self.min_observations!r}")
        for label in ("min_duration_s", "latency_floor_s"):
            value = getattr(self, label)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(f"{label} must be a finite number >= 0, got {value!r}")
        Estimator(alpha=self.alpha, window=self.window)  # validates alpha and window


def relative_change(estimate: float, believed: float, floor: float = 0.0) -> float:
    """max(e+f, b+f) / min(e+f, b+f) - 1: 0 when equal, 4 for five times either way, inf against 0 or inf."""
    a, b = estimate + floor, believed + floor
    low, high = min(a, b), max(a, b)
    if high == low:
        return 0.0
    if low <= 0 or math.isinf(high):
        return math.inf
    return high / low - 1.0


class Signal:
    """One figure the plan believes (`believed`), its measured `Estimator`, and its drift state.

    `since_s` is the time of the observation that entered drift (None when not drifting);
    `in_drift` counts observations since then. `accept()` makes the estimate the believed figure
    (after a re-plan used it) and clears the drift.
    """

    def __init__(self, believed: float, rule: DriftRule, *, floor: float = 0.0) -> None:
        self.believed = float(believed)
        self.rule = rule
        self.floor = floor
        self.estimator = Estimator(alpha=rule.alpha, window=rule.window)
        self.since_s: float | None = None
        self.in_drift = 0

    @property
    def estimate(self) -> float | None:
        return self.estimator.value

    @property
    def change(self) -> float:
        """Relative change of the estimate from the believed figure (0.0 before any observation)."""
        if self.estimate is None:
            return 0.0
        return relative_change(self.estimate, self.believed, self.floor)

    @property
    def drifting(self) -> bool:
        return self.since_s is not None

    def observe(self, value: float, time_s: float) -> None:
        self.estimator.observe(value, time_s)
        change = self.change
        if self.since_s is None:
            if change > self.rule.threshold:
                self.since_s, self.in_drift = self.estimator.last_time_s, 1
        elif change >= self.rule.threshold * self.rule.clear_fraction:
            self.in_drift += 1
        else:
            self.since_s, self.in_drift = None, 0

    def sustained(self, now_s: float) -> bool:
        """In drift for at least min_observations observations and min_duration_s seconds by `now_s`."""
        return (
            self.since_s is not None
            and self.in_drift >= self.rule.min_observations
            and now_s - self.since_s >= self.rule.min_duration_s
        )

    def planning_value(self) -> float:
        """The figure to plan with: the estimate while drifting, the believed figure otherwise."""
        return self.estimate if self.drifting and self.estimate is not None else self.believed

    def accept(self) -> None:
        """The plan now assumes what was planned with (`planning_value()`); drift starts afresh."""
        self.believed = self.planning_value()
        self.since_s, self.in_drift = None, 0


class DeltaMeans:
    """Turns running (count, mean) figures, as workers report them, into the mean of the new samples only.

    `update(key, count, mean)` returns the mean over the samples added since the last update of
    `key`, or None when none were added. A count that went down (a restarted worker) starts afresh.
    """

    def __init__(self) -> None:
        self._last: dict[Any, tuple[int, float]] = {}

    def update(self, key: Any, count: int, mean: float) -> float | None:
        count, total = int(count), float(mean) * int(count)
        seen, seen_total = self._last.get(key, (0, 0.0))
        if count < seen:
            seen, seen_total = 0, 0.0
        self._last[key] = (count, total)
        if count == seen:
            return None
        return max(0.0, (total - seen_total) / (count - seen))


# --- conversions ------------------------------------------------------------------------------------


def base_segment_times(profile: Profile, cluster: ClusterSpec,
                       segment_times_s: Mapping[str, Sequence[float]] | None = None) -> dict[str, tuple[float, ...]]:
    """Seconds per segment for every device: measured where given, flops / flops_per_s otherwise."""
    measured = dict(segment_times_s or {})
    out = {}
    for device in cluster.devices:
        if device.name in measured:
            out[device.name] = tuple(float(t) for t in measured[device.name])
        else:
            out[device.name] = tuple(s.flops / device.flops for s in profile.segments)
    return out


def compute_factor(measured_s: float, base_times: Sequence[float], start: int, end: int) -> float | None:
    """measured / predicted for segments [start, end) of one device; None when the prediction is 0 s."""
    predicted = float(sum(base_times[start:end]))
    if predicted <= 0:
        return None
    return _finite(measured_s, "a measured compute time", minimum=0.0) / predicted


def scaled_segment_times(base: Mapping[str, Sequence[float]], factors: Mapping[str, float]
                         ) -> dict[str, tuple[float, ...]]:
    """Each named device's base segment times times its factor (devices without a factor: unchanged)."""
    return {name: tuple(t * factors.get(name, 1.0) for t in times) for name, times in base.items()}


def updated_cluster(cluster: ClusterSpec, links: Mapping[frozenset[str], LinkSpec]) -> ClusterSpec:
    """`cluster` with each given pair's link replaced (pairs whose nodes are gone are skipped)."""
    nodes = set(cluster.nodes)
    for pair, link in sorted(links.items(), key=lambda item: sorted(item[0])):
        if pair <= nodes:
            a, b = sorted(pair)
            cluster = cluster.with_link(a, b, link)
    return cluster


def _finite(value: float, label: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PlanError(f"{label} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise PlanError(f"{label} must be >= {minimum}, got {value!r}")
    return float(value)
