"""`partita fl`: federated training over a cluster's workers, one client per device.

Each device of the cluster file is one client (client i = the i-th device; the task is partitioned over
that many clients). Devices with an `address` are real workers (`partita worker`), the others are emulated
here in a LocalCluster at their speeds, like `partita run`. Each worker builds its own client's data from the
task; only weights and metrics cross the wire. The coordinator evaluates every round's global weights on the
task's held-out test set, and saves the final weights as safetensors (keys = the model's state_dict names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from partita.commands.interrupt import Stopping, exit_interrupted, interruptible
from partita.errors import FLError

STRATEGY_NAMES = ("fedavg", "fedprox", "fednova")
DEFAULT_LR = {"quadratic": 0.1, "synthetic": 0.02, "digits": 0.05}
# Model references that load a built-in task's trained weights (see docs/fl.md, "Training over the runtime").
MODEL_REFS = {"digits": "partita.fl.tasks.digits:SmallCNN"}


def parse_local_steps(text: str) -> tuple[int, int]:
    """'N' -> (N, N); 'A-B' -> (A, B) with 1 <= A <= B; FLError otherwise."""
    low, sep, high = text.strip().partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise FLError(f"--local-steps must be N or A-B (positive integers, A <= B), got {text!r}.") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise FLError(f"--local-steps must be N or A-B (positive integers, A <= B), got {text!r}.")
    return bounds


def spread_steps(bounds: tuple[int, int], clients: int) -> list[int]:
    """Local steps per client, spread evenly from A (client 0) to B (the last client)."""
    low, high = bounds
    if clients == 1:
        return [high]
    return [round(low + (high - low) * i / (clients - 1)) for i in range(clients)]


def strategy_names(text: str) -> list[str]:
    if text == "all":
        return list(STRATEGY_NAMES)
    if text not in STRATEGY_NAMES:
        raise FLError(f"Unknown strategy {text!r}; choose one of {', '.join(STRATEGY_NAMES)} or all.")
    return [text]


def weights_path(out: Path | None, task: str, strategy: str, several: bool) -> Path:
    """Where a strategy's final weights go: --out (with -STRATEGY before the suffix when several ran)."""
    if out is None:
        return Path(f"partita-fl-{task.rsplit(':', 1)[-1].rsplit('.', 1)[-1].lower()}-{strategy}.safetensors")
    return out.with_name(f"{out.stem}-{strategy}{out.suffix}") if several else out


