"""`Program`: the runnable ATen graph of a captured model, its example inputs and pass history.

The graph is the single source of truth: `program.sites` is derived from it on every access.
"""

from __future__ import annotations

import contextlib
import copy
import keyword
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

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
    # per input and dynamic axis, the (min, max) size export inferred (max None: unbounded); with
    # them, re-exports name the dims and tie equal axes (`dynamic_shapes(named=True)`)
    dim_ranges: dict[str, dict[int, tuple[int, int | None]]] = field(default_factory=dict)
    # what the source calls its main output(s): logits, last_hidden_state, output, output_0...
    output_names: list[str] = field(default_factory=lambda: ["output"])

    @property
    def sites(self):
        from attnc.graph.sites import find_sites

        return find_sites(self.gm)

    def __call__(self, *args: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.gm(*args)

    def clone(self) -> Program:
        """A copy that no edit of it reaches this one through: its own graph (every node's meta
        copied deeply, except the fake tensors in `val`, which edits replace and never mutate),
        its own module tree, buffers (copied), subgraph modules and `gm.meta`, and its own
        records. Parameters (the weights) are shared and must be treated as read-only."""
        fake_keys = ("val", "example_value", "tensor_meta")

        def copy_meta(meta: dict) -> dict:
            out = {k: v for k, v in meta.items() if k in fake_keys}
            for k, v in meta.items():
                if k not in fake_keys:
                    try:
                        out[k] = copy.deepcopy(v)
                    except Exception:  # noqa: BLE001 - an uncopyable value: shallow, as fx does
                        out[k] = copy.copy(v)
            return out

        def clone_gm(src: torch.fx.GraphModule) -> torch.fx.GraphModule:
            graph = copy.deepcopy(src.graph)
            for a, b in zip(src.graph.nodes, graph.nodes, strict=True):
                b.meta = copy_meta(a.meta)
            gm = torch.fx.GraphModule(src, graph)  # fresh module tree; tensors by reference
            gm.meta.update(copy_meta(src.meta))
            copies: dict[int, torch.Tensor] = {}  # aliases of one buffer stay aliases
            for name, buf in list(gm.named_buffers(remove_duplicate=False)):
                owner_path, _, attr = name.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                owner.register_buffer(attr, copies.setdefault(id(buf), buf.clone()))
            for node in graph.find_nodes(op="get_attr"):  # subgraphs (torch.cond branches...)
                owner_path, _, attr = node.target.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                sub = getattr(owner, attr)
                if isinstance(sub, torch.fx.GraphModule):
                    setattr(owner, attr, clone_gm(sub))
            return gm

        return Program(
            clone_gm(self.gm),
            self.example_args,
            list(self.input_names),
            self.kind,
            copy.deepcopy(self.dynamic_dims),
            copy.deepcopy(self.history),
            list(self.candidates),
            self.source,
            copy.deepcopy(self.dim_ranges),
            list(self.output_names),
        )

    def dynamic_shapes(self, named: bool = False) -> tuple[dict[int, Any] | None, ...]:
        """Per input, its dynamic axes: `Dim.DYNAMIC`, or with `named` one shared `Dim("batch")`
        for every batch axis and `Dim("sequence")` for the token axes of one length."""
        ranges = self.dim_ranges if named else None
        return _dim_specs(self.input_names, self.example_args, self.dynamic_dims, ranges)


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


def _dim_specs(names, args, dynamic_dims, ranges=None):
    """Dim.DYNAMIC on each wanted axis: export infers ranges (e.g. seq <= max positions) and ties
    axes the graph makes equal, and fails if an axis specializes. With `ranges` (what an earlier
    export inferred), named Dims instead: one `batch` for every batch axis, one `sequence` per
    example length of the token axes, each over the intersection of its axes' ranges."""
    if not ranges:
        specs = []
        for name, _t in zip(names, args, strict=True):
            want = dynamic_dims.get(name)
            specs.append({axis: Dim.DYNAMIC for axis in want} if want else None)
        return tuple(specs)
    groups: dict[tuple[str, int], list[tuple[int, int | None]]] = {}
    for name, t in zip(names, args, strict=True):
        for axis, label in dynamic_dims.get(name, {}).items():
            key = (label, 0 if label == "batch" else int(t.shape[axis]))
            groups.setdefault(key, []).append(ranges.get(name, {}).get(axis, (2, None)))
    dims: dict[tuple[str, int], Any] = {}
    seq_lengths = sorted({n for (label, n) in groups if label != "batch"})
    for (label, n), rs in groups.items():
        lo = max(r[0] for r in rs)
        his = [r[1] for r in rs if r[1] is not None]
        if label == "batch":
            dim_name = "batch"
        else:
            base = "sequence" if label == "seq" else str(label)
            idx = seq_lengths.index(n)
            dim_name = base if idx == 0 else f"{base}_{idx + 1}"
        dims[(label, n)] = Dim(dim_name, min=lo, max=min(his) if his else None)
    specs = []
    for name, t in zip(names, args, strict=True):
        want = dynamic_dims.get(name)
        specs.append(
            {
                axis: dims[(label, 0 if label == "batch" else int(t.shape[axis]))]
                for axis, label in want.items()
            }
            if want
            else None
        )
    return tuple(specs)


def _dim_ranges(ep, names, used) -> dict[str, dict[int, tuple[int, int | None]]]:
    """The size range export inferred for each dynamic input axis (empty where unknown)."""
    from torch.utils._sympy.numbers import int_oo

    placeholders = [
        n
        for n, spec in zip(
            ep.graph.find_nodes(op="placeholder"), ep.graph_signature.input_specs, strict=False
        )
        if spec.kind.name == "USER_INPUT"
    ]
    out: dict[str, dict[int, tuple[int, int | None]]] = {}
    for name, node in zip(names, placeholders, strict=False):
        val = node.meta.get("val")
        for axis in used.get(name, {}):
            size = val.shape[axis] if isinstance(val, torch.Tensor) else None
            if not isinstance(size, torch.SymInt):
                return {}
            vr = ep.range_constraints.get(size.node.expr)
            if vr is None:
                return {}
            hi = None if vr.upper in (int_oo, float("inf")) else int(vr.upper)
            out.setdefault(name, {})[axis] = (int(vr.lower), hi)
    return out


def output_names_of(out: Any) -> list[str]:
    """The names of what `main_output` picks from `out` (same order of preference)."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(val, torch.Tensor):
            return [key]
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return [f"output_{i}" for i in range(len(out))]
    return ["output"]


@contextlib.contextmanager
def _watch_outputs(module: torch.nn.Module, seen: list):
    """Record what the wrapped model returns (before `main_output` picks a tensor from it)."""
    inner = getattr(module, "model", None)
    if not isinstance(module, OutputAdapter) or not isinstance(inner, torch.nn.Module):
        yield
        return
    handle = inner.register_forward_hook(lambda _m, _a, out: seen.append(output_names_of(out)))
    try:
        yield
    finally:
        handle.remove()


def _export(module, args, names, dynamic_dims):
    shapes = _dim_specs(names, args, dynamic_dims) if dynamic_dims else None
    if shapes is not None and isinstance(module, OutputAdapter):
        shapes = (shapes,)  # OutputAdapter.forward(*inputs)
    from attnc.capture.hf_patches import export_patches

    with torch.no_grad(), export_patches(module):  # LLaVA: keep the batch dynamic
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def capture(
    loaded: LoadedModel, *, dynamic: bool = True, canonicalize: bool = True, check: bool = True
) -> Program:
    """torch.export the model (dynamic batch and sequence where the model allows), keep SDPA as
    one node, and canonicalise hand-written attention into SDPA; with `check`, the program must
    match the model on the example inputs (`check_parity`)."""
    names, args = loaded.input_names, loaded.example_args
    module = loaded.module
    want = _default_dynamic_dims(names, args) if dynamic else {}
    only = lambda label: {n: {a: lb for a, lb in d.items() if lb == label} for n, d in want.items()}
    attempts = [want, only("seq"), only("batch"), {}]
    last_exc: Exception | None = None
    ep = None
    used: dict[str, dict[int, str]] = {}
    seen: list[list[str]] = []
    with _watch_outputs(module, seen):
        for dims in attempts:
            dims = {n: d for n, d in dims.items() if d}
            try:
                ep = _export(module, args, names, dims)
                used = dims
                break
            except Exception as exc:  # noqa: BLE001 - retried with fewer dynamic dims, reported
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
    program.dim_ranges = _dim_ranges(ep, names, used)
    if seen:
        program.output_names = seen[-1]
    if check:
        check_parity(module, gm, tuple(args), loaded.source)
    return program


def check_parity(module, gm, args: tuple, source: str) -> float:
    """The captured program must compute what the model computes on the example inputs: a
    capture that silently changes the model (an export-time mask that eager mode skips, say)
    is refused here, before any pass could be blamed for it. Returns the max abs diff."""
    with torch.no_grad():
        ref = pytree.tree_leaves(module(*args))
        got = pytree.tree_leaves(gm(*args))
    ref = [t for t in ref if isinstance(t, torch.Tensor)]
    got = [t for t in got if isinstance(t, torch.Tensor)]
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got, strict=True)):
        raise CaptureError(
            f"the captured program of {source} returns other outputs than the model "
            f"({[tuple(t.shape) for t in got]} vs {[tuple(t.shape) for t in ref]})"
        )
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise CaptureError(f"the captured program of {source} differs from the model")
            continue
        a64, b64 = a.double(), b.double()
        fin = torch.isfinite(a64)
        if not torch.equal(fin, torch.isfinite(b64)):
            raise CaptureError(
                f"the captured program of {source} has non-finite values where the model has "
                "none (or the reverse)"
            )
        if not fin.any():
            continue
        diff = float((a64 - b64)[fin].abs().max())
        scale = max(1.0, float(a64[fin].abs().max()))
        tol = (1e-3 if a.dtype == torch.float32 or a.dtype == torch.float64 else 3e-2) * scale
        worst = max(worst, diff)
        if diff > tol:
            raise CaptureError(
                f"torch.export changed what {source} computes: the captured program differs "
                f"from the model by {diff:.3g} on the example inputs (allowed {tol:.3g})",
                "the model takes another path under torch.export (data-dependent masks or "
                "control flow); attnc refuses it rather than optimise a different model",
            )
    return worst


def keyword_module(program: Program) -> torch.fx.GraphModule:
    """A copy of the program's graph whose forward takes the inputs by their names:
    `forward(self, input_ids, attention_mask)`, so it can be called positionally or by keyword."""
    gm = torch.fx.GraphModule(program.gm, copy.deepcopy(program.gm.graph))
    gm.meta.update(program.gm.meta)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    names = [_identifier(n) for n in program.input_names]
    if len(placeholders) != len(names) or len(set(names)) != len(names):
        raise CaptureError(
            f"the graph has {len(placeholders)} inputs but the program names {len(names)}"
        )
    for node, name in zip(placeholders, names, strict=True):
        node.target = name
        node.name = name
    codegen = gm.graph._codegen
    out_spec = codegen.pytree_info.out_spec if hasattr(codegen, "pytree_info") else None
    in_spec = pytree.tree_structure((tuple(program.example_args), {}))
    gm.graph._codegen = torch.fx.graph._PyTreeCodeGen(
        torch.fx.graph._PyTreeInfo(names, in_spec, out_spec)
    )
    gm.recompile()
    return gm


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out.isidentifier() and not keyword.iskeyword(out) else f"input_{out}"


def reexport(program: Program, *, by_keyword: bool = False) -> torch.export.ExportedProgram:
    """Export the program's (possibly edited) graph again, with its dynamic dims. `by_keyword`:
    the exported program takes its inputs by name (`ep.module()(input_ids=..., ...)`), with the
    dims named (`batch`, `sequence`) and batch axes tied; unnamed dims if the named ones fail."""
    from attnc.errors import ExportError

    try:
        if not by_keyword:
            return _export(
                program.gm, program.example_args, program.input_names, program.dynamic_dims
            )
        gm = keyword_module(program)
        kwargs = dict(
            zip(gm.graph._codegen.pytree_info.orig_args, program.example_args, strict=True)
        )
        attempts = [True, False] if program.dim_ranges else [False]
        for named in attempts:
            specs = program.dynamic_shapes(named=named) if program.dynamic_dims else None
            shapes = dict(zip(kwargs, specs, strict=True)) if specs else None
            try:
                with torch.no_grad():
                    return torch.export.export(
                        gm, (), kwargs=kwargs, dynamic_shapes=shapes, strict=False
                    )
            except Exception as exc:  # noqa: BLE001 - named dims are a nicety; retried without
                if not named:
                    raise
                log.warning(
                    "named dynamic dims failed (%s); saving with unnamed ones",
                    str(exc).splitlines()[0][:200],
                )
        raise AssertionError("unreachable")
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(
            f"re-export of the optimized graph failed: {str(exc).splitlines()[0]}"
        ) from exc
