"""sink-calibration (ACT): the fused op's invariants against its S x S reference, the Triton kernel
(interpreter) against the reference on odd shapes, ONNX Runtime against torch, the trial runner
(knobs flipped in place, no recompile), and a planted harmful sink the search finds and fixes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import attnc.kernels
import attnc.passes.sink_calibration as P
from attnc.capture.program import capture
from attnc.errors import PassError
from attnc.kernels import sink_calibrated as SC
from attnc.load.calibration import Batch, CalibrationData
from attnc.load.models import from_module
from attnc.recipe.manager import PassContext
from attnc.recipe.trials import Objective, TrialRunner

OP = torch.ops.attnc.sink_calibrated_attention


def _qkv(B=2, H=4, Hkv=2, S=37, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, Hkv, Hkv))
    q[..., 0] += 3.0
    k[:, :, 5, 0] = 4.0  # key 5 soaks up attention: a hidden sink after the first
    k[:, :, 11, 0] = 3.0
    return q, k, v


def _padded_mask(B, S, pad_from):
    m = torch.ones(B, 1, S, S, dtype=torch.bool).tril()
    m[1, :, :, pad_from:] = False  # row 1: keys from pad_from on are padding
    return m


KNOBS = (torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.full((4,), 0.4), torch.full((4,), 0.05))


@pytest.mark.parametrize("mask,causal", [(None, True), ("pad", False)])
def test_identity_when_nothing_can_change(mask, causal):
    q, k, v = _qkv()
    m = _padded_mask(2, 37, 30) if mask else None
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
    en, bt, th = KNOBS
    for beta, thr in ((torch.ones(4), th), (bt, torch.ones(4)), (bt, torch.full((4,), 1.5))):
        assert torch.equal(OP(q, k, v, en, beta, thr, m, causal), base)
    assert torch.equal(OP(q, k, v, torch.zeros(4), bt, th, m, causal), base)
    out = OP(q, k, v, en, bt, th, m, causal)
    assert torch.equal(out[:, 1], base[:, 1])  # a head not selected is bit-identical
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-2  # and a selected one did change


def test_calibrated_probabilities_invariants():
    q, k, v = _qkv()
    m = _padded_mask(2, 37, 30)
    en, bt, th = KNOBS
    p, pp, S = SC.calibrated_probs(q, k, v, en, bt, th, m, False)
    assert S[:, [0, 2, 3]].any() and not S[:, 1].any()
    seen = p.sum(-1) > 0
    torch.testing.assert_close(pp.sum(-1)[seen], torch.ones(int(seen.sum())), atol=1e-5, rtol=0)
    assert (pp >= 0).all() and torch.equal(pp == 0, p == 0)  # causal zeros stay zero
    assert not S[1, :, 30:].any()  # padding is never a sink
    Sx = S[:, :, None, :].expand_as(p)
    torch.testing.assert_close(pp[Sx], 0.4 * p[Sx], rtol=1e-6, atol=0)  # exactly beta
    # the first detected sink: only the row's gain, the same as every other column not in S
    r = (p * m.expand_as(p)).sum(-2) / m.expand_as(p).sum(-2).clamp(min=1)
    for b in range(2):
        for h in (0, 2, 3):
            s0 = ((r[b, h] > 0.05) & m[b, 0].any(0)).nonzero().flatten()
            first = int(s0[0])
            assert not S[b, h, first]
            gain = pp[b, h, :, first] / p[b, h, :, first].clamp(min=1e-30)
            others = ~S[b, h] & (p[b, h] > 1e-20).all(0)
            others[first] = False
            if others.any():
                j = int(others.nonzero()[0])
                ratio = pp[b, h, j:, j] / p[b, h, j:, j]
                torch.testing.assert_close(gain[j:], ratio, rtol=1e-5, atol=0)
            assert (gain[first:] >= 1 - 1e-6).all()
    ref = SC.sink_calibrated_attention_ref(q, k, v, en, bt, th, m, False)
    torch.testing.assert_close(OP(q, k, v, en, bt, th, m, False), ref, atol=1e-5, rtol=1e-5)


def test_padding_rows_and_keys_change_nothing():
    """A padded row gives, on its real tokens, what the unpadded sequence gives."""
    q, k, v = _qkv(B=1, S=29)
    en, bt, th = KNOBS
    want = OP(q, k, v, en, bt, th, None, True)
    g = torch.Generator().manual_seed(3)
    pad = 8
    qp, kp, vp = (torch.cat([t, 5 * torch.randn(*t.shape[:2], pad, t.shape[-1], generator=g)], 2)
                  for t in (q, k, v))
    qp[:, :, 29:, 0] = 50.0  # padded queries lean hard on key 5: they must not count
    m = torch.ones(1, 1, 37, 37, dtype=torch.bool).tril()
    m[..., 29:] = False
    m[:, :, 29:, :29] = True  # padded query rows see the real keys (as HF masks do)
    got = OP(qp, kp, vp, en, bt, th, m, False)
    torch.testing.assert_close(got[:, :, :29], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S,D,mask_kind,causal", [(37, 24, "bool", False), (21, 40, None, True),
                                                 (19, 16, "float", True)])
def test_triton_kernel_matches_reference(S, D, mask_kind, causal):
    from attnc.kernels import sink_calibrated_triton as T

    q, k, v = _qkv(B=2, H=3, Hkv=3, S=S, D=D, seed=S)
    m = None
    if mask_kind:
        m = _padded_mask(2, S, S - 4)
        if mask_kind == "float":
            m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
    bt, th = torch.tensor([0.4, 0.0, 0.7]), torch.tensor([0.05, 0.08, 0.03])
    out, S_tri = T.calibrated(q, k, v, bt, th, m, causal, None)
    _, _, S_ref = SC.calibrated_probs(q, k, v, torch.ones(3), bt, th, m, causal)
    want = SC.sink_calibrated_attention_ref(q, k, v, torch.ones(3), bt, th, m, causal)
    assert torch.equal(S_tri, S_ref) and S_ref.any()
    got = torch.where(S_ref.any(-1)[..., None, None], out, want)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


class _OpModel(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        en, bt, th = KNOBS
        self.register_buffer("en", en)
        self.register_buffer("bt", bt)
        self.register_buffer("th", th)
        self.causal = causal

    def forward(self, q, k, v, m=None):
        return OP(q, k, v, self.en, self.bt, self.th, m, self.causal)


def _onnx_mask(kind, B, S):
    if kind is None:
        return None
    m = _padded_mask(B, S, S - 6)
    if kind == "dead_rows":  # padded query rows that see nothing at all
        m[1, :, S - 6:, :] = False
    return torch.zeros(m.shape).masked_fill(~m, -1e9) if kind == "float" else m


def test_float_mask_counts_like_bool():
    """A float mask's -1e9 entries are not seen: the same sinks and output as the bool mask."""
    q, k, v = _qkv(S=33)
    m = _padded_mask(2, 33, 27)
    f = torch.zeros(m.shape).masked_fill(~m, -1e9)
    en, bt, th = KNOBS
    assert torch.equal(OP(q, k, v, en, bt, th, m, False), OP(q, k, v, en, bt, th, f, False))
    ref_b = SC.sink_calibrated_attention_ref(q, k, v, en, bt, th, m, False)
    ref_f = SC.sink_calibrated_attention_ref(q, k, v, en, bt, th, f, False)
    assert torch.equal(ref_b, ref_f)


