"""`partita keys`: make the CURVE certificate files that workers and coordinators authenticate with."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="keys",
    help="Create ZeroMQ CURVE key pairs (NAME.key is public, NAME.key_secret stays on its machine).",
    no_args_is_help=True,
)


@app.callback()
def keys() -> None:
    """Create ZeroMQ CURVE key pairs for workers and coordinators."""


@app.command("new")
def new(
    dir: Path = typer.Argument(..., help="Directory to write the key files into (created if missing)."),
    name: str = typer.Argument(..., help="Key name, e.g. 'coordinator' or the worker's device name."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing pair of that name."),
) -> None:
    """Write DIR/NAME.key (share it) and DIR/NAME.key_secret (keep it private, mode 0600)."""
    from partita.runtime.keys import new_keypair

    public, secret = new_keypair(dir, name, overwrite=overwrite)
    typer.echo(f"public key: {public}")
    typer.echo(f"secret key: {secret}")
