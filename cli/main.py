"""The `attnc` command: a thin typer app that parses, calls the library, and renders with rich.

Errors print as one line (`error: ...`) with a non-zero exit (2 for bad input, 3 for a missed
fidelity bound); `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from attnc.errors import AttncError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="attnc: an attention compiler for PyTorch models.",
)
err = Console(stderr=True)
out = Console()
STATE = {"debug": False}


def _setup_logging(verbose: bool, debug: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING)
    logger = logging.getLogger("attnc")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False, show_time=False))
    logger.setLevel(level)
    logger.propagate = False
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    STATE["debug"] = debug
    _setup_logging(verbose, debug)


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    def render(items, description, total):
        if not enabled:
            yield from items
            return
        with Progress(
            "  [dim]·[/dim] {task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            yield from bar.track(items, total=total, description=description)

    return render


@app.command()
def optimize(
    model: Annotated[
        str, typer.Argument(help="A .pt2, HF folder, file.py:factory or pkg.mod:factory.")
    ],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe YAML.")],
    out_dir: Annotated[str, typer.Option("-o", "--out", help="Output folder.")] = "build",
    calib: Annotated[
        str | None,
        typer.Option("--calib", help="Calibration JSONL/.pt; omit for generated inputs."),
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="State dict for a factory model.")
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle", help="Allow loading a pickled nn.Module (runs code from the file)."
        ),
    ] = False,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Example input shape, e.g. 2,16.")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, float16, bfloat16 or auto (HF checkpoints).")
    ] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Capture, rewrite, lower, export and verify MODEL as RECIPE says; write OUT."""
    from attnc.build import BuildOptions, build

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
            ),
        )
    if as_json:
        print(json.dumps(res.report, indent=2, default=str))
        return
    r = res.report
    v = r["verification"]["comparisons"]
    t = Table(title=f"attnc build → {res.out_dir}")
    for col in ("comparison", "max abs diff", "cosine", "SQNR dB", "top-1"):
        t.add_column(col)
    for name, m in v.items():
        t.add_row(
            name,
            *[
                f"{m.get(k, float('nan')):.6g}" if k in m else ""
                for k in ("max_abs_diff", "cosine", "sqnr_db", "top1")
            ],
        )
    out.print(t)
    out.print(
        f"attention sites {len(r['sites_before'])} → {len(r['sites_after'])}, parameters "
        f"{r['model']['params_before']:,} → {r['model']['params_after']:,}, "
        f"{r['seconds']:.1f} s. Artifacts: {', '.join(r['artifacts'])}"
    )


@app.command()
def inspect(
    model: Annotated[
        str, typer.Argument(help="A .pt2, HF folder, file.py:factory or pkg.mod:factory.")
    ],
    weights: Annotated[str | None, typer.Option("--weights")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle")] = False,
    input_shape: Annotated[str | None, typer.Option("--input-shape")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
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
        str | None, typer.Option("--against", help="The original (default: the build's source).")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Held-out JSONL text or token ids.")
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Evaluate the build's model.onnx in ONNX Runtime.")
    ] = False,
    samples: Annotated[int, typer.Option("--samples")] = 128,
    max_length: Annotated[int, typer.Option("--max-length")] = 256,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Task-level fidelity of MODEL against the original: bits/byte, top-1, KL for LMs; embedding
    cosine and retrieval agreement for encoders; pooled-feature cosine for vision models."""
    from attnc.check.task import evaluate

    res = evaluate(model, against, data, onnx=onnx, samples=samples, max_length=max_length)
    if as_json:
        print(json.dumps(res, indent=2))
        return
    t = Table(title=f"{res['model']} vs {res['against']} ({res['kind']}, {res['runtime']})")
    t.add_column("metric")
    t.add_column("value")
    for k, v in res["metrics"].items():
        t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    out.print(t)


@app.command()
def passes(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the available passes: id, exact or approximate, config fields and defaults."""
    from attnc.recipe.manager import list_passes
    from attnc.recipe.schema import config_fields

    infos = list_passes()
    rows = [
        {
            "id": i.id,
            "exact": i.exact,
            "summary": i.summary,
            "paper": i.paper,
            "config": [
                {"name": n, "type": t, "default": d} for n, t, d in config_fields(i.config_cls)
            ],
        }
        for i in infos
    ]
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        kind = "exact" if r["exact"] else "approximate"
        out.print(f"[bold]{r['id']}[/bold] ({kind}, {r['paper']}): {r['summary']}")
        for f in r["config"]:
            out.print(f"    {f['name']}: {f['type']} = {f['default']!r}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except AttncError as exc:
        if STATE["debug"]:
            err.print_exception()
        err.print(f"error: {exc.one_line()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into one line
        import click

        if isinstance(exc, click.exceptions.ClickException):
            err.print(f"error: {exc.format_message()}", markup=False, highlight=False)
            sys.exit(2)
        if STATE["debug"]:
            err.print_exception()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(
            f"error: internal error: {type(exc).__name__}: {first[:300]} "
            "(rerun with --debug for the traceback)",
            markup=False,
            highlight=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
