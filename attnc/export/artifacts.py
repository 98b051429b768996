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
from typing import Any

import torch

from attnc.capture.program import Program, reexport
from attnc.errors import ExportError
from attnc.export import onnx_fixes
from attnc.graph.sites import SDPA, sdpa_args

log = logging.getLogger(__name__)


def lower_dense(program: Program) -> int:
    """Route every remaining SDPA node (without dropout) through `attnc::attention` (Triton on
    CUDA), in place, by `attnc.graph.replace`: the call keeps its inputs, flag and scale."""
    import attnc.kernels  # noqa: F401  (registers the ops)
    from attnc.graph.replace import replace_attention_node

    graph = program.gm.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != SDPA:
            continue
        if float(sdpa_args(node).get("dropout_p", 0.0) or 0.0) != 0.0:
            continue
        replace_attention_node(program.gm, node, torch.ops.attnc.attention.default)
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
    """Save the program as a `.pt2` that takes its inputs by name
    (`torch.export.load(path).module()(input_ids=..., attention_mask=...)`), with named dims, and
    whose bytes are the same on every identical build."""
    from attnc.export.deploy import fix_serialization_id, strip_provenance

    ep = reexport(program, by_keyword=True)
    strip_provenance(ep)
    from attnc.export.pt2_stream import streaming
    from attnc.output import safe_writer

    try:
        # through Python, not torch's own file writer: on a full disk that one throws from its
        # destructor and aborts the process; safe_writer raises an OSError naming the file.
        # streaming: each weight written from its storage, no bytes copy (pt2_stream)
        with safe_writer(path) as f, streaming():
            torch.export.save(ep, f)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"saving {path.name} failed: {str(exc).splitlines()[0]}") from exc
    fix_serialization_id(path)


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


def export_onnx(
    program: Program,
    path: Path,
    opset: int = 23,
    *,
    metadata: dict[str, str] | None = None,
    sentence_embedding: Any = None,
    seq_hint: int | None = None,
    external_data: bool | None = None,
) -> dict:
    """Export to ONNX with dynamic dims kept (named `batch`/`sequence`), inputs and outputs named
    as the source names them, `metadata` as `metadata_props`, and with `sentence_embedding` (a
    `deploy.Pooling`) the pooled embedding as a second output; check it, return a summary."""
    import attnc.kernels  # noqa: F401  (registers the attnc:: ops)
    from attnc.export import deploy

    program = _expand_masks_for_ort(program)
    program = onnx_fixes.prepare_for_onnx(program)  # K/V head broadcast, int histc
    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    module, output_names = program.gm, list(program.output_names)
    if sentence_embedding is not None:
        mask_index = program.input_names.index("attention_mask")
        module = deploy.SentenceEmbedding(program.gm, mask_index, sentence_embedding)
        output_names.append("sentence_embedding")
    from attnc.kernels import window_blocked

    try:  # pattern ops pick their ONNX form by a cost rule at `seq_hint` (the target length)
        with window_blocked.onnx_seq_hint(seq_hint), window_blocked.recording_forms() as forms:
            onnx_program = _torch_onnx_export(program, module, output_names, opset)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"ONNX export failed: {first[:300]}", "run with --debug for details"
        ) from exc
    from attnc.export import external_data as ext

    external = ext.wanted(program.gm, external_data)  # weights past the protobuf limit
    try:
        with _quiet():  # external: tensor by tensor into model.onnx.data, no in-memory proto
            if external:  # torch's mapped weights paged out as the data file is written
                ext.save_external(onnx_program.model, path, list(program.gm.parameters()))
            else:
                onnx_program.save(str(path), external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"saving {path.name} failed: {str(exc).splitlines()[0]}") from exc
    del onnx_program
    model = ext.load_graph(path)  # the graph only: external weights stay on disk
    deploy.name_onnx_dims(model, program)
    deploy.strip_onnx_stack_traces(model)
    deploy.set_metadata(model, metadata or {})
    ext.save_graph(model, path)
    ext.check(path)
    from attnc.export.ort_dtypes import cpu_compute_copy, widen_unsupported_bf16

    widened, cpu_copy = [], None
    low = _source_dtype(program) in (torch.bfloat16, torch.float16)
    if low:  # the file keeps the source's bf16/fp16; ORT on CPU verifies a float32-compute copy
        copy = path.with_name(path.stem + ".cpu-fp32-compute.onnx")
        nodes = cpu_compute_copy(path, copy)
        if nodes is not None:
            cpu_copy, widened = copy.name, nodes
            log.warning(
                "%s keeps bf16/fp16, which ONNX Runtime's CPU build cannot run (%d nodes): it is "
                "verified through a float32-compute copy; deploy it on CUDA, or rebuild with "
                "--dtype float32 for ONNX Runtime on CPU", path.name, len(nodes)
            )
    else:
        widened = widen_unsupported_bf16(path)  # bf16 islands ORT's CPU build cannot run
    if widened:
        model = ext.load_graph(path)
    summary = onnx_summary(model)
    summary["initializer_bytes"] = ext.initializer_bytes(model)
    summary["layout"] = ext.layout(path, model)
    summary["bf16_nodes_run_in_fp32"] = [] if cpu_copy else widened
    summary["cpu_fp32_compute_copy"] = (
        {"file": cpu_copy, "nodes_widened": len(widened)} if cpu_copy else None
    )
    summary["target_length"] = seq_hint
    summary["attention_forms"] = _site_forms(program, forms)
    return summary


