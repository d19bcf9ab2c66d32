"""Faults benchmark: does a running pipeline lose, duplicate or corrupt requests when things go wrong?

One LocalCluster of four emulated devices serves a small MLP (batch 32, codec none); every scenario
deploys it afresh (supervised: detection `--detection-s`, cool-down 3 s), streams requests, and
does one thing to it midway:

* kill 1 of 4 workers (SIGKILL) in the middle of 500 requests;
* kill two, one after the other;
* cut a link's bandwidth 10x (the link between the first two stages);
* slow a device 5x (the busiest stage's);
* a worker comes back (killed, then restarted and added with `Pipeline.add_device`);
* 10k fuzzed frames (random, and mutated valid messages for requests that do not exist) sent
  to a live worker's data socket with the coordinator's key while the stream runs.

Per scenario: requests sent, delivered, lost (neither delivered nor failed... nor answered at
all), duplicated (a result handed out twice), wrong (not torch.equal to the unsplit model), time
to detect (kill -> failure detected; drift -> re-plan decided), time to resume (detection -> the
first result after the switch), throughput before and after (real requests/s, and their ratio).
The baseline for throughput is the same pipeline before the fault, measured in the same run.
Goal: 0 lost, 0 duplicated, 0 wrong, resume within 5 s of detection. JSON: benchmarks/results/faults.json.

    .venv/bin/python benchmarks/faults.py [--requests 500] [--fuzz-frames 10000] [--detection-s 1.0]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq
from rich.console import Console
from rich.table import Table
from torch import nn

from partita.cluster import ClusterSpec, DeviceSpec
from partita.errors import PartitaError
from partita.runtime.coordinator import deploy
from partita.runtime.keys import apply_client
from partita.runtime.local import LocalCluster
from partita.runtime.supervisor import Supervision
from partita.runtime.wire import encode

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("a", "b", "c", "d")
SPEED = 0.02
BANDWIDTH = 4e6


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 5)).eval()


def device(name: str) -> DeviceSpec:
    return DeviceSpec(name, 1e9, 2**30, speed=SPEED)


class Bench:
    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        torch.set_num_threads(1)
        self.cluster, self.args = cluster, args
        self.model, x = mlp(), torch.randn(32, 64)
        pipe = deploy(self.model, (x,), cluster, replicate=False, supervise=False)
        pipe.close()
        self.x, self.graph, self.measured = x, pipe.graph, pipe.measurements

    def heal(self) -> None:
        for name in DEVICES:
            if self.cluster.processes[name].poll() is not None:
                self.cluster.add_worker(device(name))

    def run(self, name: str, actions: dict[int, Any], requests: int) -> dict[str, Any]:
        """Stream `requests`; after result i, call actions[i](pipe, marks). Returns the scenario's row."""
        self.heal()
        supervision = Supervision(detection_s=self.args.detection_s, stats_interval_s=0.25, cooldown_s=3.0)
        batches = [torch.randn(32, 64) for _ in range(requests)]
        marks: dict[str, Any] = {"faults": []}
        outputs: list[torch.Tensor] = []
        times: list[float] = []
        error = None
        pipe = deploy(self.model, (self.x,), self.cluster, graph=self.graph, measurements=self.measured,
                      replicate=False, supervise=supervision)
        try:
            started = time.monotonic()
            try:
                for i, y in enumerate(pipe.map(batches)):
                    outputs.append(y)
                    times.append(time.monotonic())
                    if i in actions:
                        actions[i](pipe, marks)
            except PartitaError as exc:
                error = str(exc)
            for finish in marks.get("finish", []):
                finish()
            stats = pipe.stats()
            events = list(pipe.supervisor.events)
        finally:
            pipe.close()
        with torch.no_grad():
            wrong = sum(not torch.equal(y, self.model(b)) for y, b in zip(outputs, batches, strict=False))
        return summarize(name, requests, outputs, times, started, marks, stats, events, wrong, error)


