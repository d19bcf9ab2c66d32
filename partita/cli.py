"""The `partita` command line (face layer).

Commands live one per module in `partita/commands/`; this file registers them and turns any
`PartitaError` into one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from partita.errors import PartitaError

app = typer.Typer(
    name="partita",
    help="Run PyTorch inference across heterogeneous devices: measure, split exactly, plan, stream, recover.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    """Attach every command module's command to the app (modules are cheap to import)."""
    from partita.commands import inspect as inspect_cmd

    app.command("inspect")(inspect_cmd.inspect)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, mapping partita errors to one line and exit 2."""
    err = Console(stderr=True)
    try:
        app(args=argv, standalone_mode=False)
    except PartitaError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
