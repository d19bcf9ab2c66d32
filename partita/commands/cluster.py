"""`partita cluster probe CLUSTER.yaml --out MEASURED.yaml`: measure real devices and links into a cluster file.

The measured file is a normal cluster file (`partita plan --cluster MEASURED.yaml`, `partita
simulate`), with every measured figure marked `basis: measured` and its spread, so that plans of
real hardware repeat offline. Exit code 0 when every figure's repeats agreed within ±10%, 1 when
one did not (the file is written either way; the unstable figures are named).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(name="cluster", help="Measure a cluster of real devices.", no_args_is_help=True)


@app.callback()
def cluster() -> None:
    """Measure a cluster of real devices."""


@app.command("probe")
def probe(
    cluster_file: Annotated[Path, typer.Argument(metavar="CLUSTER", help="Cluster file (YAML); devices by address.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the measured cluster file (YAML).")],
    secret_key: Annotated[
        Path | None, typer.Option("--secret-key", help="The coordinator's NAME.key_secret.")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Talk to --insecure workers (no encryption).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was measured as JSON.")] = False,
) -> None:
    """Measure every device with an address (compute, memory) and every link to it, both ways, into OUT."""
    from rich.console import Console

    from partita.runtime import keys
    from partita.runtime.probe import probe_cluster

    if insecure:
        keys.insecure_already_reported()
    console = Console(stderr=True)
    with _LinkProgress(console, enabled=not as_json) as progress:
        result = probe_cluster(cluster_file, secret_key=secret_key, insecure=insecure, on_link=progress.update,
                               on_device=progress.device)
    measured = _relative_keys(result.cluster, cluster_file, out)
    measured.to_yaml(out)
    unstable = result.unstable
    if as_json:
        typer.echo(json.dumps(probe_json(result, measured, out, unstable), indent=2, default=str))
    else:
        _print(Console(), result, out, unstable)
    if unstable:
        raise typer.Exit(1)


class _LinkProgress:
    """A rich progress bar over the links, on stderr (quiet under --json)."""

    def __init__(self, console: Any, *, enabled: bool) -> None:
        self.console, self.enabled = console, enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _LinkProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} links"),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("saying hello", total=None)
        return self

    def device(self, name: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"measuring {name}'s compute")

    def update(self, pair: tuple[str, str], link: Any) -> None:
        if self._bar is None:
            return
        if link is None:
            self._bar.update(self._task, description=f"probing {pair[0]} ⇄ {pair[1]}")
        else:
            self._bar.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _relative_keys(spec: Any, origin: Path, out: Path) -> Any:
    """Public key paths relative to the cluster file, rewritten relative to OUT (so OUT finds them too)."""
    for device in spec.devices:
        key = device.public_key
        if key and not Path(key).is_absolute():
            moved = os.path.relpath(origin.parent / key, out.parent)
            spec = spec.replace_device(device.name, public_key=moved)
    return spec


def _link_rows(result: Any) -> list[dict[str, Any]]:
    rows = []
    for (prober, probed), link in result.links.items():
        a, _ = sorted((prober, probed))
        m = link.measured
        forward, backward = (m["bandwidth_a_to_b"], m["bandwidth_b_to_a"]) if a == prober else \
            (m["bandwidth_b_to_a"], m["bandwidth_a_to_b"])
        rows.append({"from": prober, "to": probed, "bandwidth_bytes_per_s": forward,
                     "bandwidth_back_bytes_per_s": backward, "rtt_s": m["rtt_s"],
                     "bandwidth_spread": m["bandwidth_spread"], "latency_spread": m["latency_spread"],
                     "samples": m["samples"], "stable": m["stable"],
                     # planned with each direction's figure (they differ past a probe's noise), or the slower both ways
                     "planned_each_way": link.directions is not None})
    return rows


def probe_json(result: Any, measured: Any, out: Path, unstable: list[str]) -> dict[str, Any]:
    """What `--json` prints: each device's figures with basis and spread, each link both ways, what was unstable."""
    devices = {}
    for d in measured.devices:
        info = result.device_info.get(d.name, {})
        devices[d.name] = {
            "flops_per_s": d.flops_per_s, "memory_bytes": d.memory_bytes,
            "basis": {label: d.basis_of(label) for label in ("flops_per_s", "memory_bytes")},
            "spread": dict(d.spread),
            **{k: info[k] for k in ("device", "device_name", "dtype", "threads", "version") if k in info},
        }
    return {"out": str(out), "devices": devices, "links": _link_rows(result), "stable": not unstable,
            "unstable": unstable}


def _print(console: Any, result: Any, out: Path, unstable: list[str]) -> None:
    from rich.table import Table

    from partita.units import format_quantity

    devices = Table(title="devices")
    for column in ("device", "compute", "memory", "runs on", "basis"):
        devices.add_column(column)
    for d in result.cluster.devices:
        spread = d.spread.get("flops_per_s")
        compute = (f"{format_quantity(d.flops_per_s, 'FLOP/s')}" + (f" ±{spread:.0%}" if spread is not None else "")
                   if d.flops_per_s else "?")
        memory = format_quantity(d.memory_bytes, "B", binary=True) if d.memory_bytes else "?"
        info = result.device_info.get(d.name, {})
        runs_on = f"{info.get('device_name', 'emulated')} {info.get('dtype', '')} ×{info.get('threads', '?')}" \
            if info else "emulated (partita run)"
        basis = ", ".join(f"{label.split('_')[0]} {d.basis_of(label)}" for label in ("flops_per_s", "memory_bytes"))
        devices.add_row(d.name, compute, memory, runs_on, basis)
    console.print(devices)
    links = Table(title="links (measured both ways)")
    for column in ("from", "to", "Mbit/s →", "Mbit/s ←", "RTT ms", "spread", "repeats", "stable", "planned"):
        links.add_column(column, justify="left" if column in ("from", "to") else "right")
    for row in _link_rows(result):
        links.add_row(row["from"], row["to"], f"{row['bandwidth_bytes_per_s'] * 8 / 1e6:.1f}",
                      f"{row['bandwidth_back_bytes_per_s'] * 8 / 1e6:.1f}", f"{row['rtt_s'] * 1e3:.2f}",
                      f"±{row['bandwidth_spread']:.0%}", str(row["samples"]),
                      "yes" if row["stable"] else "[yellow]no[/]",
                      "each way" if row["planned_each_way"] else "slower, both ways")
    console.print(links)
    if unstable:
        console.print(f"[yellow]not stable within ±10%:[/] {'; '.join(unstable)}", highlight=False)
    console.print(f"measured cluster written to {out}", highlight=False)
