"""`partita worker`: run a long-lived worker that executes the stages a coordinator deploys to it."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def worker(
    listen: str = typer.Option(..., "--listen", help="Control address to bind, e.g. tcp://0.0.0.0:5555 (port 0: any free port)."),
    name: str = typer.Option(..., "--name", help="This device's name, as in the cluster file."),
    secret_key: Path | None = typer.Option(None, "--secret-key", help="This worker's NAME.key_secret file."),
    authorized_keys: Path | None = typer.Option(
        None, "--authorized-keys", help="Coordinator public key file, or a directory of *.key files, allowed to control this worker."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="No encryption and no authentication (trusted networks only)."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu, cuda or mps."),
    emulate: str | None = typer.Option(
        None, "--emulate", help="Emulate a slower device: a catalog type (e.g. raspberry-pi-4) or a speed factor vs this host."
    ),
    memory: str | None = typer.Option(None, "--memory", help="Memory for stages, bytes or e.g. 4GiB (default: what is free)."),
    dilation: float = typer.Option(1.0, "--dilation", hidden=True, help="Time dilation of the emulated world."),
    threads: int | None = typer.Option(None, "--threads", hidden=True, help="torch threads (default: torch's)."),
    ready_file: Path | None = typer.Option(None, "--ready-file", hidden=True, help="Write bound endpoints here as JSON."),
    max_frame_bytes: int | None = typer.Option(None, "--max-frame-bytes", help="Refuse tensor frames larger than this."),
    max_tensors: int | None = typer.Option(None, "--max-tensors", help="Refuse messages with more tensors than this (default 256)."),
    max_in_flight: int = typer.Option(
        256, "--max-in-flight", min=1, help="Refuse activations beyond this many queued or running at once."
    ),
) -> None:
    """Serve stages for a coordinator until Ctrl-C or SIGTERM (which first drain the requests in flight)."""
    import sys

    from partita.errors import AuthError
    from partita.units import parse_memory

    if insecure and (secret_key or authorized_keys):
        raise AuthError("--insecure cannot be combined with --secret-key/--authorized-keys; choose one")
    if not insecure and not (secret_key and authorized_keys):
        raise AuthError(
            "a worker needs --secret-key FILE and --authorized-keys FILE_OR_DIR (make them with `partita keys new`), "
            "or an explicit --insecure"
        )
    from partita.runtime.handle import Keypair
    from partita.runtime.keys import load_public_keys, load_secret
    from partita.runtime.wire import Limits
    from partita.runtime.worker import WorkerConfig, run_worker

    keys = None if insecure or secret_key is None else Keypair(*load_secret(secret_key))
    authorized = () if insecure or authorized_keys is None else tuple(load_public_keys(authorized_keys))
    if insecure:
        print(f"WARNING: worker {name} runs --insecure: no encryption, anyone who reaches {listen} can use it",
              file=sys.stderr, flush=True)
    speed, memory_bytes = _emulation(emulate, threads)
    if memory is not None:
        try:
            memory_bytes = parse_memory(memory)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--memory") from None
    sizes = {"max_frame_bytes": max_frame_bytes, "max_tensors": max_tensors}
    limits = Limits(**{k: v for k, v in sizes.items() if v is not None})
    run_worker(WorkerConfig(
        name=name, listen=listen, keys=keys, authorized=authorized, device=device, speed=speed, dilation=dilation,
        memory_bytes=memory_bytes, limits=limits, ready_file=str(ready_file) if ready_file else None, threads=threads,
        max_in_flight=max_in_flight, jobs=_jobs(),
    ))
    # Drained, sockets and context closed. The interpreter's exit would now walk torch's object
    # graph once more (seconds on a loaded host, which every Ctrl-C and cluster close waits for).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _jobs() -> dict:
    """The long jobs this worker serves besides stages: federated training (`fl-train`, see docs/fl.md).

    Composed here, in the face layer, because the runtime must not import partita.fl.
    """
    from partita.fl.serve import JOBS

    return dict(JOBS)


def _emulate_error(value: str) -> typer.BadParameter:
    return typer.BadParameter(f"{value!r} is neither a speed factor (> 0) nor a catalog device type", param_hint="--emulate")


def _emulation(value: str | None, threads: int | None) -> tuple[float | None, float | None]:
    """(speed vs this host, memory bytes) for --emulate: a number, or a catalog type (its memory too)."""
    if value is None:
        return None, None
    try:
        speed = float(value)
    except ValueError:
        speed = None
    if speed is not None:
        if not speed > 0:
            raise _emulate_error(value)
        return speed, None
    from partita.cluster import CATALOG
    from partita.runtime.local import host_flops_per_s

    kind = CATALOG.get(value)
    if kind is None:
        raise _emulate_error(value)
    return kind.flops_per_s / host_flops_per_s(threads or 1), kind.memory_bytes


def main(argv: list[str] | None = None) -> None:
    """Run only this command (`python -m partita.commands.worker ...`): how LocalCluster starts workers.

    It skips loading every other command, so an emulated worker starts faster.
    """
    import sys

    from partita.errors import PartitaError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(worker)
    try:
        app(args=argv, standalone_mode=True)
    except PartitaError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
