"""token-pruning on a tiny random Hugging Face LLaVA (CLIP 32x32 canvas, 8x8 patches: 16 image
tokens; 3-layer Llama with GQA): keep-all, FastV's selection, the pruned model against the
unmodified one with the dropped tokens masked as keys after the pruning layer (RoPE positions,
masks), letterbox padding, the trend fits, and the ONNX export in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnc.capture.program import capture
from attnc.graph.calls import read_call
from attnc.graph.gather import kept_positions, node_values
from attnc.load.calibration import Batch
from attnc.load.models import wrap_hf
from attnc.passes.token_pruning import TokenPruningConfig, plan, prune_tokens
from attnc.passes.token_pruning_select import fit_trend
from attnc.recipe.manager import PassContext

IMG, BOS, N_IMG, LAYER = 5, 1, 16, 0


def _model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, projection_dim=32),
        text_config=tf.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=BOS, eos_token_id=2),
        image_token_index=IMG, image_seq_length=N_IMG, vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=0,
    )
    model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    return model.eval()


def _inputs(seed: int, text: tuple[int, ...], letterbox: bool):
    """Two left-padded rows `<bos> <image>*16 text`, the second one token shorter; pixels with
    content in [0.5, 1] (letterbox: top and bottom 8-pixel bars of the pad value 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = [[BOS] + [IMG] * N_IMG + list(text), [BOS] + [IMG] * N_IMG + list(text[1:])]
    n = max(map(len, rows))
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r), 1
    pix = 0.5 + 0.5 * torch.rand(2, 3, 32, 32, generator=g)
    if letterbox:
        pix[:, :, :8] = 0.0
        pix[:, :, 24:] = 0.0
    return ids, mask, pix


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = _model()
    loaded = wrap_hf(model, "llava", None, None)
    program = capture(loaded)
    return model, program


