"""One reader of attention calls (`attnc.graph.calls.read_call`, by the op's schema) and
`replace_attention` (issue 14, core items 1-2): SDPA read positionally and by keyword, every
`attnc::` op and hand-written regions read with their pattern and parameters, `lower_dense` sites
keep causality and scale, a tiny Llama site swapped to a sliding window stays exact, re-exports
with dynamic batch and sequence and matches ONNX Runtime, and `Program.clone` isolates edits."""

from __future__ import annotations

import math

import hf_models
import pytest
import torch
from torch import nn

import attnc.kernels  # noqa: F401  (registers the attnc:: ops)
from attnc.capture.canonicalize import canonicalize_attention
from attnc.capture.program import capture, reexport
from attnc.errors import CaptureError, PassError
from attnc.export.artifacts import lower_dense
from attnc.graph import calls
from attnc.graph.calls import (
    BlockSparse,
    Dense,
    Neighborhood,
    Region,
    SlidingWindowSink,
    read_call,
)
from attnc.graph.edit import prune
from attnc.graph.replace import replace_attention, replace_attention_node
from attnc.graph.sites import SDPA, find_sites, sdpa_args
from attnc.load.models import wrap_hf

ops = torch.ops.attnc
B, H, S, D = 2, 4, 17, 8


def _qkv(seed: int = 0, s: int = S, kv_heads: int = H):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, s, D, generator=g), torch.randn(B, kv_heads, s, D, generator=g),
            torch.randn(B, kv_heads, s, D, generator=g))


def _hand_graph(target, args_of, kwargs_of, inputs):
    """A graph of placeholders (meta val: the inputs) and one call of `target`."""
    g = torch.fx.Graph()
    ph = {}
    for name, t in inputs.items():
        ph[name] = g.placeholder(name)
        ph[name].meta["val"] = t
    node = g.call_function(target, args_of(ph), kwargs_of(ph))
    g.output(node)
    return torch.fx.GraphModule(torch.nn.Module(), g), node


def test_sdpa_read_positionally_and_by_keyword():
    q, k, v = _qkv(kv_heads=2)
    mask = torch.rand(B, 1, S, S) > 0.2
    ins = {"q": q, "k": k, "v": v, "m": mask}
    _, pos = _hand_graph(SDPA, lambda p: (p["q"], p["k"], p["v"], p["m"], 0.0, False),
                         lambda p: {"scale": 0.3, "enable_gqa": True}, ins)
    _, kw = _hand_graph(SDPA, lambda p: (p["q"],),
                        lambda p: {"key": p["k"], "value": p["v"], "attn_mask": p["m"],
                                   "scale": 0.3, "enable_gqa": True}, ins)
    a, b = read_call(pos), read_call(kw)
    for c in (a, b):
        assert c.op == "sdpa" and c.pattern == Dense() and c.pattern == "dense"
        assert (c.q.name, c.k.name, c.v.name, c.mask.name) == ("q", "k", "v", "m")
        assert (c.causal, c.is_causal, c.scale, c.enable_gqa) == (False, False, 0.3, True)
        assert (c.num_heads, c.num_kv_heads, c.head_dim, c.mask_kind) == (H, 2, D, "bool")
    named = lambda c: {k: getattr(x, "name", x) for k, x in c.arguments().items()}  # noqa: E731
    assert named(a) == named(b) and named(a)["dropout_p"] == 0.0
    _, causal = _hand_graph(SDPA, lambda p: (p["q"], p["k"], p["v"]),
                            lambda p: {"is_causal": True}, ins)
    c = read_call(causal)
    assert c.causal and c.mask is None and math.isclose(c.scale, D**-0.5)
    assert sdpa_args(pos)["attn_mask"].name == "m" and "scale" not in sdpa_args(causal)


