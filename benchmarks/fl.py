"""FedAvg, FedProx and FedNova under heterogeneity, and the round loop's overhead.

1. Convergence: accuracy and loss against rounds on `synthetic` and `digits` (non-IID), with deadline-driven
   unequal work: 10 clients on the devices of examples/clusters/home-edge.yaml (two clients per device), each
   running as many local steps as fit in the round's deadline at its device's speed (capped at MAX_STEPS).
   A step's emulated time is proportional to 1 / flops_per_s of the device. Ratios are against FedAvg.
2. Paired seeds on `digits`, FedNova's own setting (every client runs 2 local epochs, so tau_i ~ n_i): FedAvg
   and FedNova from the same initial weights, partition and minibatch seeds, final accuracy per seed, how many
   seeds FedNova matches or beats, and the mean ratio to FedAvg.
3. Round overhead: milliseconds per round for 10 clients with payloads from 10 KiB to 10 MiB, in process:
   every update goes through the Flower-named record and the wire layout (and through
   partita.runtime.wire encode/decode when that module is present). The baseline is the bare arithmetic of
   one FedAvg round (a weighted sum of 10 tensors); the ratio is the loop's cost over it. The runtime rows
   run the same rounds over 10 real worker processes on loopback (LocalCluster, CURVE): `fl-train` and
   `fl-update` through the workers' control sockets, one near-free local step each (`_fl_payload.py`).

4. Robustness (issue 13): digits, Dirichlet(0.3), ten and five clients whose local steps are spread 2-30, in
   the order of their data sizes ("correlated") or in a seeded random order ("uncorrelated"), with local
   momentum 0 and 0.9, at the default lr 0.05, 20 rounds: mean and worst final accuracy over the seeds for
   FedAvg, the paper's FedNova (`FedNova.paper()`), the bounded FedNova with the paper's normaliser A_i
   (`FedNova(work="paper")`) and partita's default FedNova (realised work), and how many runs diverged (final
   accuracy below 0.2; chance is 0.1). `--robust-clients 5` runs one block only.
5. Secure aggregation's cost: rounds over real workers (LocalCluster, one client per worker), plain against
   `--secure-aggregation`, for FedAvg and FedNova: median ms per round and bytes per round on the
   coordinator's sockets (requests + replies, heartbeats excluded), as ratios to plain.

Run: .venv/bin/python benchmarks/fl.py [--quick] [--only convergence,paired,overhead,robustness,secure].
Writes benchmarks/results/fl.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from partita.fl import (
    ClientProfile,
    ClientUpdate,
    FedAvg,
    FedNova,
    FedProx,
    FLServer,
    get_task,
    record_from_wire,
    record_to_wire,
    run_in_process,
    update_from_record,
    update_to_record,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILE = ROOT / "examples" / "clusters" / "home-edge.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "fl.json"
NUM_CLIENTS = 10
MAX_STEPS = 40
DEADLINE_S = 1.0
# Used only when the cluster file is missing: catalog-like fp32 FLOP/s of a home lab.
FALLBACK_DEVICES = [
    ("laptop", 358.4e9),
    ("jetson", 1280e9),
    ("pi-a", 13.5e9),
    ("pi-b", 13.5e9),
    ("pi-c", 30.2e9),
]

console = Console()


def cluster_devices() -> tuple[list[tuple[str, float]], str]:
    """(name, flops_per_s) per device and where they came from."""
    if CLUSTER_FILE.exists():
        from partita.cluster import ClusterSpec

        spec = ClusterSpec.from_yaml(CLUSTER_FILE)
        return [(d.name, d.flops_per_s) for d in spec.devices], str(CLUSTER_FILE.relative_to(ROOT))
    return FALLBACK_DEVICES, "built-in list (cluster file missing)"


def deadline_profiles(devices, lr: float, batch_size: int) -> tuple[dict[int, ClientProfile], list[str]]:
    """Client i runs on device i mod len(devices). The slowest device fits 2 steps in the deadline; the others
    fit proportionally more, capped at MAX_STEPS."""
    slowest = min(f for _, f in devices)
    slow_step_s = DEADLINE_S / 2.5  # the slowest device fits two full steps, not three
    profiles, names = {}, []
    for i in range(NUM_CLIENTS):
        name, flops = devices[i % len(devices)]
        step_s = slow_step_s * slowest / flops
        profiles[i] = ClientProfile(local_steps=MAX_STEPS, lr=lr, batch_size=batch_size, step_time_s=step_s)
        names.append(name)
    return profiles, names


def convergence(task_name: str, rounds: int, seeds: list[int], lr: float, options: dict, devices) -> dict:
    profiles, names = deadline_profiles(devices, lr, batch_size=32)
    strategies = {"fedavg": FedAvg, "fedprox": lambda: FedProx(0.1), "fednova": FedNova}
    out: dict = {
        "task": task_name,
        "lr": lr,
        "rounds": rounds,
        "seeds": seeds,
        "devices": names,
        "curves": {},
    }
    for label, make in strategies.items():
        accuracy = [[] for _ in range(rounds)]
        loss = [[] for _ in range(rounds)]
        steps = None
        began = time.perf_counter()
        for seed in seeds:
            task = get_task(task_name, num_clients=NUM_CLIENTS, seed=seed, **options)
            history = run_in_process(
                task, make(), rounds, profiles=profiles, deadline_s=DEADLINE_S, seed=seed
            )
            for r, record in enumerate(history.rounds):
                accuracy[r].append(record.accuracy)
                loss[r].append(record.loss)
            steps = dict(zip(record.clients, record.steps, strict=True))
        out["curves"][label] = {
            "accuracy": [statistics.fmean(a) for a in accuracy],
            "loss": [statistics.fmean(v) for v in loss],
            "final_accuracy_per_seed": [accuracy[-1][i] for i in range(len(seeds))],
            "steps_per_client": steps,
            "wall_s": time.perf_counter() - began,
        }
    return out


def print_convergence(result: dict) -> None:
    curves = result["curves"]
    rounds = result["rounds"]
    checkpoints = sorted({1, *range(5, rounds + 1, 5), rounds})
    table = Table(title=f"{result['task']}: test accuracy / loss vs round (mean of seeds {result['seeds']})")
    table.add_column("round", justify="right")
    for label in curves:
        table.add_column(f"{label} acc", justify="right")
        table.add_column(f"{label} loss", justify="right")
    for r in checkpoints:
        row = [str(r)]
        for label in curves:
            row += [f"{curves[label]['accuracy'][r - 1]:.3f}", f"{curves[label]['loss'][r - 1]:.3f}"]
        table.add_row(*row)
    base = curves["fedavg"]
    ratio = ["final / fedavg"]
    for label in curves:
        ratio += [
            f"{curves[label]['accuracy'][-1] / base['accuracy'][-1]:.2f}x",
            f"{curves[label]['loss'][-1] / base['loss'][-1]:.2f}x",
        ]
    table.add_row(*ratio, style="bold")
    console.print(table)
    steps = curves["fedavg"]["steps_per_client"]
    console.print(
        "local steps per client (device): "
        + ", ".join(
            f"{cid}:{steps.get(cid, 'dropped')} ({result['devices'][cid]})" for cid in range(NUM_CLIENTS)
        )
    )


def paired_digits(seeds: list[int], rounds: int) -> dict:
    """FedAvg and FedNova on the same seeds, every client running 2 local epochs (tau_i proportional to n_i)."""
    rows = []
    for seed in seeds:
        task = get_task("digits", num_clients=NUM_CLIENTS, seed=seed, alpha=0.3)
        profiles = {
            i: ClientProfile(local_steps=None, local_epochs=2, lr=0.05, batch_size=32) for i in range(NUM_CLIENTS)
        }
        avg = run_in_process(task, FedAvg(), rounds, profiles=profiles, seed=seed).final
        nova = run_in_process(task, FedNova(), rounds, profiles=profiles, seed=seed).final
        rows.append({"seed": seed, "fedavg": avg.accuracy, "fednova": nova.accuracy, "steps": list(avg.steps)})
    return {"task": "digits", "alpha": 0.3, "local_epochs": 2, "lr": 0.05, "batch_size": 32, "rounds": rounds,
            "rows": rows}


def print_paired(result: dict) -> None:
    table = Table(title=f"digits, Dirichlet(0.3), 2 local epochs per client: final accuracy after "
                        f"{result['rounds']} rounds, same seeds")
    for column in ("seed", "local steps (min-max)", "fedavg", "fednova", "fednova - fedavg"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["seed"]), f"{min(row['steps'])}-{max(row['steps'])}", f"{row['fedavg']:.3f}",
                      f"{row['fednova']:.3f}", f"{row['fednova'] - row['fedavg']:+.3f}")
    avg = statistics.fmean(r["fedavg"] for r in result["rows"])
    nova = statistics.fmean(r["fednova"] for r in result["rows"])
    wins = sum(r["fednova"] >= r["fedavg"] for r in result["rows"])
    table.add_row("mean", "", f"{avg:.3f}", f"{nova:.3f}", f"{nova - avg:+.3f} ({nova / avg:.3f}x)", style="bold")
    console.print(table)
    console.print(f"FedNova >= FedAvg on {wins} of {len(result['rows'])} seeds")


class EchoClient:
    """A client that 'trains' instantly: returns precomputed weights through the full record/wire layout."""

    def __init__(self, client_id: int, weights: dict[str, torch.Tensor], wire_module) -> None:
        self.client_id = client_id
        self.weights = weights
        self.wire = wire_module

    def train(self, global_weights, config):
        # The request crosses the wire too: the global weights and the config as one record.
        request_header, request_tensors = record_to_wire(
            {"arrays": global_weights, "config": config.to_dict()}
        )
        if self.wire is not None:
            message = self.wire.decode(self.wire.encode("fl-train", request_header, request_tensors))
            request_header, request_tensors = message.header, message.tensors
        record_from_wire(request_header, request_tensors)
        update = ClientUpdate(
            self.weights, num_examples=100 + self.client_id, local_steps=1 + self.client_id, lr=0.1
        )
        header, tensors = record_to_wire(update_to_record(update))
        if self.wire is not None:
            message = self.wire.decode(self.wire.encode("fl-update", header, tensors))
            header, tensors = message.header, message.tensors
        return update_from_record(record_from_wire(header, list(tensors)))

    def evaluate(self, global_weights):
        return {"loss": 0.0, "num-examples": 1.0}


def overhead(payloads_bytes: list[int], repeats: int) -> list[dict]:
    try:
        from partita.runtime import wire
    except ImportError:  # the runtime is optional here; without it the record layout alone is measured
        wire = None
    rows = []
    for nbytes in payloads_bytes:
        numel = nbytes // 4
        global_weights = {"w": torch.zeros(numel)}
        client_weights = [{"w": torch.randn(numel)} for _ in range(NUM_CLIENTS)]
        p = torch.tensor([100.0 + i for i in range(NUM_CLIENTS)], dtype=torch.float64)
        p = p / p.sum()

        def bare_round(client_weights=client_weights, p=p):
            stacked = torch.stack([c["w"].double() for c in client_weights])
            return (stacked * p[:, None]).sum(dim=0).float()

        timings = {"bare weighted sum": bare_round}
        for label, strategy in (("fedavg", FedAvg()), ("fednova", FedNova())):
            clients = [EchoClient(i, client_weights[i], wire) for i in range(NUM_CLIENTS)]
            server = FLServer(strategy, clients)
            timings[label] = lambda server=server, gw=global_weights: server.run_round(1, gw)
        row = {"payload_bytes": nbytes, "wire": wire is not None}
        for label, fn in timings.items():
            fn()  # warm-up
            samples = []
            for _ in range(repeats):
                began = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - began) * 1e3)
            row[f"{label}_ms"] = statistics.median(samples)
        rows.append(row)
    return rows


def median_round_ms(server: FLServer, weights: dict, repeats: int, label: str) -> float:
    """Median milliseconds of `repeats` rounds of `server` from `weights` (warm it up first); raises if a
    round leaves a client out, since that round measured less work."""
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        _, record = server.run_round(1, weights)
        samples.append((time.perf_counter() - began) * 1e3)
        if len(record.clients) != len(server.clients):
            raise RuntimeError(f"{label} round left clients out: {record.dropped}")
    return statistics.median(samples)


def runtime_overhead(rows: list[dict], repeats: int) -> None:
    """Add `runtime_ms` to each row: a FedAvg round over NUM_CLIENTS real workers with that payload."""
    import os

    from partita.cluster import ClusterSpec
    from partita.fl.remote import clients_of
    from partita.runtime.local import LocalCluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    devices = [{"name": f"w{i}", "compute": "10GFLOPS", "memory": "2GiB", "speed": 1.0} for i in range(NUM_CLIENTS)]
    spec = ClusterSpec.from_dict({"source": "w0", "devices": devices, "links": {"default": {"bandwidth": "10Gbit/s", "latency": "0s"}}})
    with LocalCluster(spec, host_flops=1e10) as cluster:
        for row in rows:
            options = {"num_clients": NUM_CLIENTS, "numel": row["payload_bytes"] // 4}
            clients = clients_of(cluster, task="_fl_payload:PayloadTask", task_options=options)
            profiles = {i: ClientProfile(local_steps=1, lr=0.1) for i in range(NUM_CLIENTS)}
            server = FLServer(FedAvg(), clients, profiles=profiles, evaluate=lambda w: {}, parallel=NUM_CLIENTS)
            weights = {"w": torch.zeros(options["numel"])}
            server.run_round(1, weights)  # warm-up: every worker builds the task
            row["runtime_ms"] = median_round_ms(server, weights, repeats, "runtime")
            for client in clients:
                client.close()


def print_overhead(rows: list[dict]) -> None:
    wire_note = "through runtime.wire encode/decode" if rows and rows[0]["wire"] else "record layout only"
    table = Table(
        title=f"Round overhead, {NUM_CLIENTS} clients, in process ({wire_note}) and over real workers (runtime);"
        " median ms per round"
    )
    runtime = [("runtime ms", "runtime / bare")] if rows and "runtime_ms" in rows[0] else []
    for col in ("payload", "bare sum ms", "fedavg ms", "fedavg / bare", "fednova ms", "fednova / bare", *sum(runtime, ())):
        table.add_column(col, justify="right")
    for row in rows:
        bare = row["bare weighted sum_ms"]
        table.add_row(
            _size(row["payload_bytes"]),
            f"{bare:.2f}",
            f"{row['fedavg_ms']:.2f}",
            f"{row['fedavg_ms'] / bare:.1f}x",
            f"{row['fednova_ms']:.2f}",
            f"{row['fednova_ms'] / bare:.1f}x",
            *([f"{row['runtime_ms']:.2f}", f"{row['runtime_ms'] / bare:.1f}x"] if runtime else []),
        )
    console.print(table)


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def spread_steps(sizes: list[int], low: int, high: int, correlated: bool, seed: int) -> list[int]:
    """Local steps low..high spread evenly over the clients: by data size (correlated) or in a seeded order."""
    count = len(sizes)
    steps = [round(low + (high - low) * i / (count - 1)) for i in range(count)]
    if correlated:
        order = sorted(range(count), key=lambda i: sizes[i])
    else:
        import numpy as np

        order = [int(i) for i in np.random.default_rng([seed, 99]).permutation(count)]
    out = [0] * count
    for rank, client in enumerate(order):
        out[client] = steps[rank]
    return out


ROBUST_STRATEGIES = {
    "fedavg": FedAvg,
    "fednova (paper)": FedNova.paper,
    "fednova (A_i)": lambda: FedNova(work="paper"),  # the previous default: bounded step, server momentum, A_i
    "fednova": FedNova,
}
ROBUST_CLIENTS = (10, 5)


def _robust_run(job: tuple) -> tuple:
    clients, correlated, momentum, label, seed, rounds = job
    torch.set_num_threads(1)
    task = get_task("digits", num_clients=clients, seed=seed, alpha=0.3)
    sizes = [task.client_data(i).num_examples for i in range(clients)]
    steps = spread_steps(sizes, 2, 30, correlated, seed)
    profiles = {i: ClientProfile(local_steps=s, lr=0.05, momentum=momentum) for i, s in enumerate(steps)}
    final = run_in_process(task, ROBUST_STRATEGIES[label](), rounds, profiles=profiles, seed=seed).final
    return job, final.accuracy


def robustness(seeds: list[int], rounds: int, client_counts: tuple[int, ...] = ROBUST_CLIENTS) -> dict:
    """Final accuracy per (clients, spread, momentum, strategy, seed); seeds spread over two processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (clients, correlated, momentum, label, seed, rounds)
        for clients in client_counts
        for correlated in (False, True)
        for momentum in (0.0, 0.9)
        for label in ROBUST_STRATEGIES
        for seed in seeds
    ]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        finals = list(pool.map(_robust_run, jobs))
    rows: dict[tuple, list[float]] = {}
    for (clients, correlated, momentum, label, _seed, _), accuracy in finals:
        rows.setdefault((clients, correlated, momentum, label), []).append(accuracy)
    return {
        "task": "digits", "alpha": 0.3, "steps": "2-30", "lr": 0.05, "rounds": rounds, "seeds": seeds,
        "rows": [
            {"clients": n, "correlated": c, "momentum": m, "strategy": label, "accuracy": accs}
            for (n, c, m, label), accs in rows.items()
        ],
    }


