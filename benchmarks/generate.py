"""Generation benchmark: a decoder across emulated devices, against exo-style placement and one device.

For each emulated cluster (home-edge, from examples/clusters; mixed-4, four unequal devices on
Wi-Fi and Ethernet, defined below) it starts a LocalCluster and deploys a Llama-style decoder
(random weights, `save_tiny`, 8 layers of width 512 unless --model names an hf: directory) three ways:

- **partita**: the optimal throughput plan over the layers, with `--sequences` sequences in flight;
- **exo-style**: layers in proportion to device memory (`planner="memory"`), one sequence at a
  time, as exo runs its ring (one sequence per pass);
- **unsplit**: the whole model on the single best device (`planner="single"`).

Each is measured with one sequence (time to first token, per-token latency, tokens/s) and with
`--sequences` sequences at once (tokens/s), next to the cost model's predictions
(`partita.plan.decode`). Greedy tokens of every run are checked against transformers' own
`generate` on the unsplit model. "overruns" counts the steps whose real compute took longer than
their emulated target (reference / speed x dilation: a busy host); those make measured exceed
predicted. Figures are device time (real seconds / the cluster's dilation).
The predictions include the runtime's per-hop overhead h (`partita.plan.HOP_OVERHEAD_S`, or
--hop-overhead-ms) on every hop, as the chain cost model does.
Results go to benchmarks/results/generate.json.

    .venv/bin/python benchmarks/generate.py [--tokens 32] [--sequences 8] [--clusters home-edge mixed-4]
        [--reps 9] [--hop-overhead-ms H]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from partita.cluster import ClusterSpec
from partita.model.hf import load_hf, save_tiny
from partita.runtime.generate import Sampling, deploy_generator
from partita.runtime.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 16
MIN_DILATION = 10.0
MIXED = {
    "source": "client",
    "devices": [
        {"name": "desktop", "compute": "60GFLOPS", "memory": "2GiB"},
        {"name": "laptop", "compute": "30GFLOPS", "memory": "1GiB"},
        {"name": "pi", "compute": "8GFLOPS", "memory": "4GiB"},
        {"name": "phone", "compute": "15GFLOPS", "memory": "512MiB"},
    ],
    "links": {
        "default": {"bandwidth": "200Mbit/s", "latency": "3ms"},
        "pairs": [
            {"a": "client", "b": "desktop", "bandwidth": "1Gbit/s", "latency": "0.3ms"},
            {"a": "desktop", "b": "laptop", "bandwidth": "1Gbit/s", "latency": "0.5ms"},
        ],
    },
}


def cluster_spec(name: str) -> ClusterSpec:
    if name == "mixed-4":
        return ClusterSpec.from_dict(MIXED, origin="mixed-4")
    return ClusterSpec.from_yaml(ROOT / "examples" / "clusters" / f"{name}.yaml")


def prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of PROMPT_TOKENS word tokens each (distinct, reproducible)."""
    words = [t for t in range(3, len(tokenizer))]
    g = torch.Generator().manual_seed(0)
    return [[words[int(i)] for i in torch.randint(len(words), (PROMPT_TOKENS,), generator=g)] for _ in range(count)]


def reference(lm, prompt: list[int], tokens: int) -> list[int]:
    """transformers' greedy tokens, ending at the model's EOS as partita's sequences do (EOS included)."""
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def run_config(lm, cluster, label: str, planner: str, in_flight: int, args, refs, asked) -> dict:
    sampling = Sampling(max_new_tokens=args.tokens)
    started = time.perf_counter()
    hop_s = None if args.hop_overhead_ms is None else args.hop_overhead_ms / 1e3
    with deploy_generator(lm, cluster, context=args.context, sequences=max(in_flight, 1), planner=planner,
                          supervise=False, prompt_tokens=PROMPT_TOKENS, reps=args.reps, hop_overhead_s=hop_s) as generator:
        deploy_s = time.perf_counter() - started
        generator.generate_many([asked[0]], Sampling(max_new_tokens=4))  # warm the workers' programs
        one = generator.generate_many([asked[0]], sampling)[0]
        one_rate = generator.last_run["tokens_per_s"]
        many = generator.generate_many(asked[:args.sequences], sampling) if in_flight > 1 else None
        many_rate = generator.last_run["tokens_per_s"] if many is not None else None
        prediction = generator.prediction
        plan = generator.plan
        stages = generator.pipe.stats()["stages"]
    exact = one.token_ids == refs[0] and (many is None or [m.token_ids for m in many] == refs[:args.sequences])
    return {
        "label": label,
        "planner": planner,
        "in_flight": in_flight,
        "stages": [{"devices": list(s.devices), "layers": [s.start, s.end]} for s in plan.stages],
        "deploy_s": deploy_s,
        "hop_overhead_s": plan.hop_overhead_s,
        "measured": {"ttft_s": one.ttft_s, "per_token_s": one.per_token_s, "tokens_per_s_one": one_rate,
                     "tokens_per_s_many": many_rate},
        "predicted": {"ttft_s": prediction.ttft_s, "per_token_s": prediction.per_token_s,
                      "tokens_per_s_one": prediction.tokens_per_s_at(1),
                      "tokens_per_s_many": prediction.tokens_per_s_at(args.sequences) if in_flight > 1 else None},
        "tokens_equal_unsplit_generate": exact,
        # Steps whose real compute took longer than their emulated target (a busy host): device time
        # then exceeds reference / speed, and measured exceeds predicted.
        "overruns": {"steps": sum(s["overruns"] for s in stages), "of": sum(s["requests"] for s in stages)},
    }


