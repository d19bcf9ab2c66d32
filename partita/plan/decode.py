"""The cost model and simulator of autoregressive decoding on a chain of stages (pure: no torch, no I/O).

A decoder is planned as a chain of segments in decode-step terms (`partita.model.decoder`): a
segment's time is one token's step through its layer, its `param_bytes` include the KV cache of
every sequence the stage holds, and what crosses a cut is one token's hidden state. On a plan of
stages s_1..s_k (the source sends token ids to s_1, s_k returns logits to the source):

- **per-token latency** (one sequence alone) = Σ_s decode compute_s + Σ_hop (transfer_hop + h), the
  plan's `latency_s`: a sequence's next step cannot start before its token came back;
- **period** = max(max_s (compute_s + h), max_hop occupancy_hop), the plan's `period_s`;
- **token throughput with n sequences in flight** (each with one step in the pipeline) =
  min(n / per-token latency, 1 / period): n steps circulate, and the slowest server caps them;
  exo-style execution (one sequence per pass) is n = 1;
- **time to first token** = the same latency sum for the prefill: each stage's prefill time for a
  prompt of T tokens, and T tokens' hidden states on every hop (the last stage returns one
  position's logits).

h is the runtime's per-hop overhead (`hop_overhead_s`, `partita.plan.HOP_OVERHEAD_S`; see
`partita.plan.cost` and docs/runtime.md, "The cost model"): a plan of k stages pays it on each of its
k + 1 hops, and each stage's worker spends it per step beside its compute. 0 (the default here):
none; `deploy_generator` passes the runtime's figure.

`simulate_decode` runs the same chain as a discrete-event simulation (FIFO servers for stages and
links, latency after each link), for a number of sequences and tokens each.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.cost import check_hop_overhead, hop_terms, predict
from partita.plan.profile import load_profile


@dataclass(frozen=True)
class DecodePrediction:
    """What the cost model predicts for generation on a plan (seconds, device time).

    sequences: the sequences in flight `tokens_per_s` assumes; prompt_tokens: the prompt length of `ttft_s`.
    """

    ttft_s: float
    per_token_s: float
    period_s: float
    sequences: int
    prompt_tokens: int

    def tokens_per_s_at(self, sequences: int) -> float:
        """Token throughput with `sequences` in flight: min(n / per-token latency, 1 / period)."""
        bound = math.inf if self.period_s == 0 else 1.0 / self.period_s
        return min(sequences / self.per_token_s, bound) if self.per_token_s > 0 else bound

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_s_at(self.sequences)

    def to_json(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "per_token_s": self.per_token_s, "period_s": self.period_s,
                "tokens_per_s": self.tokens_per_s, "tokens_per_s_one": self.tokens_per_s_at(1),
                "sequences": self.sequences, "prompt_tokens": self.prompt_tokens}


def prefill_profile(profile: Mapping[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """The decode-step profile scaled to a prefill of `prompt_tokens` tokens (flops and hidden states × T)."""
    segments = [dict(s) for s in profile["segments"]]
    for k, segment in enumerate(segments):
        segment["flops"] = int(segment["flops"]) * prompt_tokens
        if k < len(segments) - 1:  # the last stage returns one position's logits
            segment["out_bytes"] = int(segment["out_bytes"]) * prompt_tokens
    return {"model": profile["model"], "input_bytes": int(profile["input_bytes"]) * prompt_tokens,
            "segments": segments}


def predict_decode(profile: Any, cluster: ClusterSpec, plan: Any, decode_times_s: Mapping[str, Sequence[float]],
                   prefill_times_s: Mapping[str, Sequence[float]], *, prompt_tokens: int, sequences: int,
                   token_bytes: int = 8, hop_overhead_s: float = 0.0) -> DecodePrediction:
    """The three predictions for `plan` (see the module docstring).

    profile: the decoder's profile (a ModelGraph or its JSON); decode_times_s / prefill_times_s:
    seconds per segment per device for one decode step / one prefill of `prompt_tokens` (devices
    not named use flops / flops_per_s); hop_overhead_s: the per-hop overhead h.
    """
    data = load_profile(profile if not isinstance(profile, Mapping) else dict(profile)).to_dict()
    stages = [(stage.devices, stage.start, stage.end) for stage in plan.stages]
    step = predict(data, cluster, stages, segment_times_s=decode_times_s or None, check_memory=False,
                   hop_overhead_s=hop_overhead_s)
    prefill = predict(prefill_profile(data, prompt_tokens), cluster, stages, segment_times_s=prefill_times_s or None,
                      check_memory=False, hop_overhead_s=hop_overhead_s)
    del token_bytes  # the profile's input_bytes is the token a step carries
    return DecodePrediction(prefill.latency_s, step.latency_s, step.period_s, sequences, prompt_tokens)


@dataclass(frozen=True)
class DecodeSimulation:
    """What `simulate_decode` measured: mean TTFT, mean time between a sequence's tokens, tokens per second."""

    ttft_s: float
    per_token_s: float
    tokens_per_s: float


