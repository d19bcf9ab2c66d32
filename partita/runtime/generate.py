"""Autoregressive generation across devices: a decoder deployed as stages that keep each sequence's KV cache.

`deploy_generator(model, cluster)` loads a causal LM (`hf:PATH`), plans its layers over the
cluster (a stage's memory includes the KV cache of `sequences` sequences at `context` positions),
ships each stage as a decoder stage (`partita.model.decoder_stage`), and returns a `Generator`.

The coordinator's loop (`Generator.stream_many`): tokenise; send each sequence's prompt through
the stages (prefill, position 0); sample the next token from the last stage's logits; send it
back for one decode step at its position; repeat until EOS or `max_new_tokens`. Up to
`sequences` sequences are in flight at once, each with at most one step in the pipeline, so while
stage 2 decodes one sequence's token, stage 1 decodes another's: the pipeline stays full.

Failover: when a device dies the pipeline's supervisor re-plans on the devices left and replays
the steps in flight (`partita.runtime.supervisor`). A stage that lost a sequence's cache fails its
step with `CACHE_MISSING`; the loop then rebuilds that sequence by sending every token it has so far
through prefill, and generation continues from there. Nothing is lost or changed: greedy tokens
are the unsplit model's.

Times (`ttft_s`, `per_token_s`, `tokens_per_s`) are device time: real seconds over the cluster's
dilation.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from partita.errors import DeployError, RequestError
from partita.model.decoder_stage import CACHE_MISSING

MAX_REBUILDS = 8  # per sequence: a failover costs one; more means the cluster keeps losing its caches
STEP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (argmax). top_p in (0, 1]: nucleus sampling.

    seed: sequence i of a call samples from a torch.Generator seeded with seed + i.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise RequestError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from the last position's logits ([vocab] float32)."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above each
        ordered[before >= sampling.top_p] = 0  # keep the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass(frozen=True)
class Token:
    """One generated token: which sequence (index in the call), its place among the new tokens, id, text piece."""

    sequence: int
    index: int
    token_id: int
    text: str


@dataclass
class Generation:
    """A finished sequence. token_ids: the new tokens only. finish: "eos" or "length".

    ttft_s: from submission to the first new token; per_token_s: mean time between later tokens
    (None with one token); device seconds.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish: str
    ttft_s: float
    per_token_s: float | None
    rebuilds: int

    def to_json(self) -> dict[str, Any]:
        return {"token_ids": self.token_ids, "text": self.text, "finish": self.finish, "ttft_s": self.ttft_s,
                "per_token_s": self.per_token_s, "rebuilds": self.rebuilds}


@dataclass
class _Sequence:
    index: int
    prompt: list[int]
    generator: torch.Generator
    new: list[int] = field(default_factory=list)
    started: float = 0.0
    times: list[float] = field(default_factory=list)
    rebuilds: int = 0
    finish: str | None = None
    text: str = ""
    slot: int = -1  # the cache slot (sequence id on the stages) of its current prefill

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.new