def print_robustness(result: dict) -> None:
    table = Table(
        title=f"digits, Dirichlet(0.3), local steps 2-30, lr 0.05, {result['rounds']} rounds: final accuracy over "
        f"seeds {result['seeds'][0]}-{result['seeds'][-1]}"
    )
    for column in ("clients", "steps vs data", "momentum", "strategy", "mean", "worst", "diverged (<0.2)",
                   "mean - fedavg"):
        table.add_column(column, justify="right")
    baseline = {
        (r["clients"], r["correlated"], r["momentum"]): statistics.fmean(r["accuracy"])
        for r in result["rows"] if r["strategy"] == "fedavg"
    }
    for row in result["rows"]:
        mean = statistics.fmean(row["accuracy"])
        table.add_row(
            str(row["clients"]),
            "correlated" if row["correlated"] else "uncorrelated",
            f"{row['momentum']:g}",
            row["strategy"],
            f"{mean:.3f}",
            f"{min(row['accuracy']):.3f}",
            str(sum(a < 0.2 for a in row["accuracy"])),
            f"{mean - baseline[(row['clients'], row['correlated'], row['momentum'])]:+.3f}",
        )
    console.print(table)


def secure_cost(payloads_bytes: list[int], clients_count: int, repeats: int) -> list[dict]:
    """ms and coordinator bytes per round, plain and secure, over `clients_count` real workers."""
    import os

    from partita.cluster import ClusterSpec
    from partita.fl.remote import clients_of
    from partita.fl.secagg.round import SecureAggregation
    from partita.runtime.local import LocalCluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    devices = [{"name": f"w{i}", "compute": "10GFLOPS", "memory": "2GiB", "speed": 1.0} for i in range(clients_count)]
    spec = ClusterSpec.from_dict({"source": "w0", "devices": devices, "links": {"default": {"bandwidth": "10Gbit/s", "latency": "0s"}}})
    rows = []
    with LocalCluster(spec, host_flops=1e10) as cluster:
        for nbytes in payloads_bytes:
            options = {"num_clients": clients_count, "numel": nbytes // 4}
            for strategy in (FedAvg, FedNova):
                row = {"payload_bytes": nbytes, "clients": clients_count, "strategy": strategy.name}
                for mode in ("plain", "secure"):
                    clients = clients_of(cluster, task="_fl_payload:PayloadTask", task_options=options)
                    profiles = {i: ClientProfile(local_steps=1 + i, lr=0.1) for i in range(clients_count)}
                    server = FLServer(
                        strategy(), clients, profiles=profiles, evaluate=lambda w: {}, parallel=clients_count,
                        secure=SecureAggregation() if mode == "secure" else None,
                    )
                    weights = {"w": torch.zeros(options["numel"])}
                    server.run_round(1, weights)  # warm-up: every worker builds the task
                    before = sum(c.bytes_sent + c.bytes_received for c in clients)
                    row[f"{mode}_ms"] = median_round_ms(server, weights, repeats, mode)
                    row[f"{mode}_bytes"] = (sum(c.bytes_sent + c.bytes_received for c in clients) - before) / repeats
                    for client in clients:
                        client.close()
                rows.append(row)
    return rows


def print_secure_cost(rows: list[dict]) -> None:
    table = Table(title="Secure aggregation against plain, over real workers: median ms and coordinator bytes per round")
    for column in ("payload", "clients", "strategy", "plain ms", "secure ms", "time x", "plain bytes",
                   "secure bytes", "bytes x"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            _size(row["payload_bytes"]), str(row["clients"]), row["strategy"],
            f"{row['plain_ms']:.1f}", f"{row['secure_ms']:.1f}", f"{row['secure_ms'] / row['plain_ms']:.2f}x",
            _size(int(row["plain_bytes"])), _size(int(row["secure_bytes"])),
            f"{row['secure_bytes'] / row['plain_bytes']:.2f}x",
        )
    console.print(table)
    from partita.fl.secagg.masking import FRACTION_BITS

    console.print(
        f"fixed-point ring Z_2^64 with {FRACTION_BITS} fractional bits: each client's scaled update is rounded to "
        f"2^-{FRACTION_BITS}, so a sum over n clients is within n * 2^-{FRACTION_BITS + 1} of the float64 sum"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and seeds (a smoke run)")
    parser.add_argument(
        "--only", default="convergence,paired,overhead,robustness,secure", help="comma-separated parts to run"
    )
    parser.add_argument(
        "--robust-clients", default="10,5", help="client counts of the robustness table (comma-separated)"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    torch.set_num_threads(1)  # tiny models: intra-op threads only add contention on a shared machine
    devices, device_source = cluster_devices()
    console.print(
        f"devices from {device_source}: " + ", ".join(f"{n} {f / 1e9:g} GFLOP/s" for n, f in devices)
    )
    seeds = [0] if args.quick else [0, 1, 2]
    results = {
        "devices_source": device_source,
        "deadline_s": DEADLINE_S,
        "max_steps": MAX_STEPS,
        "convergence": [],
    }
    settings = [
        ("synthetic", 10 if args.quick else 40, 0.02, {"alpha": 1.0, "beta": 1.0}),
        ("digits", 8 if args.quick else 30, 0.05, {"alpha": 0.3}),
    ]
    for task_name, rounds, lr, options in settings if "convergence" in parts else ():
        result = convergence(task_name, rounds, seeds, lr, options, devices)
        print_convergence(result)
        results["convergence"].append(result)
    if "paired" in parts:
        paired = paired_digits(list(range(4 if args.quick else 20)), rounds=20)
        print_paired(paired)
        results["paired_digits"] = paired
    if "overhead" in parts:
        payloads = [10 * 2**10, 100 * 2**10, 2**20, 10 * 2**20]
        rows = overhead(payloads, repeats=3 if args.quick else 10)
        runtime_overhead(rows, repeats=3 if args.quick else 10)
        print_overhead(rows)
        results["overhead"] = rows
    if "robustness" in parts:
        counts = tuple(int(n) for n in args.robust_clients.split(","))
        robust = robustness(list(range(2 if args.quick else 8)), rounds=20, client_counts=counts)
        print_robustness(robust)
        results["robustness"] = robust
    if "secure" in parts:
        cost = secure_cost([10 * 2**10, 2**20, 4 * 2**20], clients_count=5, repeats=3 if args.quick else 5)
        print_secure_cost(cost)
        results["secure_cost"] = cost
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
