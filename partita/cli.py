"""The `partita` command line (face layer).

Commands live one per module in `partita/commands/`; this file registers them and turns any
`PartitaError` into one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys

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
    from partita.commands import keys as keys_cmd

    app.add_typer(keys_cmd.app, name="keys")
    from partita.commands import worker as worker_cmd

    app.command("worker")(worker_cmd.worker)
    from partita.commands import run as run_cmd

    app.command("run")(run_cmd.run)
    from partita.commands import demo as demo_cmd

    app.command("demo")(demo_cmd.demo)
    from partita.commands import plan as plan_cmd

    app.command("plan")(plan_cmd.plan)
    from partita.commands import simulate as simulate_cmd

    app.command("simulate")(simulate_cmd.simulate)
    from partita.commands import fl as fl_cmd

    app.command("fl")(fl_cmd.fl)
    from partita.commands import serve as serve_cmd

    app.command("serve")(serve_cmd.serve)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    typer's standalone mode already turns usage errors, Ctrl-C and exits into messages and exit
    codes; a `PartitaError` escaping a command becomes one line on stderr and exit code 2.
    """
    try:
        app(args=argv)
    except PartitaError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