def fl(
    task: Annotated[
        str, typer.Option("--task", help="quadratic, synthetic, digits, or package.module:Task.")
    ],
    cluster: Annotated[Path, typer.Option("--cluster", help="Cluster file (YAML): one client per device.")],
    strategy: Annotated[str, typer.Option("--strategy", help="fedavg, fedprox, fednova or all.")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")],
    deadline: Annotated[
        float | None, typer.Option("--deadline", help="Emulated seconds each client may compute per round.")
    ] = None,
    local_steps: Annotated[
        str, typer.Option("--local-steps", help="Local steps per round: N, or A-B spread over the clients.")
    ] = "10",
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="Task's alpha (digits: Dirichlet non-IID).")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the model, the partition and minibatches.")
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the rounds and final figures as JSON.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Save loss/accuracy against rounds as a PNG.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Final weights (.safetensors); default partita-fl-TASK-STRATEGY."),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Local learning rate (default: per task).")] = None,
    mu: Annotated[float, typer.Option("--mu", help="FedProx proximal mu.")] = 0.1,
    secret_key: Annotated[
        Path | None,
        typer.Option("--secret-key", help="The coordinator's NAME.key_secret (for workers with addresses)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Talk to --insecure workers (no encryption).")
    ] = False,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="Pairwise-masked aggregation: the coordinator learns only the weighted sum of the updates.",
        ),
    ] = False,
) -> None:
    """Train TASK federatedly on the cluster's devices and save the final weights."""
    from rich.console import Console

    from partita.cluster import ClusterSpec
    from partita.fl import ClientProfile, get_task

    console = Console(stderr=as_json)
    names = strategy_names(strategy)
    bounds = parse_local_steps(local_steps)
    if deadline is not None and not deadline > 0:
        raise FLError(f"--deadline must be > 0 seconds, got {deadline!r}.")
    if out is not None and out.suffix != ".safetensors":
        raise FLError(f"--out must name a .safetensors file, got {str(out)!r}.")
    spec = ClusterSpec.from_yaml(cluster)
    options: dict[str, Any] = {"num_clients": len(spec.devices), "seed": seed}
    if alpha is not None:
        options["alpha"] = alpha
    fl_task = get_task(task, **options)  # here: the initial weights and the held-out test set
    rate = lr if lr is not None else DEFAULT_LR.get(task, 0.05)
    steps = spread_steps(bounds, len(spec.devices))
    profiles = {i: ClientProfile(local_steps=s, lr=rate) for i, s in enumerate(steps)}
    console.print(
        f"{task}: {len(spec.devices)} clients on {', '.join(spec.names)}; local steps {steps}; lr {rate:g}"
        + (f"; deadline {deadline:g} s" if deadline is not None else "")
        + ("; secure aggregation" if secure_aggregation else "")
    )
    run = FLRun(
        task=task, fl_task=fl_task, options=options, cluster=cluster, strategies=tuple(names), rounds=rounds,
        deadline=deadline, profiles=profiles, mu=mu, seed=seed, secret_key=secret_key, insecure=insecure,
        secure_aggregation=secure_aggregation,
    )
    try:
        histories = _train(run, console)
    except KeyboardInterrupt:  # Ctrl-C: _train said what it stops and stopped it (partita.commands.interrupt)
        console.print("[yellow]stopped[/]")
        exit_interrupted()
    result = _result(task, fl_task, histories)
    for name, history in histories.items():
        path = weights_path(out, task, name, several=len(names) > 1)
        _save(history.weights, path)
        result.setdefault("weights", {})[name] = str(path)
    if plot is not None:
        _plot(result, plot)
    if as_json:
        print(json.dumps(result))
    else:
        _print_table(result, console)
        for name, path in result["weights"].items():
            ref = MODEL_REFS.get(task)
            hint = f"  (serve: '{ref}?weights={path}')" if ref else ""
            console.print(f"{name}: final weights in {path}{hint}")


@dataclass(frozen=True)
class FLRun:
    """What one `partita fl` invocation trains: the task, where, which strategies, and each client's profile."""

    task: str  # the name or reference given on the command line (workers build their client from it)
    fl_task: Any  # the coordinator's instance: initial weights and the held-out test set
    options: dict[str, Any]  # task options every worker uses (num_clients, seed, alpha)
    cluster: Path
    strategies: tuple[str, ...]
    rounds: int
    deadline: float | None
    profiles: dict[int, Any]  # client id -> ClientProfile
    mu: float
    seed: int
    secret_key: Path | None
    insecure: bool
    secure_aggregation: bool = False  # the coordinator sees only the masked sum (partita.fl.secagg)


def _train(run: FLRun, console) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from partita.fl import STRATEGIES, FedProx, FLServer, task_evaluator
    from partita.fl.remote import clients_of
    from partita.fl.update import weights_of
    from partita.runtime.connect import open_cluster

    secure = None
    if run.secure_aggregation:  # needs the optional `cryptography` (an FLError saying so without it)
        from partita.fl.secagg.round import SecureAggregation

        secure = SecureAggregation()
    histories = {}
    evaluate = task_evaluator(run.fl_task)
    initial = weights_of(run.fl_task.model())
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    stopping = Stopping()
    with (
        interruptible(stopping, say=lambda line: console.print(f"[yellow]{line}[/]", highlight=False)),
        open_cluster(run.cluster, secret_key=run.secret_key, insecure=run.insecure) as handle,
        Progress(*columns, console=console, transient=False) as progress,
    ):
        stopping.cluster = handle
        for name in run.strategies:
            strategy = FedProx(run.mu) if name == "fedprox" else STRATEGIES[name]()
            bar = progress.add_task(name, total=run.rounds, status="")
            clients = clients_of(handle, task=run.task, task_options=run.options)
            try:
                server = FLServer(
                    strategy,
                    clients,
                    profiles=run.profiles,
                    evaluate=evaluate,
                    deadline_s=run.deadline,
                    parallel=len(clients),
                    seed=run.seed,
                    secure=secure,
                )
                histories[name] = _rounds(
                    server, initial, run.rounds, lambda r, b=bar: progress.update(b, advance=1, status=_status(r))
                )
            finally:
                for client in clients:
                    client.close()
    return histories