class Generator:
    """A decoder deployed across devices (`deploy_generator`). Close it (or use `with`) when done.

    `plan` is the decode plan (period and latency per token); `prediction` the cost model's TTFT,
    per-token latency and token throughput for it (`partita.plan.decode.DecodePrediction`).
    """

    def __init__(self, pipe: Any, tokenizer: Any, spec: Any, *, sequences: int, prediction: Any = None) -> None:
        self.pipe = pipe
        self.tokenizer = tokenizer
        self.spec = spec
        self.sequences = sequences
        self.prediction = prediction
        self._next_sequence = 0  # sequence ids are unique over this generator's life (cache slots)
        self._ids = threading.Lock()
        # Calls from several threads (an HTTP server) share the stages' `sequences` cache slots.
        self._slots = threading.BoundedSemaphore(sequences)
        self.last_run: dict[str, float] = {}

    @property
    def plan(self) -> Any:
        return self.pipe.plan

    def close(self) -> None:
        self.pipe.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the user's side ------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stream: bool = False) -> Generation | Iterator[Token]:
        """Generate from one prompt (text, or token ids). stream=True: an iterator of `Token`s as they come."""
        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        if stream:
            return (event for event in self.stream_many([prompt], sampling) if isinstance(event, Token))
        return self.generate_many([prompt], sampling)[0]

    def generate_many(self, prompts: Sequence[str | Sequence[int]], sampling: Sampling = Sampling()) -> list[Generation]:
        """Generate from every prompt, up to `sequences` at once in the pipeline; results in prompt order."""
        results: dict[int, Generation] = {}
        for event in self.stream_many(prompts, sampling):
            if isinstance(event, Generation):
                results[len(results)] = event
        return [results[i] for i in range(len(prompts))]

    def stream_many(self, prompts: Sequence[str | Sequence[int]], sampling: Sampling = Sampling()
                    ) -> Iterator[Token | Generation]:
        """Tokens as they are generated, and each sequence's `Generation` when it ends (in prompt order)."""
        sampling.check()
        encoded = [self._encode(p) for p in prompts]
        waiting = list(range(len(encoded)))
        sequences: dict[int, _Sequence] = {}
        done: dict[int, Generation] = {}
        next_out = 0
        events: queue.Queue[tuple[_Sequence, Future]] = queue.Queue()
        dilation = self.pipe.dilation
        started = time.monotonic()
        new_tokens = 0

        def admit() -> None:
            while waiting:
                running = any(s.finish is None for s in sequences.values())
                if not self._slots.acquire(blocking=not running, timeout=None if running else STEP_TIMEOUT_S):
                    if running:
                        return  # every slot is taken: admit more when one of ours ends
                    raise RequestError(f"no cache slot came free in {STEP_TIMEOUT_S:.0f} s")
                index = waiting.pop(0)
                seq = _Sequence(index, encoded[index], torch.Generator().manual_seed(sampling.seed + index))
                seq.started = time.monotonic()
                sequences[index] = seq
                self._submit(seq, events, prefill=True)

        try:
            admit()
            while any(s.finish is None for s in sequences.values()) or waiting:
                try:
                    seq, future = events.get(timeout=STEP_TIMEOUT_S)
                except queue.Empty:
                    raise RequestError(f"no step came back in {STEP_TIMEOUT_S:.0f} s; the cluster is not answering") from None
                try:
                    logits, _step = future.result()
                except RequestError as exc:
                    if CACHE_MISSING not in str(exc):
                        raise
                    seq.rebuilds += 1
                    if seq.rebuilds > MAX_REBUILDS:
                        raise RequestError(f"sequence {seq.index} lost its KV cache {seq.rebuilds} times; giving up") from exc
                    self._submit(seq, events, prefill=True)  # replay every token so far through prefill
                    continue
                token = sample(logits.reshape(-1).float(), sampling, seq.generator)
                seq.new.append(token)
                seq.times.append(time.monotonic())
                new_tokens += 1
                text = self._decode(seq.new)
                yield Token(seq.index, len(seq.new) - 1, token, text[len(seq.text):])
                seq.text = text
                if token in self.spec.eos_token_ids:
                    seq.finish = "eos"
                elif len(seq.new) >= sampling.max_new_tokens or len(seq.tokens) >= self.spec.context:
                    seq.finish = "length"
                else:
                    self._submit(seq, events, prefill=False)
                if seq.finish is not None:
                    self._slots.release()
                    done[seq.index] = self._result(seq, dilation)
                    admit()
                    while next_out in done:
                        yield done.pop(next_out)
                        next_out += 1
        finally:  # a caller that stops early (or an error) gives its unfinished sequences' slots back
            for seq in sequences.values():
                if seq.finish is None:
                    seq.finish = "abandoned"
                    self._slots.release()
        elapsed = (time.monotonic() - started) / dilation
        self.last_run = {"elapsed_s": elapsed, "new_tokens": float(new_tokens),
                         "tokens_per_s": new_tokens / elapsed if elapsed > 0 else 0.0}
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    # -- internals ------------------------------------------------------------------------------
    def _submit(self, seq: _Sequence, events: queue.Queue, *, prefill: bool) -> None:
        if prefill:  # a new sequence, or a rebuild: every token so far, from position 0, in a fresh slot
            with self._ids:
                seq.slot = self._next_sequence
                self._next_sequence += 1
            x = torch.tensor([seq.tokens], dtype=torch.long)
            step = torch.tensor([seq.slot, 0], dtype=torch.long)
        else:
            x = torch.tensor([[seq.new[-1]]], dtype=torch.long)
            step = torch.tensor([seq.slot, len(seq.tokens) - 1], dtype=torch.long)
        future = self.pipe.submit(x, step)
        future.add_done_callback(lambda f: events.put((seq, f)))

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if len(ids) < 2:
            raise RequestError(f"a prompt must hold at least 2 tokens, got {len(ids)} ({prompt!r})")
        if len(ids) >= self.spec.context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the deployed context is {self.spec.context} "
                               "(deploy with a larger context)")
        if any(not 0 <= t < self.spec.vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.spec.vocab})")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)) if self.tokenizer is not None else ""

    def _result(self, seq: _Sequence, dilation: float) -> Generation:
        gaps = [b - a for a, b in zip(seq.times, seq.times[1:], strict=False)]
        return Generation(seq.prompt, list(seq.new), self._decode(seq.new), seq.finish or "length",
                          (seq.times[0] - seq.started) / dilation,
                          sum(gaps) / len(gaps) / dilation if gaps else None, seq.rebuilds)


