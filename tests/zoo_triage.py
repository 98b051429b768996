"""Run the zoo (tests/hf_zoo.py) stage by stage and say where each architecture stops.

    .venv/bin/python tests/zoo_triage.py [name ...]

prints one line per architecture: PASS, or the stage it failed at (load, capture, sites, drop,
onnx, ort, params, branch) and the first line of the error; `internal` marks an error that is not
an AttncError (a crash, not a clean refusal). The checks themselves (`check_inspect`,
`check_drop`) are shared with tests/test_hf_zoo.py.

Stages:
  load, capture  attnc.load.models.load_model + attnc.capture.program.capture on the saved folder;
                 the captured program must compute what the model does (max abs diff <= 1e-4)
  sites          one site per attention call the config declares
  drop           `attnc.build.build` with a recipe dropping one attention sublayer (until export)
  onnx           the ONNX export, and onnx.checker on model.onnx
  ort            ONNX Runtime against the torch program: max abs diff <= 1e-4
  params         the weights removed are exactly those only the dropped attention branch uses
                 (its projections, its own pre-norm, layer scale; not a norm or bias table
                 shared with anything else), found from the original graph
  branch         the dropped program equals the original with that attention branch zeroed (its
                 output projection returns 0 on that call), so nothing else was removed
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import hf_zoo  # noqa: E402  (sets the offline environment before torch/transformers load)
import torch  # noqa: E402
from zoo_branch import _branch_params, _node_module, _params  # noqa: E402

from attnc.errors import AttncError  # noqa: E402

ORT_TOL = 1e-4
BRANCH_TOL = 1e-4
CAPTURE_TOL = 1e-4
RECIPE = {
    "version": 1,
    "passes": [{"id": "llm-drop", "target": "attention", "count": 1}],
    "fidelity": {"min_cosine": -1.0},  # random weights: the edit is checked, not its quality
    "calibration": {"samples": 4, "batch_size": 2, "max_length": 16, "holdout": 0.5},
    "export": {"onnx": True, "pt2": False, "onnx_max_abs_diff": ORT_TOL},
}
_BUILD_STAGES = [  # build() progress message prefix -> the stage it starts
    ("loading", "load"),
    ("capturing", "capture"),
    ("exporting model.onnx", "onnx"),
    ("verifying ONNX Runtime", "ort"),
]


class StageFailure(Exception):
    """An architecture failed at `stage`; `internal` when the cause was not an AttncError."""

    def __init__(self, stage: str, message: str, internal: bool = False):
        super().__init__(f"{stage}: {message}")
        self.stage, self.message, self.internal = stage, message, internal


def first_line(exc: BaseException) -> str:
    if isinstance(exc, AttncError):
        return exc.one_line()
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _fail(stage: str, exc: BaseException) -> StageFailure:
    return StageFailure(stage, first_line(exc), internal=not isinstance(exc, AttncError))


# ------------------------------------------------------------------------------ inspect


def check_inspect(name: str, spec: str):
    """Load and capture `spec` with the library; the sites must number what the config declares.
    Returns (loaded, program)."""
    from attnc.capture.program import capture
    from attnc.load.models import load_model

    try:
        loaded = load_model(spec)
    except Exception as exc:  # noqa: BLE001 - every failure is reported by stage
        raise _fail("load", exc) from exc
    try:
        program = capture(loaded)
    except Exception as exc:  # noqa: BLE001
        raise _fail("capture", exc) from exc
    try:
        ref = _outputs(loaded.module, program.example_args)
    except Exception as exc:  # noqa: BLE001
        raise StageFailure("capture", f"the model fails on its example inputs: {first_line(exc)}",
                           internal=True) from exc
    diff = _max_diff(ref, _outputs(program))
    if not diff <= CAPTURE_TOL:
        raise StageFailure("capture", f"the captured program differs from the model by {diff:.3g}")
    want, got = hf_zoo.declared_sites(name), len(program.sites)
    if got != want:
        mods = [s.module for s in program.sites]
        raise StageFailure("sites", f"{got} attention site(s), the config declares {want}: {mods}")
    return loaded, program


def inspect_cli(spec: str) -> dict:
    """`attnc inspect SPEC --json`, in-process; an AttncError or a crash propagates as is."""
    from typer.testing import CliRunner

    from attnc.cli.main import app

    res = CliRunner().invoke(app, ["inspect", spec, "--json"])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    if res.exit_code != 0:
        raise StageFailure("load", f"attnc inspect exited {res.exit_code}: {res.output[-300:]}")
    return json.loads(res.stdout)


# ------------------------------------------------------------------------------ llm-drop


@dataclass(frozen=True)
class DropResult:
    out_dir: Path
    report: dict
    dropped: dict  # the dropped site's row (from the original program)
    removed: tuple[str, ...]  # parameter names (HF paths) the drop removed
    ort_max_abs_diff: float | None  # None: built without ONNX (onnx=False)
    branch_max_abs_diff: float


def run_build(spec: str, work: Path, onnx: bool = True, started: list | None = None):
    """attnc.build.build with RECIPE (without its ONNX export and ONNX Runtime check when
    `onnx` is false); a failure is a StageFailure at the stage it reached. `started`, a list,
    receives what the build loaded and captured itself: (loaded, original program)."""
    import yaml

    import attnc.build as build_mod
    from attnc.build import BuildOptions, build

    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "export": {**RECIPE["export"], "onnx": onnx}}))
    stage = ["drop"]

    def progress(msg: str) -> None:
        stage[0] = next((s for p, s in _BUILD_STAGES if msg.startswith(p)), "drop")

    prepare = build_mod.prepare

    def recorded(*args, **kwargs):  # the build's own prepare, its result kept for the checks
        loaded, original, data = prepare(*args, **kwargs)
        if started is not None:
            started[:] = [loaded, original]
        return loaded, original, data

    build_mod.prepare = recorded
    try:
        # no original.pt2 (a re-export of the original, about a fifth of a zoo build's time):
        # the zoo checks the optimized artifacts; test_api_bench and test_cli_errors cover it
        return build(spec, str(recipe), None, work / "out",
                     BuildOptions(progress=progress, save_original=False))
    except Exception as exc:  # noqa: BLE001
        raise _fail(stage[0], exc) from exc
    finally:
        build_mod.prepare = prepare


def check_drop(name: str, spec: str, work: Path, loaded=None, original=None,
               onnx: bool = True) -> DropResult:
    """Build with one attention sublayer dropped and check the artifacts and the edit; with
    `onnx` false the build writes no model.onnx (the onnx and ort stages are not run). The edit
    is checked against `loaded`/`original` (check_inspect's), or where they are None against
    the model the build loaded and the program it captured itself (no second load + capture)."""
    arch = hf_zoo.ZOO[name]
    started: list = []
    res = run_build(spec, work, onnx=onnx, started=started)
    if loaded is None or original is None:
        loaded, original = started
    report = res.report
    diff = None
    if onnx:
        import onnx as onnx_lib

        try:
            onnx_lib.checker.check_model(str(res.out_dir / "model.onnx"), full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise StageFailure("onnx", f"onnx.checker: {first_line(exc)}") from exc
        comps = report["verification"]["comparisons"]
        diff = comps["ONNX Runtime vs torch optimized"]["max_abs_diff"]
        if not diff <= ORT_TOL:
            raise StageFailure("ort", f"ONNX Runtime differs from torch by {diff:.3g}")

    before = {s.node: s for s in original.sites}
    after = {r["node"] for r in report["sites_after"]}
    gone = [s for n, s in before.items() if n not in after]
    if len(gone) != 1 or len(report["sites_after"]) != len(before) - 1:
        raise StageFailure(
            "drop", f"{len(gone)} site(s) left the graph, {len(report['sites_after'])} remain "
            f"of {len(before)}; one attention sublayer was to go"
        )
    site = gone[0]
    o_mod = _node_module(original, site.o_proj)
    removed = tuple(sorted(_params(original.gm) - _params(res.program.gm)))
    own = _branch_params(original.gm, site)
    if set(removed) != own:
        extra, kept = sorted(set(removed) - own), sorted(own - set(removed))
        raise StageFailure(
            "params", f"dropping {site.module} removed {len(extra)} weight(s) outside its "
            f"attention branch {extra[:4]} and kept {len(kept)} of its own {kept[:4]}"
        )
    if not removed and not arch.shared_weights:
        raise StageFailure("params", f"dropping {site.module} removed no weight")
    branch = _branch_diff(loaded, original, site, o_mod, res.program)
    if not branch <= BRANCH_TOL:
        raise StageFailure(
            "branch", f"the dropped model differs by {branch:.3g} from the original with "
            f"{site.module}'s output zeroed: more than the attention branch went"
        )
    return DropResult(res.out_dir, report, site.row(), removed, diff, branch)


def _zero_call(module: torch.nn.Module, call: int) -> Callable[[], None]:
    """Make `module` return zeros on its `call`-th call (0-based); returns the remover."""
    count = [0]

    def hook(mod, args, output):
        n = count[0]
        count[0] += 1
        if n != call:
            return None
        if isinstance(output, torch.Tensor):
            return torch.zeros_like(output)
        return (torch.zeros_like(output[0]), *output[1:])

    return module.register_forward_hook(hook).remove


def _outputs(fn, args=None) -> list[torch.Tensor]:
    """The tensors `fn(*args)` returns (a Program runs on its own example inputs)."""
    with torch.no_grad():
        out = fn(*args) if args is not None else fn(*fn.example_args)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _max_diff(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got, strict=True)):
        return float("inf")
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got, strict=True))


def _branch_diff(loaded, original, site, o_mod, dropped) -> float:
    """Max abs diff of the dropped program against the original with the site's attention
    output zeroed on the site's own call (a shared-weight layer is called once per use)."""
    target = o_mod or site.module
    same = [s for s in original.sites if (_node_module(original, s.o_proj) or s.module) == target]
    call = [s.node for s in same].index(site.node)
    model = loaded.module.model  # the OutputAdapter's wrapped model: paths are relative to it
    remove = _zero_call(model.get_submodule(target), call)
    try:
        ref = _outputs(loaded.module, dropped.example_args)
    finally:
        remove()
    return _max_diff(ref, _outputs(dropped))


# ------------------------------------------------------------------------------ triage


@dataclass(frozen=True)
class Outcome:
    name: str
    stage: str  # PASS or the failing stage
    error: str
    internal: bool
    seconds: float
    cpu_seconds: float  # this process's CPU time: comparable on a busy machine

    def line(self) -> str:
        tag = "PASS" if self.stage == "PASS" else f"FAIL {self.stage}"
        kind = " (internal)" if self.internal else ""
        err = f"{kind} {self.error}" if self.error else ""
        t = f"{self.seconds:5.1f}s wall {self.cpu_seconds:5.1f}s cpu"
        return f"{self.name:20s} {tag:14s} {t}{err}"


def triage(name: str, root: Path) -> Outcome:
    t0, c0 = time.perf_counter(), time.process_time()
    folder = root / name / "hf"
    try:
        if not hf_zoo.ZOO[name].handwritten:
            hf_zoo.save(name, folder)
        spec = hf_zoo.spec(name, folder)
        loaded, program = check_inspect(name, spec)
        check_drop(name, spec, root / name, loaded, program)
        outcome = ("PASS", "", False)
    except StageFailure as exc:
        outcome = (exc.stage, exc.message, exc.internal)
    except Exception as exc:  # noqa: BLE001 - a bug in the zoo itself
        traceback.print_exc()
        outcome = ("zoo", first_line(exc), True)
    return Outcome(name, *outcome, time.perf_counter() - t0, time.process_time() - c0)


def main(names: list[str]) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    names = names or list(hf_zoo.ZOO)
    unknown = [n for n in names if n not in hf_zoo.ZOO]
    if unknown:
        print(f"unknown: {unknown}; known: {list(hf_zoo.ZOO)}")
        return 2
    t0, c0 = time.perf_counter(), time.process_time()
    passed = 0
    with tempfile.TemporaryDirectory(prefix="attnc-zoo-") as tmp:
        for name in names:
            out = triage(name, Path(tmp))
            passed += out.stage == "PASS"
            print(out.line(), flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{passed}/{len(names)} pass in {wall:.0f}s wall, {cpu:.0f}s cpu")
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
