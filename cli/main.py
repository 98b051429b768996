"""The `attnc` command: a thin typer app that parses, calls the library, and renders with rich.

Exit codes: 0 done, 1 internal error (or an artifact that could not be written), 2 bad input or
usage (every command-line parsing error too, and a bare `attnc`, which prints the help on stderr
as click does), 3 a missed fidelity bound, 130 SIGINT and 143 SIGTERM ("interrupted", the staging
folder removed). Errors print as one line, `error: ...`; `--debug` shows the traceback.
`--debug` and `--verbose` work anywhere on the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Annotated

import typer
from rich.table import Table

from attnc.cli import info_commands
from attnc.cli.app import GLOBAL_FLAGS, STATE, app, err, out
from attnc.cli.shell import (
    click_errors,
    error_line,
    hoist_global_flags,
    install_signal_handlers,
    interrupted,
)
from attnc.errors import AttncError, Interrupted


def _shape(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        from attnc.errors import UsageError

        raise UsageError(f"--input-shape must be integers like 2,16; got {text!r}") from None


def _rich_track(enabled: bool):
    """A progress renderer for attnc.progress: a transient rich bar on stderr."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    def render(items, description, total):
        if not enabled:
            yield from items
            return
        with Progress(
            "  [dim]·[/dim] {task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),  # the estimate, from the batches done so far
            console=err,
            transient=True,
        ) as bar:
            yield from bar.track(items, total=total, description=description)

    return render


# model-loading options shared by `optimize` and `inspect`: one definition, one help text
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", help="State dict for a factory model.")
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle", help="Allow loading a pickled nn.Module (runs code from the file)."
    ),
]
InputShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="Example input shape, e.g. 2,16.")
]