def bench_cluster(name: str, lm, args, console: Console) -> dict:
    spec = cluster_spec(name)
    asked = prompts(lm.tokenizer, args.sequences)
    refs = [reference(lm, p, args.tokens) for p in asked]
    out = {}
    with LocalCluster(spec, dilation=args.dilation) as cluster:
        if args.dilation is None and cluster.dilation < MIN_DILATION:
            # A device faster than this host leaves little slack: a busy host then overruns the emulated
            # times and pays per-message runtime costs in device time; slow the emulated world down more.
            cluster.set_dilation(MIN_DILATION)
        for label, planner, in_flight in (("partita", "optimal", args.sequences), ("exo-style", "memory", 1),
                                          ("unsplit", "single", args.sequences)):
            console.print(f"[dim]{name}: {label} ({planner}, {in_flight} in flight)…[/]")
            out[label] = run_config(lm, cluster, label, planner, in_flight, args, refs, asked)
        out["dilation"] = cluster.dilation
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def ms(x: float | None) -> str:
    return f"{x * 1e3:.1f}" if x is not None else "-"


def report(results: dict, args, console: Console) -> None:
    for name, runs in results.items():
        table = Table(title=f"{name} (device time; dilation {runs['dilation']:g}; {args.tokens} tokens, "
                            f"{args.sequences} sequences; h {runs['partita']['hop_overhead_s'] * 1e3:g} ms per hop)")
        for column in ("plan", "stages", "TTFT ms (pred)", "per-token ms (pred)", "per-token meas/pred",
                       "tok/s 1 seq (pred)", f"tok/s {args.sequences} seq (pred)", "exact", "overruns"):
            table.add_column(column)
        for label in ("partita", "exo-style", "unsplit"):
            r = runs[label]
            m, p = r["measured"], r["predicted"]
            stages = " | ".join(f"{'+'.join(s['devices'])}:{s['layers'][0]}-{s['layers'][1]}" for s in r["stages"])
            many = f"{m['tokens_per_s_many']:.1f} ({p['tokens_per_s_many']:.1f})" if m["tokens_per_s_many"] else "-"
            table.add_row(label, stages, f"{ms(m['ttft_s'])} ({ms(p['ttft_s'])})",
                          f"{ms(m['per_token_s'])} ({ms(p['per_token_s'])})", ratio(m["per_token_s"], p["per_token_s"]),
                          f"{m['tokens_per_s_one']:.1f} ({p['tokens_per_s_one']:.1f})", many,
                          "yes" if r["tokens_equal_unsplit_generate"] else "NO",
                          f"{r['overruns']['steps']}/{r['overruns']['of']}")
        console.print(table)
        partita_many = runs["partita"]["measured"]["tokens_per_s_many"]
        exo = runs["exo-style"]["measured"]["tokens_per_s_one"]
        unsplit = runs["unsplit"]["measured"]["tokens_per_s_many"]
        console.print(f"  partita with {args.sequences} sequences / exo-style: {ratio(partita_many, exo)}x tokens/s "
                      f"(goal >= 2); / unsplit on the best device: {ratio(partita_many, unsplit)}x; "
                      f"partita per-token latency measured / predicted: "
                      f"{ratio(runs['partita']['measured']['per_token_s'], runs['partita']['predicted']['per_token_s'])} "
                      "(goal within 0.9-1.1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hf:PATH (default: a random 8-layer Llama-style decoder)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    parser.add_argument("--sequences", type=int, default=8, help="sequences in flight for the many-sequence runs")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dilation", type=float, default=None,
                        help=f"fixed dilation (default: the cluster's choice, at least {MIN_DILATION:g})")
    parser.add_argument("--clusters", nargs="+", default=["home-edge", "mixed-4"])
    parser.add_argument("--reps", type=int, default=9, help="timing repetitions per layer and stage program")
    parser.add_argument("--hop-overhead-ms", type=float, default=None,
                        help="the per-hop overhead h the plans include (default: partita.plan.HOP_OVERHEAD_S)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        ref = args.model or f"hf:{save_tiny(Path(tmp) / 'llama', 'llama', layers=8, hidden=512)}"
        lm = load_hf(ref)
        results = {name: bench_cluster(name, lm, args, console) for name in args.clusters}
    report(results, args, console)
    out = ROOT / "benchmarks" / "results" / "generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
