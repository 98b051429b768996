"""Lowering and export: dense sites to `attnc::attention` (optional), the optimized program as
`.pt2`, and ONNX through `torch.onnx.export(dynamo=True)` with attnc's translation table."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import torch

from attnc.capture.program import Program, reexport
from attnc.errors import ExportError
from attnc.graph.sites import SDPA, sdpa_args

log = logging.getLogger(__name__)


def lower_dense(program: Program) -> int:
    """Route every remaining SDPA node through `attnc::attention` (Triton on CUDA)."""
    import attnc.kernels  # noqa: F401  (registers the ops)

    graph = program.gm.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != SDPA:
            continue
        a = sdpa_args(node)
        if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
            continue
        with graph.inserting_after(node):
            new = graph.call_function(
                torch.ops.attnc.attention.default,
                (
                    a["query"],
                    a["key"],
                    a["value"],
                    a.get("attn_mask"),
                    bool(a.get("is_causal", False)),
                    a.get("scale"),
                ),
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n += 1
    graph.lint()
    program.gm.recompile()
    return n


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and constant-folding noise; keep it in the log."""
    buf = io.StringIO()
    noisy = [
        logging.getLogger(n)
        for n in (
            "torch.onnx",
            "torch.onnx._internal.exporter._registration",
            "torch.onnx._internal.exporter._core",
            "onnxscript",
        )
    ]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buf),
            contextlib.redirect_stderr(buf),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(noisy, levels, strict=True):
            lg.setLevel(lvl)
    if buf.getvalue().strip():
        log.debug("exporter output:\n%s", buf.getvalue())


def save_pt2(program: Program, path: Path) -> None:
    ep = reexport(program)
    try:
        torch.export.save(ep, str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"saving {path.name} failed: {str(exc).splitlines()[0]}") from exc


def _expand_masks_for_ort(program: Program) -> Program:
    """ONNX Runtime's CPU Attention wants the mask's query dim to equal the query length, so a
    broadcast (B, 1, 1, S) padding mask is expanded to (B, 1, Sq, S) in a copy of the graph."""
    program = program.clone()
    graph = program.gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (
            SDPA,
            torch.ops.attnc.attention.default,
        ):
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        q = node.args[0]
        if val is None or val.dim() != 4 or val.shape[-2] != 1:
            continue
        with graph.inserting_before(node):
            sq = graph.call_function(torch.ops.aten.sym_size.int, (q, 2))
            full = graph.call_function(torch.ops.aten.expand.default, (mask, [-1, -1, sq, -1]))
        node.replace_input_with(mask, full)
    graph.lint()
    program.gm.recompile()
    return program


def export_onnx(program: Program, path: Path, opset: int = 23) -> dict:
    """Export to ONNX with dynamic dims kept, check it, and return a summary of its ops."""
    import onnx

    import attnc.kernels

    program = _expand_masks_for_ort(program)
    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    shapes = program.dynamic_shapes() if program.dynamic_dims else None
    try:
        with _quiet(), torch.no_grad():
            onnx_program = torch.onnx.export(
                program.gm,
                program.example_args,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=shapes,
                input_names=list(program.input_names),
                output_names=["output"],
                custom_translation_table=attnc.kernels.translation_table(),
                external_data=False,
                # the exporter's default rewrites fuse RoPE into ONNX RotaryEmbedding, which ONNX
                # Runtime rejects for batch > 1 (its cos/sin caches keep batch 1); keep them off
                # and run only onnxscript's folding/DCE optimizer
                optimize=False,
                verbose=False,
            )
            _basic_optimize(onnx_program)
            onnx_program.save(str(path))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"ONNX export failed: {first[:300]}", "run with --debug for details"
        ) from exc
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"the exported ONNX file fails the checker: {str(exc).splitlines()[0]}"
        ) from exc
    return onnx_summary(model)


def _basic_optimize(onnx_program) -> None:
    """Constant folding and dead-code removal, with no fusion rewrites."""
    try:
        import onnxscript.optimizer as opt

        opt.optimize_ir(onnx_program.model, num_iterations=2)
    except (ImportError, AttributeError, TypeError) as exc:  # pragma: no cover - older onnxscript
        log.info("onnxscript optimizer unavailable (%s); exporting unoptimized", exc)


def onnx_summary(model) -> dict:
    ops = Counter(n.op_type for n in model.graph.node)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "attention_nodes": ops.get("Attention", 0),
        "softmax_nodes": ops.get("Softmax", 0),
        "nodes": sum(ops.values()),
        "initializer_bytes": size,
        "inputs": dims,
        "op_counts": dict(sorted(ops.items())),
    }
