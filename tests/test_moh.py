"""moh against the unmodified model: active 1.0 leaves the program alone, every router with all
heads on (binary gates) is exact, fused and plain gates agree, the pass fires and stays quiet,
each token runs exactly `active` heads, distillation never touches the model's weights, loss
importance ranks a planted useless head last, the back-off un-routes sites (or raises `active`)
until the bound is met, the routed program re-exports and matches ONNX Runtime, and the
head-skipping kernel (Triton interpreter) matches the plain-PyTorch reference."""

from __future__ import annotations

import hf_models
import pytest
import torch

import attnc.passes.moh as M
from attnc.capture.program import capture, reexport
from attnc.errors import PassError, RecipeError
from attnc.kernels import routed_attention as R
from attnc.load.calibration import CalibrationConfig, CalibrationData, generated_batches
from attnc.load.models import wrap_hf
from attnc.recipe.manager import PassContext


@pytest.fixture(scope="module")
def llama():
    loaded = wrap_hf(hf_models.build("llama"), "llama", None, None)
    program = capture(loaded)
    batches = generated_batches(loaded.example_args, loaded.input_names,
                                CalibrationConfig(samples=8, batch_size=4))
    ctx = PassContext(calibration=CalibrationData(batches, batches[:1], "generated"))
    return loaded, program, ctx


