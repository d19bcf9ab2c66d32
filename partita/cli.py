"""The `partita` command line (face layer).

Commands live one per module in `partita/commands/`; this file registers them and turns any
`PartitaError` into one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

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


_debug = {"on": False}  # set by --debug; read by main() when a command fails
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def partita_version() -> str:
    """The installed package's version (the source tree's when run uninstalled)."""
    try:
        return version("partita")
    except PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        print(f"partita {partita_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="On an error, also print the traceback (of your own model code too).")
    ] = False,
) -> None:
    """Run PyTorch inference across heterogeneous devices: measure, split exactly, plan, stream, recover."""
    _debug["on"] = debug


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
    from partita.commands import cluster as cluster_cmd

    app.add_typer(cluster_cmd.app, name="cluster")
    from partita.commands import status as status_cmd

    app.command("status")(status_cmd.status)
    from partita.commands import fl as fl_cmd

    app.command("fl")(fl_cmd.fl)
    from partita.commands import serve as serve_cmd

    app.command("serve")(serve_cmd.serve)
    from partita.commands import generate as generate_cmd

    app.command("generate")(generate_cmd.generate)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    typer's standalone mode already turns usage errors, Ctrl-C and exits into messages and exit
    codes; a `PartitaError` escaping a command becomes one line on stderr and exit code 2.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    swallowed = _switch_given_a_value(args)
    if swallowed:
        Console(stderr=True).print(f"[bold red]error:[/] {swallowed}", highlight=False, soft_wrap=True)
        sys.exit(2)
    try:
        app(args=args)
    except PartitaError as exc:
        if _debug["on"]:
            traceback.print_exception(exc)
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _switch_given_a_value(args: list[str]) -> str | None:
    """The message for a switch followed by a word like `true` (`--json true`), or None.

    click would take that word as the next positional argument (the model, say) and then fail on
    something else entirely, so the mistake is named here, before parsing.
    """
    # typer vendors its own click, so commands and options are recognised by their attributes.
    command = typer.main.get_command(app)
    for i, arg in enumerate(args):
        subcommands = getattr(command, "commands", {})
        if arg in subcommands:
            command = subcommands[arg]
            continue
        flags = {o: p for p in command.params if getattr(p, "is_flag", False) for o in p.opts}
        if arg in flags and i + 1 < len(args) and args[i + 1].lower() in _BOOLEAN_WORDS:
            return (
                f"{arg} is a switch and takes no value, so {args[i + 1]!r} would be read as an argument: "
                f"write {arg} alone to turn it on" + (f" or {flags[arg].secondary_opts[0]} to turn it off"
                                                      if flags[arg].secondary_opts else " and leave it out to turn it off")
            )
    return None


if __name__ == "__main__":
    main()
