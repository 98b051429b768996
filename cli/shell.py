"""How the `attnc` command ends: the one error line, the interrupted line and its exit code, the
signal handlers, `--debug`/`--verbose` anywhere on the line, and the usage-error classes of
whichever click typer runs on."""

from __future__ import annotations

import contextlib
import signal
import sys

import typer
import typer.main

from attnc.cli.app import GLOBAL_FLAGS, STATE, app
from attnc.errors import Interrupted


def click_errors() -> tuple[type[BaseException], ...]:
    """The usage-error classes of whichever click typer runs on: typer >= 0.29 vendors its own
    (typer._click), whose errors derive from typer.TyperException, not click.ClickException."""
    kinds: list[type[BaseException]] = [typer.TyperException]
    try:
        import click

        kinds.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - typer no longer needs click
        pass
    return tuple(kinds)



def error_line(text: str) -> None:
    """The one line every failure ends with."""
    sys.stdout.flush()
    sys.stderr.write("error: " + " ".join(str(text).split()) + "\n")
    sys.stderr.flush()


def interrupted(code: int) -> int:
    name = {130: "SIGINT", 143: "SIGTERM"}.get(code, f"signal {code - 128}")
    sys.stdout.flush()
    sys.stderr.write(f"interrupted ({name}); no build was written\n")
    sys.stderr.flush()
    return code


def install_signal_handlers() -> dict[int, object]:
    """SIGINT and SIGTERM raise Interrupted (a BaseException) once, so that every cleanup runs;
    a second signal during that cleanup is ignored, so it completes."""

    def handler(signum, frame):
        if STATE.get("signal") or not STATE.get("running"):
            return
        STATE["signal"] = signum
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: keep the defaults
            previous[sig] = signal.signal(sig, handler)
    return previous


def _value_options() -> set[str]:
    """Every option of every command that takes a value."""
    group = typer.main.get_command(app)
    names: set[str] = set()
    for cmd in [group, *getattr(group, "commands", {}).values()]:
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and not getattr(p, "is_flag", False):
                names.update(p.opts)
    return names


def hoist_global_flags(argv: list[str]) -> list[str]:
    """Move --debug/--verbose to the front, so they work after the subcommand too; a flag given
    as an option's value (`-o --debug`) or after `--` stays where it is."""
    takes_value = _value_options()
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        else:
            rest.append(arg)
            if arg in takes_value and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        i += 1
    return front + rest