@pytest.mark.parametrize("mask,causal,hkv", [("bool", False, 2), (None, True, 2),
                                             ("float", False, 4), ("dead_rows", True, 2)])
def test_onnx_matches_torch_in_ort(tmp_path, mask, causal, hkv):
    """The export (Attention's output and probabilities, sink columns by TopK) against the
    torch op at another length than the export's, graph optimizations off and on."""
    pytest.importorskip("onnxruntime")
    from onnx_sessions import ort_sessions

    q, k, v = _qkv(B=2, Hkv=hkv, S=21, D=16)
    m = _onnx_mask(mask, 2, 21)
    S = torch.export.Dim("S", min=2, max=4096)
    dyn = ({2: S}, {2: S}, {2: S}) + (() if m is None else ({2: S, 3: S},))
    args = (q, k, v) if m is None else (q, k, v, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_OpModel(causal), args, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=dyn, verbose=False)
    path = tmp_path / "sink.onnx"
    prog.save(str(path))
    ops, sessions = ort_sessions(path)
    assert {"TopK", "GatherElements"} <= ops  # the sink columns are gathered, not masked S x S
    q2, k2, v2 = _qkv(B=2, Hkv=hkv, S=33, D=16, seed=4)  # another length than the export's
    m2 = _onnx_mask(mask, 2, 33)
    args2 = (q2, k2, v2) if m2 is None else (q2, k2, v2, m2)
    want = _OpModel(causal)(*args2)
    base = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=m2, is_causal=causal,
                                          enable_gqa=True)
    assert (want - base).abs().max() > 1e-2
    for sess in sessions:
        feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), args2, strict=True)}
        got = torch.from_numpy(sess.run(None, feeds)[0])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ a planted harmful sink

V, BOS, SINK = 12, 0, 1


