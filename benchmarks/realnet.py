"""Real-network benchmark: real `partita worker`s in network namespaces, links shaped by the kernel.

The same testbed as tests/test_realnet.py (partita.testbed): hosts behind access links shaped with
`tc ... tbf`, the coordinator in this machine's namespace. It prints:

1. probe accuracy: `partita cluster probe` run `--probes` times on devices given by address
   alone; every link both ways against the kernel's shaping, the spread within a probe and run
   to run; whether every measured file gives the same plan offline, and every deploy in a row
   (each measuring for itself) the same plan;
2. a plan from deploy's own probes: its predicted throughput and latency against what a stream
   and single requests measure;
3. a link cut mid-stream (the busiest used host's link to 1/10): every re-plan with its cause,
   the figures it blamed, and its switch cost predicted against measured (seconds, bytes);
   requests lost and outputs checked;
4. a worker killed mid-stream, without and with `--standby` (`Supervision(standby=True)`): time
   to detect, time to resume (from detection to the first result after the switch), the
   failover's switch cost predicted against measured and the bytes it shipped; requests lost and
   outputs checked.

Run as root: `.venv/bin/python benchmarks/realnet.py` (about 3 minutes). Writes
benchmarks/results/realnet.json. Exits with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partita.model import capture  # noqa: E402
from partita.plan import plan  # noqa: E402
from partita.runtime.coordinator import deploy  # noqa: E402
from partita.runtime.probe import probe_cluster  # noqa: E402
from partita.runtime.supervisor import Supervision  # noqa: E402
from partita.testbed import Host, WorkerTestbed, unavailable_reason  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "realnet.json"
MBIT = {"a": 200.0, "b": 20.0, "c": 50.0, "d": 100.0}
console = Console(width=None if sys.stdout.isatty() else 140)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


def shaped(sender: str, receiver: str) -> float:
    return min(MBIT.get(sender, float("inf")), MBIT.get(receiver, float("inf")))


def probe_accuracy(bed: WorkerTestbed, graph, x, probes: int) -> dict:
    """`partita cluster probe` `probes` times on devices given by address alone; each measured file planned offline."""
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    placements, unstable = [], []
    for _ in range(probes):
        result = probe_cluster(bed.file, secret_key=bed.coordinator_secret)
        unstable.append(result.unstable)
        for (prober, probed), link in result.links.items():
            a, _ = sorted((prober, probed))
            m = link.measured
            forward, backward = (m["bandwidth_a_to_b"], m["bandwidth_b_to_a"]) if a == prober else \
                (m["bandwidth_b_to_a"], m["bandwidth_a_to_b"])
            entry = samples.setdefault((prober, probed), {"forward": [], "backward": [], "spread": [], "rtt": []})
            entry["forward"].append(forward * 8 / 1e6)
            entry["backward"].append(backward * 8 / 1e6)
            entry["spread"].append(m["bandwidth_spread"])
            entry["rtt"].append(m["rtt_s"])
        chosen = plan(graph, result.cluster)
        placements.append([(list(s.devices), s.start, s.end) for s in chosen.stages])
    rows = []
    for (sender, receiver), entry in sorted(samples.items()):
        shaped_mbit = shaped(sender, receiver)
        forward, backward = statistics.median(entry["forward"]), statistics.median(entry["backward"])
        every = entry["forward"] + entry["backward"]
        rows.append({"from": sender, "to": receiver, "shaped_mbit": shaped_mbit, "probed_mbit": forward,
                     "probed_back_mbit": backward, "ratio": forward / shaped_mbit, "ratio_back": backward / shaped_mbit,
                     "worst_ratio": max(every, key=lambda v: abs(v / shaped_mbit - 1)) / shaped_mbit,
                     "spread": max(entry["spread"]), "rtt_ms": statistics.median(entry["rtt"]) * 1e3,
                     "run_to_run": (max(every) - min(every)) / statistics.median(every)})
    return {"links": rows, "placements": placements, "same_plan": all(p == placements[0] for p in placements),
            "unstable": unstable}


def deploy_stability(bed: WorkerTestbed, graph, x, deploys: int) -> dict:
    """The plan of `deploys` deploys in a row, each measuring compute, memory and links itself."""
    placements = []
    with bed.connect() as cluster:
        for _ in range(deploys):
            with deploy(model(), (x,), cluster, graph=graph, supervise=False) as pipe:
                placements.append([(list(s.devices), s.start, s.end) for s in pipe.plan.stages])
                basis = dict(pipe.plan.basis or {})
    return {"placements": placements, "same_plan": all(p == placements[0] for p in placements), "basis": basis}


def stream(pipe, m, requests: int, actions: dict[int, callable]) -> dict:
    inputs = [torch.randn(64, 512) for _ in range(requests)]
    outputs, times = [], []
    started = time.monotonic()
    for i, y in enumerate(pipe.map(iter(inputs))):
        outputs.append(y)
        times.append(time.monotonic())
        if i in actions:
            actions[i]()
    with torch.no_grad():
        wrong = sum(not torch.equal(y, m(x)) for y, x in zip(outputs, inputs, strict=False))
    return {"delivered": len(outputs), "lost": requests - len(outputs), "wrong": wrong, "times": times,
            "started": started}


def predicted_vs_measured(bed: WorkerTestbed, graph, x, requests: int) -> dict:
    m = model()
    with bed.connect() as cluster:
        with deploy(m, (x,), cluster, graph=graph, probe_links=True, supervise=False) as pipe:
            singles = []
            for _ in range(10):
                t0 = time.perf_counter()
                pipe(x)
                singles.append(time.perf_counter() - t0)
            run = stream(pipe, m, requests, {})
            span = run["times"][-1] - run["times"][len(run["times"]) // 5]
            rps = (len(run["times"]) - 1 - len(run["times"]) // 5) / span
            return {"plan": str(pipe.plan), "predicted_rps": pipe.plan.throughput_rps, "measured_rps": rps,
                    "predicted_latency_s": pipe.plan.latency_s, "measured_latency_s": statistics.median(singles),
                    "lost": run["lost"], "wrong": run["wrong"]}


def switch_costs(replans: list[dict]) -> list[dict]:
    """Each completed re-plan's switch: predicted against measured seconds and bytes, and why it was made."""
    return [{"cause": r["cause"], "why": ", ".join(r["blamed"]) or ", ".join(r["devices_lost"]),
             "predicted_s": r["predicted_switch_s"], "measured_s": r["switch_s"],
             "predicted_bytes": r["predicted_ship_bytes"], "shipped_bytes": r["shipped_bytes"]}
            for r in replans if r["switch_s"] is not None]