def test_attnc_attention_read_by_schema_not_sdpa_positions():
    """attnc::attention(q, k, v, mask, is_causal, scale): position 5 is the scale, which SDPA's
    layout used to read as is_causal (every lowered encoder site became causal)."""
    q, k, v = _qkv()
    _, node = _hand_graph(ops.attention.default, lambda p: (p["q"], p["k"], p["v"], None, False,
                                                            0.3), lambda p: {}, {"q": q, "k": k,
                                                                                 "v": v})
    c = read_call(node)
    assert (c.op, c.causal, c.scale, c.mask) == ("attnc::attention", False, 0.3, None)
    assert sdpa_args(node)["is_causal"] is False and sdpa_args(node)["scale"] == 0.3
    _, node = _hand_graph(ops.attention.default, lambda p: (p["q"], p["k"], p["v"]),
                          lambda p: {"is_causal": True}, {"q": q, "k": k, "v": v})
    assert read_call(node).causal and find_sites(node.graph.owning_module)[0].causal


class _Op(nn.Module):
    def __init__(self, fn, layout=None):
        super().__init__()
        self.fn = fn
        if layout is not None:
            self.register_buffer("layout", layout)

    def forward(self, q, k, v):
        return self.fn(self, q, k, v)


def _exported_call(fn, layout=None, s: int = S, kv_heads: int = H):
    gm = torch.export.export(_Op(fn, layout), _qkv(s=s, kv_heads=kv_heads), strict=False).module()
    nodes = [n for n in gm.graph.nodes if read_call(n) is not None]
    assert len(nodes) == 1
    return gm, read_call(nodes[0])


LAYOUT = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)[None, None]


@pytest.mark.parametrize(
    ("fn", "want", "causal", "scale"),
    [
        (lambda m, q, k, v: ops.attention(q, k, v, None, True, 0.5), Dense(), True, 0.5),
        (lambda m, q, k, v: ops.attention_colsum(q, k, v, torch.ones(S, dtype=torch.bool))[0],
         Dense(), False, D**-0.5),
        (lambda m, q, k, v: ops.sliding_window_attention(q, k, v, 4, 2, False, 0.5, None,
                                                         [2, 3, -1, 4]),
         SlidingWindowSink(4, 2, False, (2, 3, -1, 4)), False, 0.5),
        (lambda m, q, k, v: ops.sliding_window_attention(q, k, v, window=5),
         SlidingWindowSink(5, 0, True, None), True, D**-0.5),
        (lambda m, q, k, v: ops.neighborhood_attention(q, k, v, [4, 4], [3, 3], [1, 1], [1, 1],
                                                       [False, False], 0.5, None, 1),
         Neighborhood((4, 4), (3, 3), (1, 1), (1, 1), (False, False), 1, None), False, 0.5),
        (lambda m, q, k, v: ops.neighborhood_attention(q, k, v, [-1], [5], [2], [1], [True],
                                                       head_kernel_size=[5, 3, -1, 5]),
         Neighborhood((-1,), (5,), (2,), (1,), (True,), 0, (5, 3, -1, 5)), True, D**-0.5),
        (lambda m, q, k, v: ops.block_sparse_attention(q, k, v, m.layout, 6, True, 0.5),
         BlockSparse(6, True, "layout", (1, 1, 3, 3), round(5 / 9, 6)), True, 0.5),
    ],
    ids=["attention", "colsum", "window-heads", "window-kw", "na2d-global", "na1d-heads",
         "block"],
)
def test_every_attnc_op_is_read_with_its_pattern(fn, want, causal, scale):
    gm, call = _exported_call(fn, LAYOUT if isinstance(want, BlockSparse) else None)
    assert call.op.startswith("attnc::") and call.pattern == want, (call.pattern, want)
    assert (call.causal, call.is_causal) == (causal, causal)
    assert math.isclose(call.scale, scale) and (call.num_heads, call.head_dim) == (H, D)
    assert [c.name for c in (call.q, call.k, call.v)] == ["q", "k", "v"]
    (site,) = find_sites(gm)
    assert site.pattern == want and site.pattern == want.name and site.causal == causal
    assert site.row()["pattern"] == str(want) and (str(want) == "dense") == (want == "dense")