def chain_terms(profile: Any, cluster: ClusterSpec, plan: Any, times_s: Mapping[str, Sequence[float]] | None,
                *, hop_overhead_s: float = 0.0) -> tuple[list[float], list[tuple[float, float]]]:
    """Per stage service seconds, and per hop (occupancy, latency) seconds, of `plan` under the profile.

    With a per-hop overhead h, as the cost model and `partita.sim` hold it: each stage serves a step
    in compute + h, and the source's own h delays the first hop, so one step alone pays h per hop.
    """
    data = load_profile(profile)
    hop_s = check_hop_overhead(hop_overhead_s)
    stages = [(stage.devices, stage.start, stage.end) for stage in plan.stages]
    predicted = predict(data, cluster, stages, segment_times_s=times_s or None, check_memory=False)
    compute = [stage.compute_s + hop_s for stage in predicted.stages]
    groups = [(cluster.source,)] + [stage.devices for stage in predicted.stages] + [(cluster.source,)]
    hops = []
    for k in range(len(groups) - 1):
        nbytes = data.cut_bytes(predicted.stages[k].start) if k < len(predicted.stages) else data.cut_bytes(len(data.segments))
        occupancy, transfer = hop_terms(cluster, groups[k], groups[k + 1], nbytes)
        hops.append((occupancy, transfer - occupancy + (hop_s if k == 0 else 0.0)))
    return compute, hops


def simulate_decode(decode: tuple[list[float], list[tuple[float, float]]],
                    prefill: tuple[list[float], list[tuple[float, float]]], *, sequences: int, tokens: int,
                    in_flight: int | None = None) -> DecodeSimulation:
    """Discrete-event run of `sequences` sequences of `tokens` new tokens each, `in_flight` at once (None: all).

    decode / prefill: `chain_terms` of the plan for a decode step and for a prefill. Stages and links
    are FIFO servers; a link's latency is added after its occupancy; a sequence sends its next step
    when its token comes back, and a new sequence starts when one ends.
    """
    in_flight = sequences if in_flight is None else max(1, min(in_flight, sequences))
    k = len(decode[0])
    free = [0.0] * (2 * k + 1)  # resources: hop 0, stage 0, hop 1, ..., stage k-1, hop k
    events: list[tuple[float, int, int, int]] = []  # (time, order, sequence, resource index)
    order = 0
    started: dict[int, float] = {}
    firsts: list[float] = []
    last_token: dict[int, float] = {}
    gaps: list[float] = []
    produced = {s: 0 for s in range(sequences)}
    waiting = list(range(sequences))
    end = 0.0

    def start(seq: int, at: float) -> None:
        nonlocal order
        started[seq] = at
        heapq.heappush(events, (at, order, seq, 0))
        order += 1

    for _ in range(in_flight):
        start(waiting.pop(0), 0.0)
    while events:
        t, _, seq, r = heapq.heappop(events)
        terms = prefill if produced[seq] == 0 else decode
        if r % 2 == 0:
            occupancy, latency = terms[1][r // 2]
            begin = max(t, free[r])
            free[r] = begin + occupancy
            done = begin + occupancy + latency
        else:
            begin = max(t, free[r])
            free[r] = begin + terms[0][r // 2]
            done = free[r]
        if r < 2 * k:
            heapq.heappush(events, (done, order, seq, r + 1))
            order += 1
            continue
        produced[seq] += 1
        if produced[seq] == 1:
            firsts.append(done - started[seq])
        else:
            gaps.append(done - last_token[seq])
        last_token[seq] = done
        end = max(end, done)
        if produced[seq] < tokens:
            heapq.heappush(events, (done, order, seq, 0))
            order += 1
        elif waiting:
            start(waiting.pop(0), done)
    total = sequences * tokens
    return DecodeSimulation(sum(firsts) / len(firsts), sum(gaps) / len(gaps) if gaps else 0.0,
                            total / end if end > 0 else math.inf)


def plan_decode(profile: Any, cluster: ClusterSpec, *, decode_times_s: Mapping[str, Sequence[float]],
                prefill_times_s: Mapping[str, Sequence[float]], sequences: int, prompt_tokens: int,
                objective: str = "throughput", planner: str = "optimal", hop_overhead_s: float = 0.0) -> Any:
    """The plan for generation: the best token throughput with `sequences` in flight, or per-token latency.

    A plan made for the period alone can spread the layers over more devices than `sequences`
    steps can keep busy (throughput is min(n / latency, 1 / period)). So the candidates are the
    optimal plans with at most k stages for every k, and the latency-optimal plan; the one the
    decode cost model rates best wins (objective "throughput": most tokens/s at `sequences`,
    ties to the lower per-token latency; "latency": least per-token latency). A baseline
    `planner` ("single", "memory", ...) is returned as it is. Stages are never replicated: a
    sequence's cache lives on one device per stage. hop_overhead_s: the per-hop overhead h, in the
    ratings and in the returned plan's figures (the chain planners choose without it).
    """
    from partita.plan import plan as make_plan

    times = decode_times_s or None
    if planner != "optimal":
        return make_plan(profile, cluster, objective=objective, planner=planner, replicate=False, segment_times_s=times,
                         hop_overhead_s=hop_overhead_s)
    candidates = [make_plan(profile, cluster, objective="latency", replicate=False, segment_times_s=times,
                            hop_overhead_s=hop_overhead_s)]
    for k in range(1, min(len(cluster.devices), len(load_profile(profile).segments)) + 1):
        try:
            candidates.append(make_plan(profile, cluster, objective="throughput", max_stages=k, replicate=False,
                                        segment_times_s=times, hop_overhead_s=hop_overhead_s))
        except PlanError:  # no plan of at most k stages fits the devices' memory; more stages may
            continue

    def rating(candidate: Any) -> tuple[float, float]:
        p = predict_decode(profile, cluster, candidate, decode_times_s, prefill_times_s, prompt_tokens=prompt_tokens,
                           sequences=sequences, hop_overhead_s=hop_overhead_s)
        if objective == "latency":
            return (p.per_token_s, -p.tokens_per_s)
        return (-p.tokens_per_s, p.per_token_s)

    return min(candidates, key=rating)