def _run(program, args):
    with torch.no_grad():
        out = program(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


def _all_on(decisions):
    for d in decisions:
        if d.action == "route":
            d.metrics["active_heads"] = d.metrics["heads"]
    return decisions


def test_active_one_is_identity(llama):
    loaded, program, ctx = llama
    ds = M.plan(program, M.MoHConfig(active=1.0), ctx)
    assert ds and all(d.action == "keep" for d in ds)
    assert M.apply(program, ds, M.MoHConfig(active=1.0)) is program


@pytest.mark.parametrize("router,fuse", [("query-norm", True), ("linear", True),
                                         ("linear", False)])
def test_all_heads_on_is_exact(llama, router, fuse):
    loaded, program, ctx = llama
    cfg = M.MoHConfig(active=0.5, router=router, fuse=fuse)
    ds = _all_on(M.plan(program, cfg, ctx))
    out = M.apply(program, ds, cfg)
    ops = [str(n.target) for n in out.gm.graph.nodes]
    assert any("routed_attention" in o for o in ops) == fuse
    assert torch.equal(_run(out, loaded.example_args), _run(program, loaded.example_args))


def test_fires_and_routes_k_heads_per_token(llama):
    loaded, program, ctx = llama
    cfg = M.MoHConfig(active=0.5, shared=0.25)
    ds = M.plan(program, cfg, ctx)
    routed = [d for d in ds if d.action == "route"]
    assert len(routed) == len(program.sites)
    for d in routed:
        H, k = d.metrics["heads"], d.metrics["active_heads"]
        assert k == M.head_counts(H, 0.5, 0.25)[0] < H
        assert abs(sum(d.metrics["load"]) - k) < 1e-3  # each token runs exactly k heads
        assert all(d.metrics["load"][h] == 1.0 for h in d.metrics["shared_heads"])
    ref = _run(program, loaded.example_args)
    fused = _run(M.apply(program, ds, cfg), loaded.example_args)
    plain = _run(M.apply(program, ds, M.MoHConfig(active=0.5, shared=0.25, fuse=False)),
                 loaded.example_args)
    assert not torch.allclose(fused, ref, atol=1e-4)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    from attnc.recipe.manager import config_dict
    from attnc.report.section import PassSection

    md = M.render_report(PassSection("moh", config_dict(cfg), 1.0, tuple(ds), "moh_")).markdown
    assert f"{len(routed)} of {len(ds)} site(s) routed" in md and "load per head" in md


def test_stays_quiet_and_validates(llama):
    loaded, program, ctx = llama
    ds = M.plan(program, M.MoHConfig(active=0.5, layers="0"), ctx)
    assert [d.action for d in ds].count("route") == 1
    assert all(d.reason == "not selected by layers/modules" for d in ds if d.action == "skip")
    with pytest.raises(RecipeError):
        M.MoHConfig(active=0.0).validate()
    with pytest.raises(RecipeError):
        M.MoHConfig(router="oracle").validate()
    with pytest.raises(PassError):
        M.plan(program, M.MoHConfig(active=0.5), PassContext())
    assert M.head_counts(4, 0.875, 0.5) == (4, 2) and M.head_counts(12, 0.75, 0.5) == (9, 6)


def test_distill_keeps_weights_and_never_worsens(llama):
    loaded, program, ctx = llama
    before = {k: v.clone() for k, v in program.gm.state_dict().items()}
    cfg = M.MoHConfig(active=0.5, shared=0.25, router="query-norm", distill_steps=4)
    ds = M.plan(program, cfg, ctx)
    out = M.apply(program, ds, cfg)
    after = program.gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original: untouched
    routed = out.gm.state_dict()
    assert all(torch.equal(before[k], routed[k]) for k in before)  # the routed copy's weights too
    assert any(k.startswith("attnc_moh_") for k in routed.keys() - before.keys())  # router
    for d in (d for d in ds if d.action == "route"):
        assert len(d.metrics["distill_trail"]) > 1
        assert d.metrics["branch_rel_err"] <= d.metrics["before_distill"]["branch_rel_err"] + 1e-6


def _plant_useless_head(program, site, h: int):
    """A copy of `program` whose `site` head `h` adds nothing (its output-projection columns
    zeroed in a new parameter: the shared weights stay as they are)."""
    from attnc.passes.moh_calib import anchors

    work = program.clone()
    w_node = anchors(work.gm, site)[3]
    owner_path, _, attr = w_node.target.rpartition(".")
    owner = work.gm.get_submodule(owner_path) if owner_path else work.gm
    w = getattr(owner, attr).detach().clone()  # (E, H * Dv)
    dv = w.shape[1] // site.num_heads
    w[:, h * dv:(h + 1) * dv] = 0
    setattr(owner, attr, torch.nn.Parameter(w, requires_grad=False))
    return work


def test_loss_importance_ranks_a_planted_useless_head_last(llama):
    from attnc.passes.moh_importance import loss_importance

    loaded, program, ctx = llama
    site = program.sites[0]
    work = _plant_useless_head(program, site, 2)
    imp, info = loss_importance(work, work.sites, ctx.calibration.calib, max_batches=1)
    assert info["objective"].startswith("next-token NLL") and info["batches"] == 1
    assert abs(float(imp[site.node][2])) < 1e-5  # masking it changes no logit
    work.kind = "custom"  # the output-change loss: > 0 for every head that does something
    imp, _ = loss_importance(work, work.sites[:1], ctx.calibration.calib, max_batches=1)
    assert int(imp[site.node].argmin()) == 2 and float(imp[site.node][2]) < 1e-9
    assert bool((imp[site.node][[0, 1, 3]] > 0).all())
    cfg = M.MoHConfig(active=0.75, shared=0.5, importance="loss", layers="0")
    ds = M.plan(work, cfg, ctx)
    d = next(d for d in ds if d.action == "route")
    assert 2 not in d.metrics["shared_heads"] and d.metrics["importance_by"] == "loss"


def test_back_off_until_the_bound_is_met(llama):
    loaded, program, ctx = llama
    ref = _run(program, loaded.example_args)

    def evaluate(candidate):
        got = _run(candidate, loaded.example_args)
        return {"max_abs_diff": float((got - ref).abs().max())}

    bound = PassContext(calibration=ctx.calibration, evaluate=evaluate,
                        meets_bound=lambda m: m["max_abs_diff"] == 0.0)
    free = {d.site: d.metrics["branch_rel_err"]
            for d in M.plan(program, M.MoHConfig(active=0.5, back_off=0), bound)}
    assert len(free) == 2 and all(v > 0 for v in free.values())  # back_off 0: routes as asked
    ds = M.plan(program, M.MoHConfig(active=0.5), bound)  # only all heads meet it
    trail = ds[0].metrics["back_off"]
    assert [t["sites"] for t in trail] == [2, 1, 0] and [t["ok"] for t in trail] == [0, 0, 1]
    worst = max(free, key=free.get)  # the costliest site is un-routed first
    assert trail[0]["next"] == f"un-route {worst}"
    assert all(d.action == "keep" and "un-routed by the back-off" in d.reason for d in ds)
    assert M.apply(program, ds, M.MoHConfig(active=0.5)) is program
    cfg = M.MoHConfig(active=0.5, back_off_by="active")  # 0.5 -> 0.75 -> 0.875 (4 of 4)
    ds = M.plan(program, cfg, bound)
    assert [t["active"] for t in ds[0].metrics["back_off"]] == [0.5, 0.75, 0.875]
    assert all(d.action == "keep" and "raised from 0.5 to 0.875" in d.reason for d in ds)
    ok = PassContext(calibration=ctx.calibration, evaluate=evaluate, meets_bound=lambda m: True)
    ds = M.plan(program, M.MoHConfig(active=0.5), ok)  # met at once: as asked, trail of one
    assert all(d.action == "route" and len(d.metrics["back_off"]) == 1 for d in ds)


@pytest.mark.slow
def test_weighted_distilled_exports_to_onnx(llama, tmp_path):
    from attnc.check.fidelity import ort_runner
    from attnc.export.artifacts import export_onnx

    loaded, program, ctx = llama
    cfg = M.MoHConfig(active=0.5, shared=0.25, router="linear", gates="weighted",
                      distill_steps=5)
    ds = M.plan(program, cfg, ctx)
    for d in (d for d in ds if d.action == "route"):  # distillation keeps its best checkpoint
        assert d.metrics["distill_trail"]
        assert d.metrics["branch_rel_err"] <= d.metrics["before_distill"]["branch_rel_err"] + 1e-6
    out = M.apply(program, ds, cfg)
    reexport(out)  # dynamic batch and sequence survive the edits
    path = tmp_path / "moh.onnx"
    export_onnx(out, path)
    want = _run(out, loaded.example_args)
    for optimize in (True, False):
        got = ort_runner(str(path), out.input_names, optimize=optimize)(*loaded.example_args)
        got = torch.as_tensor(got[0] if isinstance(got, (list, tuple)) else got)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("B,H,HK,SQ,SKV,D,causal", [
    (1, 4, 2, 7, 7, 32, True),
    (2, 2, 1, 33, 20, 80, False),
    (1, 3, 3, 40, 40, 64, True),
])
def test_kernel_matches_reference(B, H, HK, SQ, SKV, D, causal):
    g = torch.Generator().manual_seed(SQ)
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((H, SQ), (HK, SKV), (HK, SKV)))
    gate = (torch.rand(B, H, SQ, generator=g) > 0.5).float() * 1.5
    gate[:, 0, :16] = 0  # a whole query block of head 0 is skipped
    out = R.routed_attention_fwd(q, k, v, gate, is_causal=causal, block_m=16, block_n=16)
    ref = R.routed_attention_ref(q, k, v, gate, None, causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.ops.attnc.routed_attention(q, k, v, gate, None, causal),
                               ref, atol=2e-5, rtol=0)
    assert R.skipped_fraction(gate, 16) > 0