def test_unregistered_attnc_attention_op_is_refused_until_registered():
    @torch.library.custom_op("attnc::toy_test_attention", mutates_args=())
    def toy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int) -> torch.Tensor:
        return q.clone()

    toy.register_fake(lambda q, k, v, width: torch.empty_like(q))
    q, k, v = _qkv()
    gm, node = _hand_graph(ops.toy_test_attention.default, lambda p: (p["q"], p["k"], p["v"], 3),
                           lambda p: {}, {"q": q, "k": k, "v": v})
    with pytest.raises(CaptureError, match="no attention reader"):
        find_sites(gm)
    calls.register_op("attnc::toy_test_attention",
                      lambda vals, n: SlidingWindowSink(vals["width"], 0, False))
    try:
        assert read_call(node).pattern == SlidingWindowSink(3, 0, False)
        assert find_sites(gm)[0].pattern.window == 3
    finally:
        calls._READERS.pop("attnc::toy_test_attention")


class _SoftCap(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.embed = nn.Embedding(64, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, idx):
        b, s = idx.shape
        x = self.embed(idx)
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        keep = (idx != 0)[:, None, None, :]
        sc = torch.tanh(q @ k.transpose(-1, -2) * self.d**-0.5 / 20.0) * 20.0
        sc = torch.where(keep, sc, torch.tensor(-1e9))
        y = torch.softmax(sc, dim=-1) @ v
        return x + self.out(y.transpose(1, 2).reshape(b, s, -1))


def test_region_is_read_and_not_replaced():
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (2, 12))
    gm = torch.export.export(_SoftCap().eval(), (ids,), strict=False).module()
    assert canonicalize_attention(gm)[0] == 0
    (node,) = [n for n in gm.graph.nodes if read_call(n) is not None]
    c = read_call(node)
    assert (c.op, c.pattern, c.score, c.softcap) == ("region", Region("soft-cap", 20.0),
                                                     "soft-cap", 20.0)
    assert c.pattern == "region" and (c.num_heads, c.head_dim, c.mask_kind) == (4, 8, "bool")
    assert math.isclose(c.scale, 8**-0.5) and c.q.meta["val"].shape == (2, 4, 12, 8)
    assert find_sites(gm)[0].pattern == Region("soft-cap", 20.0)
    with pytest.raises(PassError, match="soft-cap score"):
        replace_attention_node(gm, node, ops.attention.default)