def summarize(name, requests, outputs, times, started, marks, stats, events, wrong, error) -> dict[str, Any]:
    faults = marks["faults"]
    first_fault = faults[0] if faults else None
    detects, resumes = [], []
    switches = [e for e in events if e["event"] == "switched"]
    failures = [e for e in events if e["event"] == "failed"]
    decided = [r["time_s"] for r in stats["replans"]]
    for at in faults:
        detected = next((e["detected_at"] for e in failures if e["detected_at"] >= at), None)
        if detected is None:  # drift: the decision is the detection
            detected = next((t for t in decided if t >= at), None)
        if detected is None:
            continue
        detects.append(detected - at)
        switched = next((e["at"] for e in switches if e["at"] >= detected), None)
        if switched is not None:
            first = next((t for t in times if t >= switched), None)
            if first is not None:
                resumes.append(first - detected)
    end = times[-1] if times else started
    resumed_at = max((e["at"] for e in switches), default=None)

    def rate(lo: float, hi: float) -> float | None:
        n = sum(lo <= t < hi for t in times)
        return n / (hi - lo) if hi > lo and n else None

    before = rate(started, first_fault) if first_fault else rate(started, end)
    after = rate(resumed_at, end + 1e-9) if resumed_at else (rate(first_fault, end + 1e-9) if first_fault else None)
    return {
        "scenario": name,
        "sent": requests,
        "delivered": len(outputs),
        "failed": stats["failed"],
        "lost": requests - len(outputs) - stats["failed"],
        "duplicated": len(outputs) - len(set(range(len(outputs)))),
        "wrong": int(wrong),
        "detect_s": max(detects) if detects else None,
        "resume_s": max(resumes) if resumes else None,
        "throughput_before_rps": before,
        "throughput_after_rps": after,
        "replans": stats["replans"],
        "late_answers_dropped": stats["duplicates"] + stats["stale"],
        "error": error,
        "notes": marks.get("notes", ""),
    }


# -- scenarios -----------------------------------------------------------------------------------
def kill(cluster: LocalCluster, index: int):
    def act(pipe, marks):
        stage = pipe.plan.stages[min(index, len(pipe.plan.stages) - 1)]
        cluster.processes[stage.devices[0]].send_signal(signal.SIGKILL)
        marks["faults"].append(time.monotonic())
    return act


def comes_back(cluster: LocalCluster, bench: Bench):
    victim = {}

    def first(pipe, marks):
        victim["name"] = pipe.plan.stages[1].devices[0]
        cluster.processes[victim["name"]].send_signal(signal.SIGKILL)
        marks["faults"].append(time.monotonic())

    def second(pipe, marks):
        cluster.add_worker(device(victim["name"]))
        record = pipe.add_device(victim["name"])
        marks["notes"] = f"join: {record['reason'] if record else 'no re-plan'}"
    return first, second


def slow_device(cluster: LocalCluster):
    def act(pipe, marks):
        busiest = max(pipe.plan.stages, key=lambda s: s.compute_s).devices[0]
        cluster.set_device(busiest, speed=SPEED / 5)
        marks["faults"].append(time.monotonic())
        marks.setdefault("finish", []).append(lambda: cluster.set_device(busiest, speed=SPEED))
    return act


def cut_link(cluster: LocalCluster):
    def act(pipe, marks):
        if len(pipe.plan.stages) < 2:
            marks["notes"] = "plan has one stage: no link to cut"
            return
        a, b = pipe.plan.stages[0].devices[0], pipe.plan.stages[1].devices[0]
        cluster.set_link(a, b, bandwidth=BANDWIDTH / 10)
        marks["faults"].append(time.monotonic())
        marks.setdefault("finish", []).append(lambda: cluster.set_link(a, b, bandwidth=BANDWIDTH))
    return act