def deploy_generator(model: Any, cluster: Any, *, context: int = 256, sequences: int = 8,
                     stages: Sequence[Any] | None = None, objective: str = "throughput", planner: str = "optimal",
                     window: int = 4,
                     supervise: Any = True, reps: int = 5, prompt_tokens: int = 16,
                     hop_overhead_s: float | None = None, replace: bool = True) -> Generator:
    """Deploy a causal LM (`hf:PATH`, or a `partita.model.hf.CausalLM`) onto `cluster` for generation.

    context: positions per sequence (prompt + new tokens); sequences: sequences in flight at once
    (each stage holds that many caches of `context` positions). stages: `(devices, start, end)` per
    stage over the layers, instead of planning. planner: "optimal" or a baseline of `partita.plan.plan`
    ("single": the best single device; "memory": layers in proportion to memory, as exo places them). supervise: True re-plans on failures only (decoder
    stages are not replicated and do not move on drift); a `Supervision` sets it; False: none.
    reps: timing repetitions per layer (the planner's decode-step times). prompt_tokens: the prompt
    length the TTFT prediction assumes. hop_overhead_s: the runtime's per-hop overhead the plan and
    the prediction include (seconds; None: `partita.plan.HOP_OVERHEAD_S`, as `deploy` uses).
    replace: as `deploy`'s: True closes the pipelines already on `cluster` first; False deploys
    alongside them (their stages and caches must fit in the devices' memory together).
    """
    from partita.model import split
    from partita.model.decoder import decoder_spec
    from partita.model.decoder_stage import DecoderGraph
    from partita.model.hf import CausalLM, load_hf
    from partita.plan import HOP_OVERHEAD_S, check_hop_overhead, predict
    from partita.plan.decode import plan_decode, predict_decode
    from partita.runtime.coordinator import Prepared, launch
    from partita.runtime.measure import Measurements
    from partita.runtime.session import Session
    from partita.runtime.supervisor import Supervision

    if sequences < 1:
        raise DeployError(f"sequences must be at least 1, got {sequences}")
    hop_s = check_hop_overhead(HOP_OVERHEAD_S if hop_overhead_s is None else hop_overhead_s)
    lm = model if isinstance(model, CausalLM) else load_hf(model)
    if replace:
        cluster.pipelines.close_all()
    spec = decoder_spec(lm.model, context=context, name=lm.name)
    graph = DecoderGraph.of(lm.model, spec, sequences=sequences)
    session = Session(cluster)
    try:
        started = time.perf_counter()
        infos = session.hello()
        decode_s, prefill_s = layer_times(lm.model, spec, reps=reps, prompt_tokens=prompt_tokens,
                                          threads=cluster.threads_per_worker)
        speeds = dict(cluster.host_speeds)
        decode_times = {name: tuple(t / speed for t in decode_s) for name, speed in speeds.items()}
        prefill_times = {name: tuple(t / speed for t in prefill_s) for name, speed in speeds.items()}
        measured_s = time.perf_counter() - started
        if stages is not None:
            chosen = predict(graph, cluster.spec, stages, objective=objective, segment_times_s=decode_times,
                             hop_overhead_s=hop_s)
        else:
            chosen = plan_decode(graph, cluster.spec, decode_times_s=decode_times, prefill_times_s=prefill_times,
                                 sequences=sequences, prompt_tokens=prompt_tokens, objective=objective,
                                 planner=planner, hop_overhead_s=hop_s)
        split_started = time.perf_counter()
        programs = tuple(split(graph, chosen.cuts()))
        timings = {"measure_s": measured_s, "split_s": time.perf_counter() - split_started}
        # The prediction uses the stage programs as they will run (the plan used per-layer estimates).
        decode_s, prefill_s, host_steps = calibrated(programs, decode_s, prefill_s, spec, prompt_tokens=prompt_tokens,
                                                     reps=reps, threads=cluster.threads_per_worker)
        decode_times = {name: tuple(t / speed for t in decode_s) for name, speed in speeds.items()}
        prefill_times = {name: tuple(t / speed for t in prefill_s) for name, speed in speeds.items()}
        chosen = predict(graph, cluster.spec, [(s.devices, s.start, s.end) for s in chosen.stages],
                         objective=objective, planner=chosen.planner, segment_times_s=decode_times,
                         hop_overhead_s=hop_s)
        # Emulated devices pace each prefill and decode step by these reference times (/ speed), not
        # by how long it took this host at the moment: a busy host does not slow the slow devices more.
        measurements = Measurements(decode_times, None, infos, host_step_s=host_steps)
        prepared = Prepared(graph, measurements, chosen, programs, objective, planner, None, False,
                            pinned=stages is not None, timings=timings)
    except BaseException:
        session.close()
        raise
    if supervise is True:
        supervise = Supervision(drift=False, joins=False)
    pipe = launch(prepared, cluster, window=window, supervise=supervise, session=session, replace=replace)
    prediction = predict_decode(graph, cluster.spec, chosen, decode_times, prefill_times, prompt_tokens=prompt_tokens,
                                sequences=sequences, hop_overhead_s=hop_s)
    return Generator(pipe, lm.tokenizer, spec, sequences=sequences, prediction=prediction)


