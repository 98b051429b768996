"""Autotuning: one config under the interpreter, pinning, the persistent cache, the cost model."""

from __future__ import annotations

import pytest
import torch

from attnc.errors import KernelError
from attnc.kernels import autotune
from tests.kernels.conftest import GPU


def _q(s=128):
    return torch.zeros(1, 2, s, 64), torch.zeros(1, 1, s, 64)


@pytest.mark.skipif(GPU, reason="interpreter behaviour")
def test_interpreter_uses_exactly_one_config():
    assert autotune.candidates(64, torch.float16, 4096, 4096) == [autotune.INTERPRETER_CONFIG]
    q, k = _q()
    calls = []
    cfg = autotune.choose("x", q, k, False, False, lambda c: calls.append(c))
    assert cfg == autotune.INTERPRETER_CONFIG and calls == []


def test_gpu_candidates_are_pruned(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    big = autotune.candidates(128, torch.bfloat16, 8192, 8192)
    assert 1 < len(big) <= 8
    f32 = autotune.candidates(128, torch.float32, 8192, 8192)
    assert all(c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 64 for c in f32)
    assert all(c["BLOCK_M"] <= 64 for c in autotune.candidates(64, torch.float16, 32, 32))


def test_pin_config(monkeypatch):
    q, k = _q()
    monkeypatch.setenv("ATTNC_PIN_CONFIG", "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2")
    assert autotune.choose("x", q, k, False, False, None)["BLOCK_N"] == 32
    monkeypatch.setenv("ATTNC_PIN_CONFIG", "BLOCK_M=64")
    with pytest.raises(KernelError):
        autotune.choose("x", q, k, False, False, None)
    monkeypatch.delenv("ATTNC_PIN_CONFIG")
    autotune.pin_config({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1})
    try:
        assert autotune.choose("x", q, k, False, False, None)["BLOCK_M"] == 16
    finally:
        autotune.pin_config(None)


def test_variants_are_crossed_with_configs_and_pinned_gets_the_first(monkeypatch):
    q, k = _q()
    variants = [{"na_loop": "lists"}, {"na_loop": "class"}]
    monkeypatch.setenv("ATTNC_PIN_CONFIG", "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2")
    assert autotune.choose("x", q, k, False, False, None, variants=variants)["na_loop"] == "lists"
    monkeypatch.setenv("ATTNC_PIN_CONFIG",
                       "BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2,na_loop=class")
    cfg = autotune.choose("x", q, k, False, False, None, variants=variants)
    assert cfg == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2,
                   "na_loop": "class"}


def test_tune_keeps_the_fastest_and_skips_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "time_config", lambda fn: fn())
    cost = {("a", "lists"): 3.0, ("a", "class"): 1.5, ("b", "lists"): 2.0}

    def bench(cfg):
        def run():
            if (cfg["t"], cfg["na_loop"]) not in cost:
                raise RuntimeError("out of resources")
            return cost[cfg["t"], cfg["na_loop"]]
        return run

    cands = [{"t": t, "na_loop": n} for t in "ab" for n in ("lists", "class")]
    best = autotune.tune("op|k", cands, bench)
    assert best == {"t": "a", "na_loop": "class"}
    assert autotune._load()["op|k"] == best


def test_tune_never_picks_a_candidate_that_computes_something_else(tmp_path, monkeypatch):
    """The fastest candidate is dropped when its output is not the default's."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    timing = {"default": 2.0, "wrong": 0.5, "right": 1.0}
    monkeypatch.setattr(autotune, "time_config", lambda fn: timing[fn.name])
    ref = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16)
    outs = {"default": ref, "wrong": ref * 1.1, "right": ref.float().add(1e-3).bfloat16()}

    def bench(cfg):
        def run():
            return outs[cfg["v"]]
        run.name = cfg["v"]
        return run

    best = autotune.tune("op|k2", [{"v": "default"}, {"v": "wrong"}, {"v": "right"}], bench)
    assert best == {"v": "right"}


def test_agrees():
    x = torch.randn(4, 8)
    assert autotune.agrees(x, x.clone())
    assert not autotune.agrees(x + 0.01, x)
    assert not autotune.agrees(x[:2], x)
    y = x.clone()
    y[0, 0] = float("-inf")
    assert not autotune.agrees(y, x)
    assert autotune.agrees(x.bfloat16(), x.bfloat16().float().add(1e-3).bfloat16())


def test_cache_key_and_persistence(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    q, k = _q(1000)
    key = autotune.cache_key("flash-dense", q, k, True, False)
    assert "flash-dense" in key and "sq1024" in key and "torch.float32" in key
    assert "triton" in key and autotune._sources_hash() in key
    assert key != autotune.cache_key("flash-dense", q.half(), k.half(), True, False)
    autotune._store(key, {"BLOCK_M": 64})
    assert autotune._load()[key] == {"BLOCK_M": 64}
    assert autotune.cache_path().parent == tmp_path


def test_cost_model():
    assert autotune.dense_is_cheaper(256, 256, 0.1)
    assert not autotune.dense_is_cheaper(32768, 32768, 0.06)
    assert autotune.dense_is_cheaper(2048, 2048, 0.95)