def _masked_reference(model, args, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """The unmodified HF model with every token outside `keep` masked as a key in the decoder
    layers after `layer`: what pruning must compute at the kept positions."""
    ids, mask, pix = args
    B, S = ids.shape
    kept = torch.zeros(B, S, dtype=torch.bool)
    kept[torch.arange(B)[:, None], keep] = True
    hooks = []

    def pre(mod, a, kw):
        m = kw.get("attention_mask")
        if m is None:
            m = torch.ones(S, S, dtype=torch.bool).tril()[None, None].expand(B, 1, S, S)
        if m.dtype == torch.bool:
            m = m & kept[:, None, None, :]
        else:
            m = m.masked_fill(~kept[:, None, None, :], float("-inf"))
        kw["attention_mask"] = m
        return a, kw

    for i, layer_mod in enumerate(model.model.language_model.layers):
        if i > layer:
            hooks.append(layer_mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    finally:
        for h in hooks:
            h.remove()
    return out.gather(1, keep[..., None].expand(-1, -1, out.shape[-1]))  # (B, S', V)


def _fastv(program, args, layer: int, r: int) -> torch.Tensor:
    """FastV's kept positions: last-row attention at the layer, mean over heads, top-r image
    tokens, plus every text token; sorted."""
    site = [s for s in program.sites if s.causal][layer]
    node = next(n for n in program.gm.graph.nodes if n.name == site.node)
    call = read_call(node)
    got = node_values(program.gm, args, [call.q, call.k] + ([call.mask] if call.mask else []))
    q, k = got[call.q.name], got[call.k.name]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * call.scale  # (B, H, S, S)
    if call.mask is not None:
        s = s.masked_fill(~got[call.mask.name], float("-inf"))
    a = s.softmax(-1)[:, :, -1].mean(1)  # (B, S)
    ids = args[0]
    out = []
    for b in range(ids.shape[0]):
        img = (ids[b] == IMG).nonzero().flatten()
        top = img[a[b, img].topk(r).indices]
        text = (ids[b] != IMG).nonzero().flatten()
        out.append(torch.cat([text, top]).sort().values)
    return torch.stack(out)


def test_keep_all_is_exact(setup):
    model, program = setup
    args = _inputs(1, (7, 8, 9), letterbox=False)
    cfg = TokenPruningConfig(layer=LAYER, keep=1.0, padding_mask="off")
    decisions = plan(program, cfg, PassContext())
    assert [d.action for d in decisions] == ["keep", "skip", "skip"]  # the pass leaves it be
    pruned = prune_tokens(program, cfg)[0]  # the gather itself at keep-all: the identity
    assert (kept_positions(pruned.gm, args) == torch.arange(args[0].shape[1])).all()
    torch.testing.assert_close(pruned(*args), program(*args), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "scorer,op", [("last-token", "rows"), ("last-token", "colsum"), ("text-tokens", "rows")]
)
def test_fastv_selection_and_pruned_numerics(setup, scorer, op):
    model, program = setup
    args = _inputs(2, (7, 8, 9, 10), letterbox=False)
    cfg = TokenPruningConfig(layer=LAYER, keep=5, scorer=scorer, padding_mask="off", score_op=op)
    pruned, p, _ = prune_tokens(program, cfg)
    keep = kept_positions(pruned.gm, args)
    S = args[0].shape[1]
    assert keep.shape == (2, S - N_IMG + 5)
    assert (keep.diff(dim=1) > 0).all()  # sorted, distinct
    if scorer == "last-token":
        assert torch.equal(keep, _fastv(program, args, LAYER, 5))
    out = pruned(*args)
    assert out.shape[1] == keep.shape[1]
    torch.testing.assert_close(out, _masked_reference(model, args, keep, LAYER),
                               rtol=1e-4, atol=1e-4)


def test_padding_tokens_rank_last(setup):
    model, program = setup
    args = _inputs(3, (7, 8, 9), letterbox=True)  # grid rows 0 and 3 are padding: 8 valid
    ids = args[0]
    valid_idx = torch.arange(4, 12)  # image-token indices of the valid cells
    for r in (3, 12):
        cfg = TokenPruningConfig(layer=LAYER, keep=r, padding_mask="auto")
        pruned, p, info = prune_tokens(program, cfg)
        assert p.padding and info["padding_mask"] == "from the letterbox bars"
        keep = kept_positions(pruned.gm, args)
        for b in range(2):
            img_pos = (ids[b] == IMG).nonzero().flatten()
            kept_img = [int((img_pos == k).nonzero()) for k in keep[b] if ids[b, k] == IMG]
            valid_kept = [i for i in kept_img if i in valid_idx.tolist()]
            assert len(valid_kept) == min(r, 8)  # the live count is min(R, valid)
            if r <= 8:  # no padded token kept while a valid one is dropped
                assert len(kept_img) == len(valid_kept)
        # the padded slots kept to fill R = 12 are dead keys: as if dropped
        if r == 12:
            live = keep.clone()
            real = [[k for k in keep[b].tolist() if ids[b, k] != IMG or int(
                (ids[b, :k + 1] == IMG).sum()) - 1 in valid_idx.tolist()] for b in range(2)]
            ref = _masked_reference(model, args, torch.tensor(real), LAYER)
            out = pruned(*args)
            for b in range(2):
                at = [live[b].tolist().index(k) for k in real[b]]
                torch.testing.assert_close(out[b, at], ref[b], rtol=1e-4, atol=1e-4)


def test_registered_and_validated():
    from attnc.errors import RecipeError
    from attnc.recipe.manager import get_pass

    assert get_pass("token-pruning").config_cls is TokenPruningConfig
    for bad in ({"keep": 0.0}, {"keep": 1.5}, {"keep": 0}, {"debias": "linear"},
                {"scorer": "first"}, {"padding_mask": "maybe"}, {"score_op": "eager"}):
        with pytest.raises(RecipeError):
            TokenPruningConfig(**bad).validate()


def test_trend_fit_on_the_trend_gives_constant_scores():
    i = np.arange(64, dtype=np.float64)
    ok = np.ones(64, dtype=bool)
    ok[:5] = False  # padding positions are left out of the fit
    exp_trend = 0.3 * np.exp(0.021 * i)
    w, info = fit_trend("exponential", exp_trend, ok)
    assert w[0] == pytest.approx(1.0) and (np.diff(w) < 0).all()
    assert np.ptp(exp_trend * w) / np.mean(exp_trend * w) < 1e-5
    assert info["residual_cv"] < 1e-5 < info["raw_cv"]
    cubic = 1 + 3e-3 * i - 1.4e-5 * i**2 + 2.5e-8 * i**3
    w, _ = fit_trend("cubic", cubic, ok)
    assert w[0] == pytest.approx(1.0)
    assert np.ptp(cubic * w) / np.mean(cubic * w) < 1e-5


def test_debias_is_fitted_on_calibration_and_stored(setup):
    model, program = setup
    batches = [Batch(_inputs(s, (7, 8, 9), letterbox=False), None) for s in (4, 5)]

    class Calib:
        calib, holdout, source = batches, [], "test"

    cfg = TokenPruningConfig(layer=LAYER, keep=0.5, debias="exponential")
    ctx = PassContext(calibration=Calib())
    pruned, p, info = prune_tokens(program, cfg, ctx)
    assert p.weights is not None and p.weights.shape == (N_IMG,)
    assert float(p.weights[0]) == pytest.approx(1.0)
    assert info["trend"]["calibration_sequences"] == 4
    bufs = dict(pruned.gm.named_buffers())
    assert any("token_pruning_trend" in k for k in bufs)
    out = pruned(*batches[0].args)
    assert torch.isfinite(out).all()
    assert out.shape[1] == batches[0].args[0].shape[1] - N_IMG + 8


def test_plan_travels_as_json_and_the_report_section(setup, tmp_path):
    """decide -> report.json -> apply: the decisions are plain JSON (no private keys), apply
    rebuilds the plan from them (trend weights exact), and the report section renders it."""
    import json
    from dataclasses import asdict

    from attnc.passes.token_pruning import apply
    from attnc.recipe.manager import Decision
    from attnc.report.write import render_pass

    model, program = setup
    batches = [Batch(_inputs(s, (7, 8, 9), letterbox=True), None) for s in (4, 5)]

    class Calib:
        calib, holdout, source, images = batches, [], "test", "real (4 image files)"

    cfg = TokenPruningConfig(layer=LAYER, keep=0.25, debias="cubic")
    decisions = plan(program, cfg, PassContext(calibration=Calib()))
    text = json.dumps([asdict(d) for d in decisions])  # no default=: must be plain JSON
    assert "_plan" not in text
    back = [Decision(**d) for d in json.loads(text)]
    m = back[LAYER].metrics
    assert back[LAYER].action == "prune" and m["keep"] == 4 and m["padding"] is True
    assert m["calibration_images"] == "real (4 image files)"
    kept = m["kept_on_calibration"]
    assert kept["sequences"] == 4 and kept["valid_image_tokens"]["max"] == 8
    assert kept["kept_image_tokens"] == {"mean": 4.0, "min": 4, "max": 4}
    assert kept["kept_padding_tokens"]["max"] == 0  # R = 4 < 8 valid: no padding kept
    assert kept["kept_share_by_row_quarter"][0] == kept["kept_share_by_row_quarter"][3] == 0
    ref, p, _ = prune_tokens(program, cfg, PassContext(calibration=Calib()))
    assert m["trend_weights"] == [float(x) for x in p.weights]
    args = _inputs(8, (7, 8, 9), letterbox=True)
    torch.testing.assert_close(apply(program, back, cfg)(*args), ref(*args), rtol=0, atol=0)
    entry = {"pass_id": "token-pruning", "config": asdict(cfg), "seconds": 1.0,
             "decisions": json.loads(text)}
    _, part = render_pass(entry, "token-pruning-")
    md = part.markdown
    for want in ("layer (prune after)", "4 of 16", "cubic", "from the letterbox bars",
                 "real (4 image files)", "coefficients", "kept padding tokens",
                 "token-pruning-trend.svg"):
        assert want in md, want
    assert part.files["trend.svg"].startswith("<svg")


def _real_images(folder):
    """Real photographs shipped with scikit-learn (640x427), and a portrait crop of one."""
    import shutil

    sk = pytest.importorskip("sklearn.datasets")
    pil = pytest.importorskip("PIL.Image")
    src = Path(sk.__file__).parent / "images"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(src / name, folder / name)
    with pil.open(src / "china.jpg") as im:
        im.crop((100, 0, 340, 427)).save(folder / "china_portrait.png")
    return sorted(folder.iterdir())


def test_calibration_on_real_images(setup, tmp_path):
    """A folder of images and a JSONL of image + prompt rows calibrate the VLM: pixels
    letterboxed on the mean colour (so the pass finds the padding patches), the image token
    expanded, rows left-padded; the report says the images were real."""
    import json

    from attnc.errors import CalibrationError
    from attnc.load.calib_files import check_calibration_file
    from attnc.load.calibration import CalibrationConfig, load_calibration

    model, program = setup
    files = _real_images(tmp_path / "imgs")
    names, ex = program.input_names, program.example_args
    cfg = CalibrationConfig(samples=8, batch_size=2, holdout=0.0)
    check_calibration_file(tmp_path / "imgs")
    data = load_calibration(str(tmp_path / "imgs"), names=names, example_args=ex, cfg=cfg)
    assert data.images.startswith("real (3 image files") and data.num_samples == 6
    pix = torch.cat([b.args[2] for b in data.calib])  # (3, 3, 32, 32) sorted: china, portrait
    assert pix.shape == (3, 3, 32, 32)
    bar = pix.abs().le(0.02).all(1)  # (3, 32, 32): letterbox pixels
    assert bar[0, :5].all() and not bar[0, 8:24].any()  # landscape: bars top and bottom
    assert bar[1][:, :7].all() and not bar[1][8:24, 10:22].any()  # portrait: left and right
    rows = [{"image": f.name, "input_ids": [BOS, IMG, 7, 8, 9][: 5 - i]} for i, f in
            enumerate(files)]
    jl = tmp_path / "imgs" / "calib.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    check_calibration_file(jl)
    data = load_calibration(str(jl), names=names, example_args=ex, cfg=cfg)
    ids = data.calib[0].args[0]
    assert ids.shape == (2, 1 + N_IMG + 3) and (ids == IMG).sum(1).tolist() == [N_IMG] * 2
    assert ids[1, 0] == 0 and data.calib[0].args[1][1, 0] == 0  # left-padded
    decisions = plan(program, TokenPruningConfig(layer=LAYER, keep=0.25),
                     PassContext(calibration=data))
    m = decisions[LAYER].metrics
    assert m["calibration_images"].startswith("real (3 image files")
    assert m["kept_on_calibration"]["valid_image_tokens"]["min"] == 8  # landscape: 2 rows pad
    jl.write_text(json.dumps({"image": "missing.png", "input_ids": [BOS, IMG]}))
    with pytest.raises(CalibrationError, match="image file not found"):
        check_calibration_file(jl)
    jl.write_text(json.dumps({"image": files[0].name, "input_ids": [BOS, 7]}))
    with pytest.raises(CalibrationError, match="image token"):
        load_calibration(str(jl), names=names, example_args=ex, cfg=cfg)


def test_task_metrics_align_the_text_after_the_image(setup):
    """A build's VLM fidelity (bits/byte, agreement) reads the positions after the image, which
    a token-pruned output keeps in order: at keep-all they equal the unpruned model's."""
    from attnc.check.task import _text_after_image, task_metrics

    model, program = setup
    args = _inputs(10, (7, 8, 9, 10), letterbox=False)
    assert _text_after_image(args[0], args[1]) == 3  # the shorter row: 3 after its image
    batches = [Batch(args, args[1])]
    pruned = prune_tokens(program, TokenPruningConfig(layer=LAYER, keep=4))[0]
    m = task_metrics("vlm", pruned, program, batches)
    assert m["tokens"] == 2 * 2 and 0 < m["top1_agreement"] <= 1 and m["kl"] >= 0
    same = task_metrics("vlm", program, program, batches)
    assert same["kl"] == 0 and same["tokens"] > m["tokens"]


def test_llava_captured_with_dynamic_batch(setup):
    """LLaVA's image features no longer tie the batch (attnc.capture.hf_patches): batch and
    sequence are dynamic, and the program runs at batch 1 and 3."""
    model, program = setup
    assert program.dynamic_dims["pixel_values"] == {0: "batch"}
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
    ids, mask, pix = _inputs(9, (7, 8, 9), letterbox=False)
    for b in (1, 3):
        args = tuple(torch.cat([t, t])[:b] for t in (ids, mask, pix))
        with torch.no_grad():
            ref = model(input_ids=args[0], attention_mask=args[1], pixel_values=args[2]).logits
        torch.testing.assert_close(program(*args), ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_torch(setup, tmp_path):
    """The pruned LLaVA exports with dynamic batch and sequence, passes the full ONNX check and
    matches torch in ONNX Runtime at batch 1 and 2, two lengths, optimizations off and on."""
    import onnx
    import onnxruntime as ort

    from attnc.export.artifacts import export_onnx

    model, program = setup
    cfg = TokenPruningConfig(layer=LAYER, keep=0.25, padding_mask="auto")
    pruned = prune_tokens(program, cfg)[0]
    path = tmp_path / "model.onnx"
    export_onnx(pruned, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["pixel_values"][0] == "batch"
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        for seed, text, lb, b in ((6, (7, 8, 9), True, 2), (7, (7, 8, 9, 10, 11, 12), False, 2),
                                  (6, (7, 8, 9), True, 1), (7, (7, 8, 9, 10), False, 1)):
            args = tuple(t[:b] for t in _inputs(seed, text, letterbox=lb))  # lengths, batches
            got = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]
            want = pruned(*args)
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
