"""`partita status CLUSTER.yaml`: each device up or down, what it reports and what it holds.

It deploys nothing: it says hello to the worker of every device that has an address and prints
the answers. Exit code 0 when every such worker answered, 1 when one did not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def status(
    cluster: Annotated[Path, typer.Argument(help="Cluster file (YAML).")],
    secret_key: Annotated[
        Path | None, typer.Option("--secret-key", help="The coordinator's NAME.key_secret (for workers with addresses).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Talk to --insecure workers (no encryption).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each worker.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show each device of CLUSTER: up or down, its device, memory, threads, version and stages held."""
    from rich.console import Console

    from partita.runtime import keys
    from partita.runtime.connect import worker_status

    if insecure:
        keys.insecure_already_reported()  # asked for explicitly; the table's `secure` column says so
    devices = worker_status(cluster, secret_key=secret_key, insecure=insecure, timeout_s=timeout)
    if as_json:
        typer.echo(json.dumps(devices, indent=2, default=str))
    else:
        print_status(Console(), cluster, devices)
    if any(d["state"] == "down" for d in devices.values()):
        raise typer.Exit(1)


def print_status(console: Any, cluster: Path, devices: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    from partita.units import format_quantity

    table = Table(title=f"{cluster.name}: {sum(d['state'] == 'up' for d in devices.values())} of "
                        f"{sum(d['state'] != 'emulated' for d in devices.values())} workers up")
    for column in ("device", "state", "address", "runs on", "threads", "memory used", "stages", "partita", "secure"):
        table.add_column(column, no_wrap=column in ("device", "state", "address"))
    for name, d in devices.items():
        if d["state"] == "down":
            table.add_row(name, "[red]down[/]", d["address"], "", "", "", "", "", "")
            continue
        if d["state"] == "emulated":
            table.add_row(name, "emulated", "—", "this machine (partita run)", "", "", "", "", "")
            continue
        used, total = float(d.get("used_bytes") or 0), float(d.get("memory_bytes") or 0)
        memory = f"{format_quantity(used, 'B', binary=True)} of {format_quantity(total, 'B', binary=True)}"
        stages = ", ".join(str(s) for s in d.get("stages", [])) or "none"
        runs_on = " ".join(str(v) for v in (d.get("device_name", d.get("device", "?")), d.get("dtype")) if v)
        table.add_row(name, "[green]up[/]", d["address"], runs_on,
                      str(d.get("threads", "?")), memory, stages, str(d.get("version", "?")),
                      "yes" if d.get("secure") else "[yellow]no[/]")
    console.print(table)
    for name, d in devices.items():
        if d["state"] == "down":
            console.print(f"[red]{name}[/]: {d['error']}", highlight=False)