def test_lowered_encoder_site_keeps_causal_false_and_its_scale():
    """A bidirectional site with its own scale: after lower_dense it still reads causal False
    and that scale (SDPA's positions read scale 0.3 as is_causal=True)."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
            m = mask[:, None, None, :].bool()
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, m, scale=0.3)
            return y.transpose(1, 2).reshape(b, s, 32)

    from attnc.load.models import LoadedModel

    x, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    program = capture(LoadedModel(Enc().eval(), (x, mask), ["x", "attention_mask"], "encoder",
                                  "test", None, None))
    before = program.sites
    ref = program(x, mask)
    assert lower_dense(program) == 1
    (site,) = program.sites
    assert (site.causal, site.scale, site.mask) == (False, 0.3, "bool") == (
        before[0].causal, before[0].scale, before[0].mask)
    assert read_call(program.gm.graph.find_nodes(op="call_function",
                                                 target=ops.attention.default)[0]).op == (
        "attnc::attention")
    torch.testing.assert_close(program(x, mask), ref, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def llama():
    """The tiny HF Llama, captured once: the tests below check that they leave it as it is."""
    loaded = wrap_hf(hf_models.build("llama"), "llama", None, None)
    return loaded, capture(loaded)


def _inputs(batch: int, seq: int, pad: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - pad:] = 0  # right padding on the last row
    return ids, mask


@pytest.mark.slow
def test_replace_llama_site_with_wide_window_is_exact_dynamic_and_exports(llama, tmp_path):
    from attnc.check.fidelity import ort_runner
    from attnc.export.artifacts import export_onnx

    loaded, program = llama
    before = program.sites
    graph_before = [(n.name, str(n.target)) for n in program.gm.graph.nodes]
    args = _inputs(2, 16, 5, 0)
    with torch.no_grad():
        ref = program(*args)
    out = replace_attention(program, before[0], ops.sliding_window_attention, window=64)
    after = out.sites
    assert after[0].pattern == SlidingWindowSink(64, 0, True) and after[0].pattern.window == 64
    assert after[0].row()["pattern"] == "sliding_window(window=64, num_sinks=0, causal=True)"
    assert after[1].pattern == "dense" and after[0].module == before[0].module
    keep = ("layer", "kind", "num_heads", "num_kv_heads", "head_dim", "causal", "scale", "mask",
            "q_proj", "o_proj", "residual_add", "block_style")
    assert [[getattr(s, f) for f in keep] for s in after] == [
        [getattr(s, f) for f in keep] for s in before]
    node = next(n for n in out.gm.graph.nodes if n.name == after[0].node)
    assert node.meta["nn_module_stack"] and isinstance(node.meta["val"].shape[0], torch.SymInt)
    # the original is untouched
    assert [(n.name, str(n.target)) for n in program.gm.graph.nodes] == graph_before
    assert program.sites == before
    torch.testing.assert_close(out(*args), ref, atol=1e-5, rtol=0)
    # re-export keeps batch and sequence dynamic: run at two other shapes
    ep = reexport(out).module()
    for batch, seq, pad in ((3, 9, 2), (4, 23, 6)):
        other = _inputs(batch, seq, pad, seq)
        with torch.no_grad():
            torch.testing.assert_close(ep(*other), program(*other), atol=1e-5, rtol=0)
    info = export_onnx(out, tmp_path / "m.onnx")
    assert isinstance(info["inputs"]["input_ids"][0], str)  # batch and sequence stay symbolic
    assert isinstance(info["inputs"]["input_ids"][1], str)
    run = ort_runner(str(tmp_path / "m.onnx"), out.input_names)
    for other in (args, _inputs(3, 11, 3, 1)):
        with torch.no_grad():
            assert (run(*other) - program(*other)).abs().max().item() <= 1e-4


def test_replace_checks_params_and_causality(llama):
    loaded, program = llama
    swa = "attnc::sliding_window_attention"
    cases = [
        (dict(windw=3), "no parameter 'windw'"),
        (dict(window="a"), "window='a'"),
        ({}, "needs the parameter 'window'"),
        (dict(window=0), "window must be >= 1"),
        (dict(window=4, is_causal=False), "is causal"),
        (dict(window=4, key_padding_mask=None), "cannot be set"),
    ]
    for params, msg in cases:
        with pytest.raises(PassError, match=msg) as err:
            replace_attention(program, 0, swa, **params)
        assert "\n" not in err.value.message
    with pytest.raises(PassError, match="no attention site 7"):
        replace_attention(program, 7, swa, window=4)
    # a narrow window with sinks: a real rewrite (not exact), read back with its parameters
    out = replace_attention(program, 1, swa, window=4, num_sinks=2)
    assert out.sites[1].pattern == SlidingWindowSink(4, 2, True)
    assert program.sites[1].pattern == Dense()
    args = loaded.example_args
    assert (out(*args) - program(*args)).abs().max() > 1e-3


def test_replace_with_a_layout_and_back_to_sdpa(llama):
    """A tensor parameter becomes a buffer of the graph; a failed in-place edit takes it out
    again; swapping back to SDPA keeps the (causal) mask without a second causal flag."""
    loaded, program = llama
    args = loaded.example_args
    layout = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    out = replace_attention(program, 0, ops.block_sparse_attention, layout=layout, block_size=4)
    pat = out.sites[0].pattern
    assert isinstance(pat, BlockSparse) and (pat.block_size, pat.causal, pat.density) == (
        4, True, 1.0)
    assert pat.layout_shape == (1, 1, 4, 4) and hasattr(out.gm, pat.layout)
    torch.testing.assert_close(out(*args), program(*args), atol=1e-5, rtol=0)
    back = replace_attention(out, 0, SDPA)
    node = next(n for n in back.gm.graph.nodes if n.target == SDPA)
    assert not sdpa_args(node).get("is_causal") and sdpa_args(node)["attn_mask"] is not None
    assert back.sites[0].pattern == "dense" and back.sites[0].causal
    assert not hasattr(back.gm, pat.layout)  # the layout left with its op
    torch.testing.assert_close(back(*args), program(*args), atol=1e-5, rtol=0)
    c = program.clone()
    names = [n.name for n in c.gm.graph.nodes]
    first = next(n for n in c.gm.graph.nodes if n.target == SDPA)
    with pytest.raises(PassError, match="is causal"):
        replace_attention_node(c.gm, first, ops.block_sparse_attention.default, layout=layout,
                               block_size=4, is_causal=False)
    assert [n.name for n in c.gm.graph.nodes] == names
    assert not any(b.startswith("attnc_layout") for b, _ in c.gm.named_buffers())


def test_clone_isolates_graph_meta_buffers_and_records(llama):
    loaded, program = llama
    args = loaded.example_args
    ref = program(*args)
    sites = program.sites
    nodes = list(program.gm.graph.nodes)
    metas = {n.name: {k: v for k, v in n.meta.items() if k != "val"} for n in nodes}
    stacks = {n.name: dict(n.meta.get("nn_module_stack") or {}) for n in nodes}
    (buf_name, buf), *_ = program.gm.named_buffers()
    buf_ref = buf.clone()
    dims = {k: dict(v) for k, v in program.dynamic_dims.items()}

    c = program.clone()
    for n in c.gm.graph.nodes:  # mutate what fx's graph copy used to share
        n.meta.get("nn_module_stack", {}).clear()
        n.meta["attnc_causal"] = "edited"
    dict(c.gm.named_buffers())[buf_name].mul_(0.5)
    c.dynamic_dims["input_ids"][1] = "edited"
    c.gm.register_buffer("attnc_extra", torch.ones(3))
    c = replace_attention(c, 0, ops.sliding_window_attention, window=2)
    replace_attention_node(c.gm, next(n for n in c.gm.graph.nodes if n.target == SDPA),
                           ops.attention.default)
    prune(c.gm)

    assert [n.name for n in program.gm.graph.nodes] == [n.name for n in nodes]
    assert {n.name: {k: v for k, v in n.meta.items() if k != "val"}
            for n in program.gm.graph.nodes} == metas
    assert {n.name: dict(n.meta.get("nn_module_stack") or {})
            for n in program.gm.graph.nodes} == stacks
    assert torch.equal(dict(program.gm.named_buffers())[buf_name], buf_ref)
    assert not hasattr(program.gm, "attnc_extra")
    assert program.dynamic_dims == dims and program.sites == sites
    torch.testing.assert_close(program(*args), ref, atol=0, rtol=0)
    # parameters are shared read-only, not copied
    assert next(program.gm.parameters()).data_ptr() == next(c.gm.parameters()).data_ptr()


def test_every_attnc_op_reads_back_without_its_pass():
    """A saved build must read back in a process that never imported the pass that wrote it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import attnc.kernels\n"
        "from attnc.graph.calls import is_attention_op\n"
        "ops = ['routed_attention', 'sink_calibrated_attention', 'sliding_window_attention',\n"
        "       'neighborhood_attention', 'block_sparse_attention']\n"
        "missing = [o for o in ops if not is_attention_op(getattr(torch.ops.attnc, o).default)]\n"
        "assert not any(m.startswith('attnc.passes') for m in sys.modules), 'a pass was imported'\n"
        "print(missing)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
