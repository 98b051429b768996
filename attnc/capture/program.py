"""`Program`: the runnable ATen graph of a captured model, its example inputs and pass history.

The graph is the single source of truth: `program.sites` is derived from it on every access.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim

from attnc.errors import CaptureError
from attnc.load.models import LoadedModel, OutputAdapter

log = logging.getLogger(__name__)

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class PassRecord:
    pass_id: str
    config: dict[str, Any]
    changed_sites: tuple[str, ...]
    seconds: float


@dataclass
class Program:
    gm: torch.fx.GraphModule
    example_args: tuple[torch.Tensor, ...]
    input_names: list[str]
    kind: str
    dynamic_dims: dict[str, dict[int, str]]
    history: list[PassRecord] = field(default_factory=list)
    candidates: list[Any] = field(default_factory=list)
    source: str = ""

    @property
    def sites(self):
        from attnc.graph.sites import find_sites

        return find_sites(self.gm)

    def __call__(self, *args: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.gm(*args)

    def clone(self) -> Program:
        """A deep copy whose graph can be edited without touching this one (weights are shared)."""
        gm = torch.fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        gm.meta.update(self.gm.meta)
        return Program(
            gm,
            self.example_args,
            list(self.input_names),
            self.kind,
            dict(self.dynamic_dims),
            list(self.history),
            list(self.candidates),
            self.source,
        )

    def dynamic_shapes(self) -> tuple[dict[int, Any] | None, ...]:
        return _dim_specs(self.input_names, self.example_args, self.dynamic_dims)


def _default_dynamic_dims(names: list[str], args: tuple[torch.Tensor, ...]):
    dims: dict[str, dict[int, str]] = {}
    for name, t in zip(names, args, strict=True):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        d = {0: "batch"} if t.shape[0] > 1 else {}
        is_tokens = not t.is_floating_point() and t.dim() == 2
        if is_tokens and t.shape[1] > 1 and "pixel" not in name:
            d[1] = "seq"
        if d:
            dims[name] = d
    return dims


def _dim_specs(names, args, dynamic_dims):
    """Dim.DYNAMIC on each wanted axis: export infers ranges (e.g. seq <= max positions) and ties
    equal axes together (input_ids and attention_mask), and fails if an axis specializes."""
    specs = []
    for name, _t in zip(names, args, strict=True):
        want = dynamic_dims.get(name)
        specs.append({axis: Dim.DYNAMIC for axis in want} if want else None)
    return tuple(specs)


def _export(module, args, names, dynamic_dims):
    shapes = _dim_specs(names, args, dynamic_dims) if dynamic_dims else None
    if shapes is not None and isinstance(module, OutputAdapter):
        shapes = (shapes,)  # OutputAdapter.forward(*inputs)
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def capture(loaded: LoadedModel, *, dynamic: bool = True, canonicalize: bool = True) -> Program:
    """torch.export the model (dynamic batch and sequence where the model allows), keep SDPA as
    one node, and canonicalise hand-written attention into SDPA."""
    names, args = loaded.input_names, loaded.example_args
    module = loaded.module
    want = _default_dynamic_dims(names, args) if dynamic else {}
    only = lambda label: {n: {a: lb for a, lb in d.items() if lb == label} for n, d in want.items()}
    attempts = [want, only("seq"), only("batch"), {}]
    last_exc: Exception | None = None
    ep = None
    used: dict[str, dict[int, str]] = {}
    for dims in attempts:
        dims = {n: d for n, d in dims.items() if d}
        try:
            ep = _export(module, args, names, dims)
            used = dims
            break
        except Exception as exc:  # noqa: BLE001 - retried with fewer dynamic dims, then reported
            log.info("export with dynamic dims %s failed: %s", dims, str(exc).splitlines()[0])
            last_exc = exc
    if ep is None:
        first = str(last_exc).strip().splitlines()[0] if last_exc else "unknown error"
        raise CaptureError(f"torch.export failed: {first[:300]}", "run with --debug for details")
    if used != want:
        log.warning("captured with dynamic dims %s (wanted %s)", used, want)
    gm = ep.module()
    candidates: list[Any] = []
    if canonicalize:
        from attnc.capture.canonicalize import canonicalize_attention

        n, candidates = canonicalize_attention(gm)
        if n:
            log.info("canonicalised %d hand-written attention pattern(s) into SDPA", n)
    from attnc.capture.masks import annotate_masks
    from attnc.graph.edit import prune

    removed = prune(gm)  # dead attention (e.g. LLaVA's unused last vision layer) is no site
    if removed:
        log.info("capture: pruned %d unused weight tensor(s) of dead code", removed)
    annotate_masks(gm, list(names), tuple(args))
    program = Program(
        gm, tuple(args), list(names), loaded.kind, used, [], candidates, loaded.source
    )
    return program


def reexport(program: Program) -> torch.export.ExportedProgram:
    """Export the program's (possibly edited) graph again, with its dynamic dims."""
    try:
        return _export(program.gm, program.example_args, program.input_names, program.dynamic_dims)
    except Exception as exc:  # noqa: BLE001
        from attnc.errors import ExportError

        raise ExportError(
            f"re-export of the optimized graph failed: {str(exc).splitlines()[0]}"
        ) from exc