def link_cut(bed: WorkerTestbed, graph, x, requests: int) -> dict:
    m = model()
    with bed.connect() as cluster:
        with deploy(m, (x,), cluster, graph=graph, probe_links=True, supervise=Supervision(detection_s=2.0)) as pipe:
            used = [d for s in pipe.plan.stages for d in s.devices]
            victim = max(used, key=lambda d: MBIT[d])
            cut_at: list[float] = []

            def cut() -> None:
                bed.testbed.shape(victim, uplink_mbit=MBIT[victim] / 10)
                cut_at.append(time.monotonic())

            try:
                run = stream(pipe, m, requests, {requests // 6: cut})
            finally:
                bed.testbed.shape(victim, uplink_mbit=MBIT[victim])
            replans = pipe.stats()["replans"]
    return {"victim": victim, "replans": replans, "lost": run["lost"], "wrong": run["wrong"],
            "switches": sum(r["switch_s"] is not None for r in replans), "costs": switch_costs(replans)}


def kill(bed: WorkerTestbed, graph, x, requests: int, *, standby: bool) -> dict:
    m = model()
    with bed.connect() as cluster:
        with deploy(m, (x,), cluster, graph=graph, probe_links=True,
                    supervise=Supervision(detection_s=1.0, standby=standby)) as pipe:
            if standby:
                pipe.supervisor.standby.wait(120.0)
            copies = pipe.supervisor.standby.state() if standby else None
            victim = pipe.plan.stages[0].devices[0]
            killed: list[float] = []

            def die() -> None:
                bed.kill(victim)
                killed.append(time.monotonic())

            run = stream(pipe, m, requests, {requests // 6: die})
            events = list(pipe.supervisor.events)
            replans = pipe.stats()["replans"]
    bed.start(victim)
    bed.wait_ready(victim)
    failed = next((e["detected_at"] for e in events if e["event"] == "failed"), None)
    switched = next((e["at"] for e in events if e["event"] == "switched" and failed and e["at"] >= failed), None)
    first_after = next((t for t in run["times"] if switched and t >= switched), None)
    return {"victim": victim, "standby": standby, "lost": run["lost"], "wrong": run["wrong"],
            "standby_bytes": copies["bytes"] if copies else None,
            "detect_s": failed - killed[0] if failed and killed else None,
            "resume_s": first_after - failed if first_after and failed else None,
            "costs": switch_costs([r for r in replans if r["cause"] == "failure"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"realnet benchmark: {reason}")
    torch.set_num_threads(1)
    x = torch.randn(64, 512)
    graph = capture(model(), (x,))
    # Devices by address alone: compute, memory and every link are measured.
    with tempfile.TemporaryDirectory() as root, WorkerTestbed([Host(n, mbit) for n, mbit in MBIT.items()], Path(root)) as bed:
        result = {
            "probes": probe_accuracy(bed, graph, x, args.probes),
            "deploys": deploy_stability(bed, graph, x, args.probes),
            "plan": predicted_vs_measured(bed, graph, x, args.requests),
            "link_cut": link_cut(bed, graph, x, args.requests),
            "kill": kill(bed, graph, x, args.requests // 2, standby=False),
            "kill_standby": kill(bed, graph, x, args.requests // 2, standby=True),
        }
    report(result, args)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str))


def report(result: dict, args) -> None:
    links = Table(title=f"probe accuracy (`partita cluster probe` {args.probes} times; shaping by tc tbf; "
                        "medians of the probes)")
    for column in ("from", "to", "shaped Mbit/s", "probed →", "probed ←", "→ / shaped", "← / shaped",
                   "worst probe / shaped", "spread in a probe", "run to run", "RTT ms"):
        links.add_column(column, justify="left" if column in ("from", "to") else "right")
    for r in result["probes"]["links"]:
        links.add_row(r["from"], r["to"], f"{r['shaped_mbit']:.0f}", f"{r['probed_mbit']:.1f}",
                      f"{r['probed_back_mbit']:.1f}", f"{r['ratio']:.2f}", f"{r['ratio_back']:.2f}",
                      f"{r['worst_ratio']:.2f}", f"±{r['spread']:.1%}", f"{r['run_to_run']:.1%}", f"{r['rtt_ms']:.2f}")
    console.print(links)
    unstable = [u for run in result["probes"]["unstable"] for u in run]
    console.print(f"same offline plan from every probe: {result['probes']['same_plan']} "
                  f"({result['probes']['placements'][0]}); not stable within ±10%: {unstable or 'nothing'}")
    d = result["deploys"]
    console.print(f"same plan on {len(d['placements'])} deploys in a row: {d['same_plan']} ({d['placements'][0]}; "
                  f"basis {d['basis']})")
    p = result["plan"]
    plan = Table(title="the plan from the probes: predicted against measured")
    for column in ("figure", "predicted", "measured", "measured / predicted"):
        plan.add_column(column, justify="left" if column == "figure" else "right")
    plan.add_row("throughput (req/s)", f"{p['predicted_rps']:.1f}", f"{p['measured_rps']:.1f}",
                 f"{p['measured_rps'] / p['predicted_rps']:.2f}")
    plan.add_row("latency, one request", f"{p['predicted_latency_s'] * 1e3:.2f} ms",
                 f"{p['measured_latency_s'] * 1e3:.2f} ms", f"{p['measured_latency_s'] / p['predicted_latency_s']:.2f}")
    console.print(plan)
    console.print(p["plan"])
    faults = Table(title="faults on the real network")
    for column in ("scenario", "lost", "wrong", "switches", "detect s", "resume s"):
        faults.add_column(column, justify="left" if column == "scenario" else "right")
    cut = result["link_cut"]
    faults.add_row(f"{cut['victim']}'s link / 10", str(cut["lost"]), str(cut["wrong"]), str(cut["switches"]), "—", "—")
    for k in (result["kill"], result["kill_standby"]):
        faults.add_row(f"kill {k['victim']}" + (" (--standby)" if k["standby"] else ""), str(k["lost"]),
                       str(k["wrong"]), str(len(k["costs"])), _s(k["detect_s"]), _s(k["resume_s"]))
    console.print(faults)
    costs = Table(title="switch cost: predicted against measured")
    for column in ("scenario", "cause", "why", "predicted s", "measured s", "measured / predicted",
                   "predicted bytes", "shipped bytes"):
        costs.add_column(column, justify="left" if column in ("scenario", "cause", "why") else "right")
    scenarios = [(f"{cut['victim']}'s link / 10", cut)]
    scenarios += [(f"kill {k['victim']}" + (" (--standby)" if k["standby"] else ""), k)
                  for k in (result["kill"], result["kill_standby"])]
    for label, scenario in scenarios:
        for c in scenario["costs"]:
            ratio = c["measured_s"] / c["predicted_s"] if c["predicted_s"] else None
            costs.add_row(label, c["cause"], c["why"], _s(c["predicted_s"]), _s(c["measured_s"]),
                          f"{ratio:.2f}" if ratio is not None else "—", f"{c['predicted_bytes']:,}",
                          f"{c['shipped_bytes']:,}")
    console.print(costs)
    standby = result["kill_standby"]
    console.print(f"--standby pre-shipped {standby['standby_bytes'] or 0:,} bytes before the kill", highlight=False)


def _s(seconds: float | None) -> str:
    return f"{seconds:.2f}" if seconds is not None else "—"


if __name__ == "__main__":
    main()