@app.command()
def optimize(
    model: Annotated[
        str, typer.Argument(help="A .pt2, HF folder, file.py:factory or pkg.mod:factory.")
    ],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe YAML.")],
    out_dir: Annotated[
        str,
        typer.Option(
            "-o",
            "--out",
            help="Output folder: a new or empty folder, or an earlier attnc build to replace.",
        ),
    ] = "build",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace the -o folder even if it is not an attnc build (never the current "
            "folder or one holding the inputs).",
        ),
    ] = False,
    save_original: Annotated[
        bool,
        typer.Option(
            "--save-original/--no-save-original",
            help="Keep the captured original as original.pt2 in the build, which `attnc eval "
            "BUILD` compares against without running any code (skip it for big models).",
        ),
    ] = True,
    calib: Annotated[
        str | None,
        typer.Option("--calib", help="Calibration JSONL/.pt; omit for generated inputs."),
    ] = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_shape: InputShapeOpt = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="auto (the checkpoint's own dtype), float32, float16 or bfloat16 (HF folders).",
        ),
    ] = "auto",
    bench: Annotated[
        bool,
        typer.Option(
            "--bench/--no-bench",
            help="Time the build against the original in the same run (ONNX Runtime CPU and "
            "torch, at the calibration shape and --bench-shapes).",
        ),
    ] = True,
    bench_shapes: Annotated[
        str | None,
        typer.Option("--bench-shapes", help="More shapes to time, BATCHxSEQUENCE: 1x128,8x64."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Capture, rewrite, lower, export and verify MODEL as RECIPE says; write OUT."""
    from attnc.build import BuildOptions, build
    from attnc.check.bench import parse_shapes

    def say(msg: str) -> None:
        if not as_json:
            err.print(f"[dim]·[/dim] {msg}")

    from attnc.progress import renderer

    with renderer(_rich_track(enabled=not as_json)):
        res = build(
            model,
            recipe,
            calib,
            out_dir,
            BuildOptions(
                weights=weights,
                trust_pickle=trust_pickle,
                input_shape=_shape(input_shape),
                dtype=dtype,
                progress=say,
                force=force,
                save_original=save_original,
                bench=bench,
                bench_shapes=parse_shapes(bench_shapes),
            ),
        )
    if as_json:
        print(json.dumps(res.report, indent=2, default=str))
        return
    from attnc.cli.render import render_build

    render_build(res.report, res.out_dir, out)


@app.command()
def inspect(
    model: Annotated[
        str, typer.Argument(help="A .pt2, HF folder, file.py:factory or pkg.mod:factory.")
    ],
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_shape: InputShapeOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the sites as JSON.")
    ] = False,
) -> None:
    """List MODEL's attention sites, and hand-written candidates that did not match (and why)."""
    from attnc.capture.program import capture
    from attnc.load.models import load_model

    loaded = load_model(
        model, weights=weights, trust_pickle=trust_pickle, input_shape=_shape(input_shape)
    )
    program = capture(loaded)
    sites = [s.row() for s in program.sites]
    cands = [dict(node=c.node, module=c.module, reason=c.reason) for c in program.candidates]
    if as_json:
        print(
            json.dumps(
                {
                    "kind": loaded.kind,
                    "inputs": loaded.input_names,
                    "dynamic_dims": program.dynamic_dims,
                    "sites": sites,
                    "candidates": cands,
                },
                indent=2,
                default=str,
            )
        )
        return
    # the summary is its own unwrapped line: a long model path must not split it
    out.print(f"{model}: {len(sites)} attention site(s), {loaded.kind}", soft_wrap=True,
              markup=False, highlight=False)
    t = Table()
    cols = {
        "index": "#",
        "layer": "layer",
        "module": "module",
        "num_heads": "heads",
        "num_kv_heads": "kv",
        "head_dim": "dim",
        "causal": "causal",
        "window": "window",
        "mask": "mask",
        "block_style": "block",
        "pattern": "pattern",
        "score": "score",
    }
    for key, label in cols.items():
        t.add_column(label, overflow="fold", min_width=24 if key == "module" else None)
    for s in sites:
        t.add_row(*["" if s[c] is None else str(s[c]) for c in cols])
    out.print(t)
    for c in cands:
        out.print(f"[yellow]unmatched[/yellow] {c['node']} in {c['module']}: {c['reason']}")


@app.command("eval")
def eval_cmd(
    model: Annotated[
        str, typer.Argument(help="A build folder, .pt2, .onnx, HF folder or factory.")
    ],
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="The original to compare with (default for a build: its original.pt2).",
        ),
    ] = None,
    trust_source: Annotated[
        bool,
        typer.Option(
            "--trust-source",
            help="For a build without original.pt2: load the source model named in its "
            "report.json (a factory or pickle there runs code).",
        ),
    ] = False,
    data: Annotated[
        str | None, typer.Option("--data", help="Held-out JSONL text or token ids.")
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Evaluate the build's model.onnx in ONNX Runtime.")
    ] = False,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="How many --data samples to evaluate.")
    ] = 128,
    max_length: Annotated[
        int, typer.Option("--max-length", min=2, help="Tokens per sample, at most.")
    ] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Task-level fidelity of MODEL against the original: bits/byte, top-1, KL for LMs; embedding
    cosine and retrieval agreement for encoders; pooled-feature cosine for vision models."""
    from attnc.check.task import evaluate

    res = evaluate(
        model,
        against,
        data,
        onnx=onnx,
        samples=samples,
        max_length=max_length,
        trust_source=trust_source,
    )
    if as_json:
        print(json.dumps(res, indent=2))
        return
    t = Table(title=f"{res['model']} vs {res['against']} ({res['kind']}, {res['runtime']})")
    t.add_column("metric")
    t.add_column("value")
    for k, v in res["metrics"].items():
        t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    out.print(t)



app.command("bench")(info_commands.bench_cmd)
app.command()(info_commands.passes)


def _run(args: list[str]) -> int:
    """Run the app; every outcome becomes an exit code and, on failure, one line on stderr."""
    if not [a for a in args if a not in GLOBAL_FLAGS]:
        # a bare `attnc`: the help, on stderr as click prints it, and exit 2 (a usage error)
        with contextlib.redirect_stdout(sys.stderr):
            app(args=["--help"], prog_name="attnc", standalone_mode=False)
        error_line("missing command (see the commands above)")
        return 2
    try:
        rv = app(args=args, prog_name="attnc", standalone_mode=False)
    except Interrupted as exc:
        return interrupted(exc.exit_code)
    except KeyboardInterrupt:
        return interrupted(130)
    except AttncError as exc:
        if STATE["debug"]:
            err.print_exception()
        error_line(exc.one_line())
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return interrupted(130)
    except click_errors() as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "attnc"
        error_line(f"{message} (see '{where} --help')")
        return 2
    except BrokenPipeError:  # `attnc passes --json | head`: the reader left; say nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into one line
        if STATE["debug"]:
            err.print_exception()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error_line(
            f"internal error: {type(exc).__name__}: {first[:300]} "
            "(rerun with --debug for the traceback)"
        )
        return 1
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:
        # typer turns a KeyboardInterrupt it sees into a *returned* 130
        return interrupted(rv) if rv in (130, 143) else rv
    return 0


def main(argv: list[str] | None = None) -> None:
    """The `attnc` entry point: parse, run, and exit with a code that tells the truth."""
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    STATE.update(debug="--debug" in args, signal=None, running=True)
    previous = install_signal_handlers()
    try:
        code = _run(args)
    except Interrupted as exc:  # arrived while an error was being reported
        code = interrupted(exc.exit_code)
    finally:
        STATE["running"] = False
        for sig, old in previous.items():
            signal.signal(sig, old)
    sys.exit(code)


if __name__ == "__main__":
    main()
