"""`partita generate MODEL --cluster FILE --prompt TEXT`: generate text with a decoder split across the cluster.

MODEL is `hf:PATH`, a local Hugging Face model directory (needs `partita[llm]`), or `hf:FILE.gguf`
(needs `partita[gguf]`). Devices of the
cluster file with an `address` are real workers; the others are emulated here (a LocalCluster).
Before the timed run, 2 tokens of the prompt warm the workers (`--no-warmup` skips it), so that
the time to first token is that of warm workers, as the prediction assumes. Tokens are printed as
they come; `--json` prints one object instead:
`{token_ids, text, plan, ttft_s, per_token_s, tokens_per_s}` (token_ids: the new tokens only;
times in device seconds), plus the cost model's `predicted` figures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer


def generate(
    model: Annotated[str, typer.Argument(help="hf:PATH, a local Hugging Face causal LM directory (or hf:FILE.gguf).")],
    cluster: Annotated[Path, typer.Option("--cluster", help="Cluster file (YAML).")],
    prompt: Annotated[str, typer.Option("--prompt", help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="New tokens at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy; > 0: sample.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass, (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampler.")] = 0,
    context: Annotated[int, typer.Option("--context", min=2, help="Positions per sequence (prompt + new tokens).")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    warmup: Annotated[bool, typer.Option(
        "--warmup/--no-warmup",
        help="First run 2 tokens of the prompt, untimed, so the figures are those of warm workers.")] = True,
    secret_key: Annotated[
        Path | None, typer.Option("--secret-key", help="The coordinator's NAME.key_secret (for workers with addresses).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Talk to --insecure workers (no encryption).")] = False,
) -> None:
    """Deploy MODEL's layers across the cluster and continue PROMPT, streaming the tokens."""
    from rich.console import Console

    from partita.errors import ModelRefError
    from partita.model.hf import is_hf_ref, load_hf
    from partita.runtime import keys
    from partita.runtime.connect import open_cluster
    from partita.runtime.generate import Generation, Sampling, Token, deploy_generator

    console = Console(stderr=True)
    if insecure:
        console.print("[yellow]warning:[/] --insecure: no encryption and no authentication on any socket")
        keys.insecure_already_reported()
    if not is_hf_ref(model):
        raise ModelRefError(f"partita generate takes hf:PATH (a local Hugging Face model directory), got {model!r}")
    if not 0 < top_p <= 1:
        raise typer.BadParameter(f"--top-p must be in (0, 1], got {top_p}", param_hint="--top-p")
    lm = load_hf(model)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    with open_cluster(cluster, secret_key=secret_key, insecure=insecure) as handle:
        with deploy_generator(lm, handle, context=context, sequences=1) as generator:
            if warmup:
                # A stage program's first calls on a worker cost more than the later ones (allocations,
                # torch's lazy set-up); untimed, they would count in the time to first token.
                started = time.perf_counter()
                with console.status("warming the workers (2 tokens of the prompt, untimed)"):
                    generator.generate_many([prompt], Sampling(max_new_tokens=2))
                console.print(f"warmed the workers in {time.perf_counter() - started:.1f} s (--no-warmup skips this)")
            result: Generation | None = None
            for event in generator.stream_many([prompt], sampling):
                if isinstance(event, Token) and not as_json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, Generation):
                    result = event
            plan = generator.plan
            prediction = generator.prediction
            run = dict(generator.last_run)
    if result is None:  # stream_many yields every sequence's Generation; a missing one is a bug, said plainly
        raise RuntimeError("generation ended without a result")
    if as_json:
        print(json.dumps({
            "token_ids": result.token_ids,
            "text": result.text,
            "plan": plan.to_dict(),
            "ttft_s": result.ttft_s,
            "per_token_s": result.per_token_s,
            "tokens_per_s": run.get("tokens_per_s"),
            "finish": result.finish,
            "predicted": prediction.to_json() if prediction is not None else None,
        }))
    else:
        print()
        per_token = f"{result.per_token_s * 1e3:.2f} ms" if result.per_token_s is not None else "-"
        console.print(f"{len(result.token_ids)} tokens ({result.finish}); time to first token "
                      f"{result.ttft_s * 1e3:.1f} ms, {per_token} per token, "
                      f"{run.get('tokens_per_s', 0.0):.1f} tokens/s (device time)")
