"""`partita simulate`: run a plan through the discrete-event simulator and compare with the prediction."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from partita.commands.plan import (
    ClusterOpt,
    InputShapeOpt,
    ModelArg,
    PlannerOpt,
    ProfileOpt,
    load_model_profile,
)
from partita.errors import PartitaError


def simulate(
    model: ModelArg = None,
    cluster: ClusterOpt = ...,  # type: ignore[assignment]  # typer's spelling of a required option
    input_shape: InputShapeOpt = None,
    profile: ProfileOpt = None,
    planner: PlannerOpt = "optimal",
    objective: Annotated[str, typer.Option("--objective", help="throughput or latency.")] = "throughput",
    requests: Annotated[int, typer.Option("--requests", help="How many requests to simulate.")] = 1000,
    rate: Annotated[
        float | None,
        typer.Option("--rate", help="Poisson arrivals at R req/s (default: closed loop, enough in flight to saturate)."),
    ] = None,
    in_flight: Annotated[int | None, typer.Option("--in-flight", help="Closed loop: requests in flight.")] = None,
    jitter: Annotated[float, typer.Option("--jitter", help="Lognormal sigma on every service time.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
    sequences: Annotated[int, typer.Option("--sequences", help="hf: models: sequences in flight.")] = 8,
    context: Annotated[int, typer.Option("--context", help="hf: models: positions per sequence.")] = 256,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="hf: models: new tokens per sequence.")] = 64,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="hf: models: prompt length.")] = 16,
) -> None:
    """Simulate MODEL's plan on the cluster: throughput, latency percentiles, utilisation.

    An hf:PATH model is simulated as generation (`partita.plan.decode`): its decode plan's time to
    first token, per-token latency and tokens/s with 1 and --sequences sequences, next to the cost
    model's predictions. Compute is the layers' FLOPs over the devices' FLOP/s.
    """
    from rich.console import Console
    from rich.table import Table

    from partita.cluster import ClusterSpec
    from partita.model.hf import is_hf_ref
    from partita.plan import PLANNERS
    from partita.plan import plan as make_plan
    from partita.sim import simulate as run_simulation

    spec = ClusterSpec.from_yaml(cluster)
    if model is not None and is_hf_ref(model):
        simulate_decoder(model, spec, objective=objective, planner=planner, sequences=sequences, context=context,
                         new_tokens=max_new_tokens, prompt_tokens=prompt_tokens, as_json=as_json)
        return
    prof = load_model_profile(model, input_shape, profile)
    names = list(PLANNERS) if planner == "all" else [planner]
    reports = []
    refusals: list[PartitaError] = []
    for name in names:
        try:
            chosen = make_plan(prof, spec, objective=objective, planner=name)
        except PartitaError as exc:
            if planner != "all":
                raise
            refusals.append(exc)
            continue  # a baseline that does not fit has nothing to simulate; `partita plan` shows why
        report = run_simulation(chosen, spec, prof, requests=requests, arrival="closed" if rate is None else rate,
                                in_flight=in_flight, jitter=jitter, seed=seed)
        reports.append((name, chosen, report))
    if not reports:
        raise refusals[0]  # nothing fits: optimal's reason (it knows every device), exit code 2
    if as_json:
        payload = [{"planner": n, "plan": p.to_dict(), "report": r.to_dict()} for n, p, r in reports]
        typer.echo(json.dumps(payload if planner == "all" else payload[0], indent=2))
        return
    console = Console()
    table = Table(title=f"{prof.model}: {requests} requests, {reports[0][2].arrival if reports else ''}")
    for column in ("planner", "throughput req/s", "predicted", "sim / predicted", "p50 ms", "p95 ms", "p99 ms",
                   "busiest device", "busiest link"):
        table.add_column(column, justify="left" if column in ("planner", "busiest device", "busiest link")
                         else "right")
    for name, chosen, report in reports:
        device = max(report.device_utilisation.items(), key=lambda kv: kv[1])
        link = max(report.link_utilisation.items(), key=lambda kv: kv[1])
        table.add_row(name, f"{report.throughput_rps:.4g}", f"{chosen.throughput_rps:.4g}",
                      f"{report.throughput_rps / chosen.throughput_rps:.3f}",
                      f"{report.latency_p50_s * 1e3:.2f}", f"{report.latency_p95_s * 1e3:.2f}",
                      f"{report.latency_p99_s * 1e3:.2f}", f"{device[0]} {device[1]:.0%}",
                      f"{link[0]} {link[1]:.0%}")
    console.print(table)
    for name, chosen, _ in reports:
        if any(stage.kind == "tiled" for stage in chosen.stages):
            console.print(f"{name}: {chosen}")  # a tiled stage's grid and tiles, one line each


def simulate_decoder(model: str, spec, *, objective: str, planner: str, sequences: int, context: int,
                     new_tokens: int, prompt_tokens: int, as_json: bool) -> None:
    """`partita simulate hf:PATH`: the decode plan, its predictions and `simulate_decode`'s figures."""
    from rich.console import Console
    from rich.table import Table

    from partita.errors import PlanError
    from partita.model.decoder import decoder_spec
    from partita.model.decoder_stage import DecoderGraph
    from partita.model.hf import load_hf
    from partita.plan import load_profile
    from partita.plan.decode import chain_terms, plan_decode, predict_decode, prefill_profile, simulate_decode

    for flag, value in (("--sequences", sequences), ("--max-new-tokens", new_tokens), ("--prompt-tokens", prompt_tokens)):
        if value < 1:
            raise PlanError(f"{flag} must be at least 1, got {value}")
    if context <= prompt_tokens:
        raise PlanError(f"--context ({context}) must exceed --prompt-tokens ({prompt_tokens})")
    lm = load_hf(model)
    profile = load_profile(DecoderGraph.of(lm.model, decoder_spec(lm.model, context=context, name=lm.name),
                                           sequences=sequences).to_profile()).to_dict()
    chosen = plan_decode(profile, spec, decode_times_s={}, prefill_times_s={}, sequences=sequences,
                         prompt_tokens=prompt_tokens, objective=objective, planner=planner)
    predicted = predict_decode(profile, spec, chosen, {}, {}, prompt_tokens=prompt_tokens, sequences=sequences)
    decode = chain_terms(profile, spec, chosen, None)
    prefill = chain_terms(prefill_profile(profile, prompt_tokens), spec, chosen, None)
    simulated = {"one": simulate_decode(decode, prefill, sequences=1, tokens=new_tokens),
                 "many": simulate_decode(decode, prefill, sequences=sequences, tokens=new_tokens)}
    if as_json:
        typer.echo(json.dumps({"plan": chosen.to_dict(), "predicted": predicted.to_json(),
                               "simulated": {k: v.__dict__ for k, v in simulated.items()}}, indent=2))
        return
    console = Console()
    console.print(f"{lm.name}: {chosen}")
    table = Table(title=f"{lm.name}: {new_tokens} new tokens, prompt {prompt_tokens} tokens")
    for column in ("figure", "simulated", "predicted"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    one, many = simulated["one"], simulated["many"]
    table.add_row("TTFT ms", f"{one.ttft_s * 1e3:.3g}", f"{predicted.ttft_s * 1e3:.3g}")
    table.add_row("per-token ms", f"{one.per_token_s * 1e3:.3g}", f"{predicted.per_token_s * 1e3:.3g}")
    table.add_row("tokens/s, 1 sequence", f"{one.tokens_per_s:.4g}", f"{predicted.tokens_per_s_at(1):.4g}")
    table.add_row(f"tokens/s, {sequences} sequences", f"{many.tokens_per_s:.4g}", f"{predicted.tokens_per_s:.4g}")
    console.print(table)