def fuzz(cluster: LocalCluster, frames: int, seed: int = 0):
    def act(pipe, marks):
        target = pipe.plan.stages[len(pipe.plan.stages) // 2].devices[0]
        address = pipe.supervisor.session.infos[target]["data"]
        thread = threading.Thread(target=_fuzz, args=(cluster, target, address, frames, seed, marks), daemon=True)
        marks["faults"].append(time.monotonic())
        thread.start()
        marks.setdefault("finish", []).append(lambda: thread.join(300))
    return act


def _fuzz(cluster: LocalCluster, target: str, address: str, frames: int, seed: int, marks: dict) -> None:
    """Send `frames` random / mutated messages to a worker's data socket, reading whatever it answers."""
    rng = random.Random(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    keys, endpoint = cluster.coordinator_keys, cluster.endpoints[target]
    plain = keys is None
    apply_client(sock, None if plain else (keys.public, keys.secret), None if plain else endpoint.public_key,
                 insecure=plain)
    sock.connect(address)
    sent = replies = 0
    for _ in range(frames):
        sock.send_multipart(_fuzzed(rng), copy=True)
        sent += 1
        while sock.poll(0):
            sock.recv_multipart()
            replies += 1
        if sent % 200 == 0:
            time.sleep(0.01)  # let the worker breathe: this is hostile traffic, not a flood test
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and sock.poll(100):
        sock.recv_multipart()
        replies += 1
    sock.close()
    ctx.term()
    alive = cluster.processes[target].poll() is None
    marks["notes"] = f"{sent} frames to {target}'s data socket, {replies} replies; worker alive: {alive}"


def _fuzzed(rng: random.Random) -> list[bytes]:
    """A random message, or a valid one (for a request that does not exist) with bytes flipped or frames cut."""
    choice = rng.random()
    if choice < 0.3:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
    kind = rng.choice(["act", "fail", "echo", "credit", "x"])
    header = {"r": 2**40 + rng.randrange(10**6), "e": rng.randrange(-2, 10), "s": rng.randrange(-1, 5),
              "ts": time.time()}
    tensors = [torch.randn(rng.choice([(32, 64), (1,), (3, 3)]))] if kind in ("act", "echo") else []
    frames = [bytes(memoryview(f)) for f in encode(kind, header, tensors)]
    if choice < 0.7:
        i = rng.randrange(len(frames))
        data = bytearray(frames[i])
        for _ in range(rng.randrange(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
    elif choice < 0.85:
        frames = frames[:rng.randrange(len(frames) + 1)] or [b""]
    return frames


# -- report ------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--fuzz-frames", type=int, default=10_000)
    parser.add_argument("--detection-s", type=float, default=1.0)
    args = parser.parse_args()
    console = Console(width=170)
    spec = ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": n, "flops_per_s": 1e9, "memory_bytes": 2**30, "speed": SPEED} for n in DEVICES],
        "links": {"default": {"bandwidth": BANDWIDTH, "latency": "0.2ms"}},
    })
    n = args.requests
    rows = []
    with LocalCluster(spec) as cluster:
        bench = Bench(cluster, args)
        back_first, back_second = comes_back(cluster, bench)
        scenarios = [
            ("kill 1 of 4 (SIGKILL)", {n // 3: kill(cluster, 1)}),
            ("kill 2, one after the other", {n // 4: kill(cluster, 1), n // 2: kill(cluster, 0)}),
            ("link bandwidth / 10", {n // 4: cut_link(cluster)}),
            ("device 5x slower", {n // 4: slow_device(cluster)}),
            ("a worker comes back", {n // 5: back_first, n // 2: back_second}),
            (f"{args.fuzz_frames} fuzzed frames", {n // 10: fuzz(cluster, args.fuzz_frames)}),
        ]
        for name, actions in scenarios:
            console.print(f"[bold]{name}[/] …")
            try:
                rows.append(bench.run(name, actions, n))
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others' rows
                rows.append({"scenario": name, "error": f"{type(exc).__name__}: {exc}", "unfinished": True})
    table = Table(title=f"faults: {n} requests per scenario, detection {args.detection_s:g} s")
    for column in ("scenario", "sent", "delivered", "lost", "dup", "wrong", "detect s", "resume s",
                   "rps before", "rps after", "after/before", "re-plans"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for row in rows:
        if row.get("unfinished"):
            table.add_row(row["scenario"], *["-"] * 10, f"unfinished: {row['error']}")
            continue
        before, after = row["throughput_before_rps"], row["throughput_after_rps"]
        ratio = after / before if before and after else None
        table.add_row(row["scenario"], str(row["sent"]), str(row["delivered"]), str(row["lost"]),
                      str(row["duplicated"]), str(row["wrong"]), fmt(row["detect_s"]), fmt(row["resume_s"]),
                      fmt(before, ".0f"), fmt(after, ".0f"), fmt(ratio), ", ".join(r["cause"] for r in row["replans"]))
    console.print(table)
    for row in rows:
        if row.get("notes") or row.get("error"):
            console.print(f"  {row['scenario']}: {row.get('notes', '')} {row.get('error') or ''}")
    out = ROOT / "benchmarks" / "results" / "faults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