def _rounds(server, initial, rounds: int, on_round):
    """FLServer's loop, leaving lost clients out of later rounds; FLError when a round has no client left."""
    from partita.fl import History
    from partita.fl.update import clone_weights

    weights, records = clone_weights(initial), []
    for number in range(1, rounds + 1):
        weights, record = server.run_round(number, weights)
        records.append(record)
        on_round(record)
        lost = {cid for cid, why in record.dropped.items() if why.startswith("lost")}
        server.clients = [c for c in server.clients if c.client_id not in lost]
        if not record.clients:
            reasons = "; ".join(f"client {cid}: {why}" for cid, why in record.dropped.items())
            raise FLError(
                f"{server.strategy.name} round {number}: no client answered ({reasons}); "
                "check the workers, or give a longer --deadline"
            )
        if not server.clients:
            raise FLError(f"{server.strategy.name}: no clients left after round {number} (all workers lost).")
    return History(tuple(records), weights)


def _status(record) -> str:
    parts = [f"loss {record.loss:.4f}" if record.loss is not None else ""]
    if record.accuracy is not None:
        parts.append(f"acc {record.accuracy:.3f}")
    parts.append(f"clients {len(record.clients)} steps {list(record.steps)}")
    if record.dropped:
        parts.append(f"left out {sorted(record.dropped)}")
    return "  ".join(p for p in parts if p)


def _result(task: str, fl_task, histories: dict) -> dict:
    rounds, final = [], {}
    for name, history in histories.items():
        rounds += [
            {
                k: r.to_dict()[k]
                for k in ("round", "strategy", "loss", "accuracy", "clients", "steps", "dropped")
            }
            for r in history.rounds
        ]
        last = history.final.to_dict()
        final[name] = {"loss": last["loss"], "accuracy": last["accuracy"]}
        if "distance_to_optimum" in last:
            final[name]["distance_to_optimum"] = last["distance_to_optimum"]
    return {"task": task, "rounds": rounds, "final": final}


def _save(weights, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path))


def _print_table(result: dict, console) -> None:
    from rich.table import Table

    names = list(result["final"])
    table = Table(title=f"partita fl {result['task']}: global loss / accuracy per round")
    table.add_column("round", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    by_round: dict[int, dict[str, dict]] = {}
    for row in result["rounds"]:
        by_round.setdefault(row["round"], {})[row["strategy"]] = row
    for number, rows in sorted(by_round.items()):
        table.add_row(str(number), *(_cell(rows.get(n)) for n in names))
    console.print(table)


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
    acc = "" if row["accuracy"] is None else f" / {row['accuracy']:.3f}"
    left = f" ({len(row['dropped'])} out)" if row["dropped"] else ""
    return loss + acc + left


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_accuracy = any(r["accuracy"] is not None for r in result["rounds"])
    fig, axes = plt.subplots(
        1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5, 4), squeeze=False
    )
    for name in result["final"]:
        rows = [r for r in result["rounds"] if r["strategy"] == name]
        axes[0][0].plot([r["round"] for r in rows], [r["loss"] for r in rows], label=name)
        if has_accuracy:
            axes[0][1].plot([r["round"] for r in rows], [r["accuracy"] for r in rows], label=name)
    axes[0][0].set(xlabel="round", ylabel="global loss", title=result["task"])
    axes[0][0].legend()
    if has_accuracy:
        axes[0][1].set(xlabel="round", ylabel="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