class PlantedSinkLM(torch.nn.Module):
    """One attention layer over one-hot tokens, two heads. Rows are BOS, SINK, then one token t
    repeated; the next token is t, read from the earlier t tokens' values. In head 0 the SINK
    token soaks up attention (as much as BOS) and its value is noise: a harmful hidden sink.
    Head 1 has BOS as its only sink (nothing for ACT to change there)."""

    def __init__(self, c: float = 2.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        u = torch.ones(V)
        self.q = torch.nn.Parameter(u.expand(2, V, V).clone())  # the same query for every token
        k = torch.zeros(2, V, V)
        k[:, BOS] = c * u / u.dot(u)
        k[0, SINK] = c * u / u.dot(u)
        self.k = torch.nn.Parameter(k)
        v = torch.eye(V).expand(2, V, V).clone()
        v[:, BOS] = 0
        v[0, SINK] = 3.0 * torch.randn(V, generator=g)
        v[1, SINK] = 0
        self.v = torch.nn.Parameter(v)

    def forward(self, input_ids):
        x = F.one_hot(input_ids, V).float()  # (B, S, V)
        q, k, v = (torch.einsum("bsv,hvd->bhsd", x, w) for w in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)  # (B, 2, S, V)
        return 4.0 * o.sum(1)  # logits (B, S, V)


def _rows(n, s, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(2, V, (n, 1), generator=g).expand(n, s - 2)
    return torch.cat([torch.full((n, 1), BOS), torch.full((n, 1), SINK), t], 1)


def _planted(kind="causal-lm"):
    loaded = from_module(PlantedSinkLM(), (_rows(2, 24, 9),))
    loaded.kind = kind
    program = capture(loaded)
    program.kind = kind
    batches = [Batch((_rows(8, 24, i),), None) for i in range(4)]
    return program, PassContext(calibration=CalibrationData(batches, batches[:1], "tensors"))


def test_planted_sink_is_found_and_fixed():
    program, ctx = _planted()
    cfg = P.SinkCalibrationConfig()
    ds = P.plan(program, cfg, ctx)
    (d,) = ds
    assert d.action == "calibrate" and d.metrics["enable"] == [1.0, 0.0], d.metrics["heads"]
    h0, h1 = d.metrics["heads"]
    assert h0["single_change"] < -0.05 and h0["kept"]
    assert h1["single_change"] == 0.0 and not h1["kept"]  # only BOS is a sink: nothing changes
    s = d.metrics["search"]
    assert s["selected"] == [h0["name"]] and s["combined_change"] < -0.05
    assert len(s["trail"]) == s["trials"] == 3  # two single-head trials, one greedy check
    out = P.apply(program, ds, cfg)
    assert [x.pattern for x in out.sites] == ["sink_calibrated"]
    b = ctx.calibration.holdout[0]
    nll = [P.next_token_nll(prog(*b.args), b) for prog in (program, out)]
    assert nll[1][0] < nll[0][0] * 0.9  # the calibrated model predicts better
    from attnc.report.section import PassSection

    md = P.render_report(PassSection("sink-calibration", {}, 0.0, tuple(ds), "x-")).markdown
    assert h0["name"] in md and "selected 1 head" in md


def test_trials_flip_buffers_without_recompile():
    program, ctx = _planted()
    work, knobs = P.calibrated_program(program, program.sites, P.SinkCalibrationConfig())
    (name,) = knobs
    buf, code = knobs[name], work.gm.code
    obj = Objective(P.next_token_nll, "nll", higher_is_better=False)
    runner: TrialRunner = ctx.trials(work, obj, knobs, budget=2)
    t = runner.run("h0", {name: [1.0, 0.0]})
    assert t.gain > 0 and t.batches == len(runner.search) == 2
    assert work.gm.code == code and knobs[name] is buf and buf.tolist() == [0.0, 0.0]
    assert runner.run("h1", {name: [0.0, 1.0]}).gain == 0.0
    assert runner.run("again", {name: [1.0, 1.0]}) is None  # the budget is spent
    assert [r["name"] for r in runner.trail()] == ["h0", "h1"]


def test_objective_refused_or_from_file(tmp_path):
    program, ctx = _planted(kind="custom")
    with pytest.raises(PassError, match="needs an objective that measures improvement"):
        P.plan(program, P.SinkCalibrationConfig(), ctx)
    f = tmp_path / "metric.py"
    f.write_text("def acc(out, batch):\n    ids = batch.args[0]\n"
                 "    return float((out[:, 2:-1].argmax(-1) == ids[:, 3:]).float().mean())\n")
    ds = P.plan(program, P.SinkCalibrationConfig(objective=f"{f}:acc"), ctx)
    assert ds[0].metrics["search"]["objective"].startswith("metric.py:acc")
