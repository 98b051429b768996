"""The typer app of the `attnc` command, its consoles and state, and the global flags
(`--debug`, `--verbose`, `--version`); the commands register on `app` in cli/main.py and
cli/info_commands.py."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from attnc.cli.logs import route_library_logs, setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="attnc: an attention compiler for PyTorch models.",
)
err = Console(stderr=True)
out = Console()
STATE = {"debug": False}
GLOBAL_FLAGS = ("--debug", "--verbose", "-v")


def _print_version(value: bool) -> None:
    if value:
        from attnc import __version__

        print(f"attnc {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and debug logs (anywhere on the line).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress (anywhere on the line).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print attnc's version and exit.",
        ),
    ] = False,
) -> None:
    STATE["debug"] = debug
    setup_logging(verbose, debug)
    if not ctx.resilient_parsing and not {"--help", "-h"} & set(ctx.args):
        route_library_logs(debug)  # a command is about to run, and it imports torch anyway