def layer_times(model: Any, spec: Any, *, reps: int, prompt_tokens: int, threads: int = 1
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """This host's seconds per layer (first/last with embedding/head) for one decode step and one prefill.

    The decode step attends over half the context (the mean over a sequence's life); the prefill
    runs `prompt_tokens` tokens. Eager, on `threads` torch threads (as an emulated worker runs).
    """
    from partita.model.decoder import DecoderStageModule

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    dtype = getattr(torch, spec.dtype)
    past = max(1, spec.context // 2)
    decode_out, prefill_out = [], []
    try:
        for layer in range(spec.layers):
            step = DecoderStageModule(model, spec.family, layer, layer + 1, spec.layers, decode=True).eval()
            first = layer == 0
            x1 = torch.zeros(1, 1, dtype=torch.long) if first else torch.zeros(1, 1, spec.hidden, dtype=dtype)
            xp = torch.zeros(1, prompt_tokens, dtype=torch.long) if first else torch.zeros(1, prompt_tokens, spec.hidden, dtype=dtype)
            kv = torch.zeros(1, 1, spec.kv_heads, past, spec.head_dim, dtype=dtype)
            pos = torch.tensor([past])
            decode_out.append(_median_s(lambda step=step, x1=x1, kv=kv, pos=pos: step(x1, pos, kv, kv), reps))
            prefill_out.append(_median_s(lambda step=step, xp=xp: step(xp), reps))
    finally:
        torch.set_num_threads(previous)
    return tuple(decode_out), tuple(prefill_out)


def calibrated(programs: Sequence[Any], decode_s: Sequence[float], prefill_s: Sequence[float], spec: Any, *,
               prompt_tokens: int, reps: int, threads: int = 1
               ) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, tuple[tuple[float, tuple[float, ...]], ...]]]:
    """Per-layer times rescaled so that each stage's layers sum to its exported programs' measured time.

    The eager per-layer times (`layer_times`) choose the plan; the exported programs are what the
    workers run, and can be faster or slower. Each stage's decode program runs one token at half
    the context, its prefill program `prompt_tokens` tokens, on `threads` torch threads.

    Also returns the reference points emulated devices pace each step by (`Measurements.host_step_s`):
    {"decode": ((half the context, per layer),), "prefill": ((prompt_tokens, per layer), (2, per layer))}.
    The first point of each is what the cost model predicts with; prefill's second gives its growth
    with the prompt's tokens (a rebuild replays more), and a stage's layers share its measured time
    there in the proportions of the first. A decode step is paced by the half-context time at every
    position: its growth with the positions attended is a few percent for these models, below what
    two timings on a busy host can tell apart (a line through two noisy points tilted the pacing by
    up to 20%, and never upwards since a slope is clamped at 0).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    dtype = getattr(torch, spec.dtype)
    past = max(1, spec.context // 2)
    small_prompt = 2  # the fewest tokens a prefill program takes
    decode_out, prefill_out = list(decode_s), list(prefill_s)
    prefill_small = list(prefill_s)

    def inputs(first: bool, tokens: int, positions: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.zeros(1, tokens, dtype=torch.long) if first else torch.zeros(1, tokens, spec.hidden, dtype=dtype)
        return x, torch.tensor([positions]), torch.zeros(n, 1, spec.kv_heads, positions, spec.head_dim, dtype=dtype)

    try:
        for stage in programs:
            n = stage.end - stage.start
            first = stage.start == 0
            x1, pos, kv = inputs(first, 1, past, n)
            xp = inputs(first, prompt_tokens, 1, n)[0]
            xps = inputs(first, small_prompt, 1, n)[0]
            runs = (
                (decode_out, None, partial(stage.decode.run, x1, pos, kv, kv), None),
                (prefill_out, prefill_small, partial(stage.prefill.run, xp), partial(stage.prefill.run, xps)),
            )
            for times, small, fn, fn_small in runs:
                measured = _median_s(fn, reps)
                estimated = sum(times[stage.start:stage.end])
                for layer in range(stage.start, stage.end):
                    times[layer] = times[layer] * measured / estimated if estimated > 0 else measured / n
                if small is None or fn_small is None:
                    continue
                measured_small = _median_s(fn_small, reps)
                for layer in range(stage.start, stage.end):
                    small[layer] = times[layer] * measured_small / measured if measured > 0 else measured_small / n
    finally:
        torch.set_num_threads(previous)
    steps: dict[str, tuple[tuple[float, tuple[float, ...]], ...]] = {
        "decode": ((float(past), tuple(decode_out)),),
        "prefill": ((float(prompt_tokens), tuple(prefill_out)), (float(small_prompt), tuple(prefill_small))),
    }
    return tuple(decode_out), tuple(prefill_out), steps


def _median_s(fn: Any, reps: int) -> float:
    with torch.no_grad():
        fn()  # warm-up
        times = []
        for _ in range(max(1, reps)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