def _site_forms(program: Program, forms: list[dict]) -> list[dict]:
    """The recorded forms of the last export attempt, one per attnc pattern op in graph order
    (the exporter translates nodes in that order), named by their node."""
    nodes = [n.name for n in program.gm.graph.nodes if n.op == "call_function"
             and getattr(n.target, "namespace", "") == "attnc"
             and n.target.__name__.split(".")[0] in {f["op"] for f in forms}]
    last = forms[-len(nodes):] if nodes and len(forms) >= len(nodes) else forms
    if len(last) == len(nodes):
        return [{"node": n, **f} for n, f in zip(nodes, last, strict=True)]
    return last


def _source_dtype(program: Program) -> torch.dtype | None:
    """The floating dtype most of the program's weight bytes are in."""
    by: Counter = Counter()
    for t in program.gm.parameters():
        if t.is_floating_point():
            by[t.dtype] += t.numel() * t.element_size()
    return by.most_common(1)[0][0] if by else None


def _torch_onnx_export(program: Program, module, output_names: list[str], opset: int):
    """torch.onnx.export with named, tied dims; with the exporter's own unnamed ones if that
    fails (the dims are then renamed in the file)."""
    import attnc.kernels

    attempts = [True, False] if program.dim_ranges and program.dynamic_dims else [False]
    for named in attempts:
        shapes = program.dynamic_shapes(named=named) if program.dynamic_dims else None
        if shapes is not None and not isinstance(module, torch.fx.GraphModule):
            shapes = (shapes,)  # forward(*inputs)
        try:
            return _export_once(program, module, output_names, opset, shapes, attnc.kernels)
        except Exception as exc:  # noqa: BLE001
            if not named:
                raise
            log.warning(
                "ONNX export with named dims failed (%s); retrying with unnamed ones",
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc,
            )
    raise AssertionError("unreachable")


def _export_once(program, module, output_names, opset, shapes, kernels):
    with _quiet(), torch.no_grad():
        onnx_program = torch.onnx.export(
            module,
            program.example_args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            input_names=list(program.input_names),
            output_names=output_names,
            custom_translation_table={
                **kernels.translation_table(),
                **onnx_fixes.translations(),  # MoE grouped matmuls
            },
            external_data=False,
            # the exporter's default rewrites fuse RoPE into ONNX RotaryEmbedding, which ONNX
            # Runtime rejects for batch > 1 (its cos/sin caches keep batch 1); keep them off
            # and run only onnxscript's folding/DCE optimizer
            optimize=False,
            verbose=False,
        )
        _basic_optimize(onnx_program)
    return onnx_program


def _basic_optimize(onnx_program) -> None:
    """Constant folding and dead-code removal, with no fusion rewrites."""
    try:
        import onnxscript.optimizer as opt

        opt.optimize_ir(onnx_program.model, num_iterations=2)
    except (ImportError, AttributeError, TypeError) as exc:  # pragma: no cover - older onnxscript
        log.info("onnxscript optimizer unavailable (%s); exporting unoptimized", exc)


def op_types(graph):
    """Every node's op type in `graph` and in its nodes' subgraphs (a Loop body)."""
    for n in graph.node:
        yield n.op_type
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                yield from op_types(g)


def onnx_summary(model) -> dict:
    ops = Counter(op_types(model.graph))  # a tiled neighborhood's Softmax sits in a Loop body
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    dims = {i.name: shape(i) for i in model.graph.input}
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "attention_nodes": ops.get("Attention", 0),
        "softmax_nodes": ops.get("Softmax", 0),
        "nodes": sum(ops.values()),
        "initializer_bytes": size,
        "inputs": dims,
        "outputs": {o.name: shape(o) for o in model.graph.output},
        "op_counts": dict(sorted(ops.items())),
    }
