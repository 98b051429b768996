"""Less float32 at once in the float32-compute copy that ONNX Runtime's CPU build verifies a
bf16/fp16 model through (`ort_dtypes.cpu_compute_copy`).

That copy casts every low-precision weight to float32 just before the node that reads it. Two
such casts dominate its memory: the embedding table (cast whole to gather a few rows) and the
output projection (a vocabulary-wide float32 matrix, 0.2 GB at hidden 1536). Here, with the same
results:

- a `Gather` reads its low-precision table directly (Gather moves data, exact in any dtype) and
  only the gathered rows are cast;
- a `MatMul` whose weight's float32 copy passes `chunk_bytes` is split along the weight's last
  axis: `Slice` (low precision) -> `Cast` -> `MatMul` per chunk, one `Concat`. Each output element
  is the same dot product over the same axis; only a chunk's float32 copy is alive at a time (ORT's
  priority order runs the nodes in file order).
"""

from __future__ import annotations

import math


def narrow_weight_casts(model, chunk_bytes: int = 16 << 20) -> int:
    """Rewrite, in place, the weight Casts described in the module docstring; returns how many
    weights were rewritten."""
    import numpy as np
    from onnx import NodeProto, TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    low = {TensorProto.BFLOAT16, TensorProto.FLOAT16}
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    casts = {  # the float32 copy's name -> its Cast, for Casts of one low-precision initializer
        n.output[0]: n for n in graph.node
        if n.op_type == "Cast" and n.input[0] in inits and inits[n.input[0]].data_type in low
        and uses.get(n.output[0]) == 1
        and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)
    }
    drop: set[int] = set()
    extra_inits = []
    out_nodes = []
    done = 0
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in casts:
            cast = casts[node.input[0]]
            drop.add(id(cast))
            wide = node.output[0]
            node.input[0] = cast.input[0]
            node.output[0] = f"{wide}__low"
            out_nodes += [node, helper.make_node("Cast", [node.output[0]], [wide],
                                                 to=TensorProto.FLOAT, name=f"{node.name}__f32")]
            done += 1
            continue
        w = inits.get(casts[node.input[1]].input[0]) if (
            node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in casts) else None
        if w is None or len(w.dims) != 2 or w.dims[0] * w.dims[1] * 4 <= chunk_bytes:
            out_nodes.append(node)
            continue
        cast = casts[node.input[1]]
        drop.add(id(cast))
        cols = int(w.dims[1])
        parts = math.ceil(w.dims[0] * cols * 4 / chunk_bytes)
        step = math.ceil(cols / parts)
        pieces = []
        for j, lo in enumerate(range(0, cols, step)):
            tag = f"{node.name}__part{j}"
            bounds = [(f"{tag}_{k}", v) for k, v in (("lo", lo), ("hi", min(cols, lo + step)),
                                                     ("axis", 1))]
            extra_inits += [numpy_helper.from_array(np.array([v], np.int64), nm)
                            for nm, v in bounds]
            out_nodes += [
                helper.make_node("Slice", [w.name, *(nm for nm, _ in bounds)], [f"{tag}_w"],
                                 name=f"{tag}_slice"),
                helper.make_node("Cast", [f"{tag}_w"], [f"{tag}_wf"], to=TensorProto.FLOAT,
                                 name=f"{tag}_cast"),
                helper.make_node("MatMul", [node.input[0], f"{tag}_wf"], [f"{tag}_y"],
                                 name=f"{tag}_matmul"),
            ]
            pieces.append(f"{tag}_y")
        out_nodes.append(helper.make_node("Concat", pieces, list(node.output), axis=-1,
                                          name=f"{node.name}__concat"))
        done += 1
    if not done:
        return 0
    kept = []
    for n in out_nodes:  # copies: the originals leave the repeated field below
        if id(n) not in drop:
            kept.append(NodeProto())
            kept[-1].CopyFrom(n)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(extra_inits)
    return done
