"""`attnc bench` and `attnc passes`: commands that read a build folder or the pass registry
(registered on the app by cli/main.py, after `optimize`, `inspect` and `eval`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from attnc.cli.app import out


def bench_cmd(
    build_dir: Annotated[str, typer.Argument(help="An attnc build folder.")],
    shapes: Annotated[
        str | None,
        typer.Option("--shapes", help="BATCHxSEQUENCE pairs to time at, e.g. 1x128,8x64 "
                     "(default: the shapes the build timed)."),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option("--against", help="The original as a .pt2 (default: the build's "
                     "original.pt2)."),
    ] = None,
    runtime: Annotated[
        str,
        typer.Option("--runtime", help="onnxruntime, torch, or both (comma-separated)."),
    ] = "onnxruntime,torch",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per model and shape.")]
    = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Time BUILD's model.onnx (ONNX Runtime, CPU) and model.pt2 (torch) against the original,
    interleaved in one run; prints medians and the speed-up. Runs no code from the folder."""
    from pathlib import Path

    from attnc.check.bench import BenchConfig, bench_folder, parse_shapes
    from attnc.cli.render import bench_table

    cfg = BenchConfig(
        shapes=parse_shapes(shapes),
        repeats=repeats,
        runtimes=tuple(x.strip() for x in runtime.split(",") if x.strip()),
    )
    res = bench_folder(Path(build_dir), cfg, Path(against) if against else None)
    if as_json:
        print(json.dumps(res.as_dict(), indent=2))
        return
    out.print(bench_table(res.as_dict()))


def passes(
    as_json: Annotated[bool, typer.Option("--json", help="Print the passes as JSON.")] = False,
) -> None:
    """List the available passes: id, exact or approximate, config fields and defaults."""
    from attnc.recipe.bounds import DEFAULT_BOUNDS, describe_default_bounds
    from attnc.recipe.manager import list_passes
    from attnc.recipe.schema import config_fields

    infos = list_passes()
    defaults = {kind: b.set_bounds() for kind, b in DEFAULT_BOUNDS.items()}
    rows = [
        {
            "id": i.id,
            "exact": i.exact,
            "summary": i.summary,
            "paper": i.paper,
            "config": [
                {"name": n, "type": t, "default": d} for n, t, d in config_fields(i.config_cls)
            ],
            "default_bound": None if i.exact else defaults,
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
    out.print(
        "default fidelity bound (a recipe without a fidelity: section): "
        + describe_default_bounds(),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
