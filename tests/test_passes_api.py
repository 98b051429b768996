"""The pass manager: passes are found through entry points, registering one twice is an error,
failures name the pass and what ran before it, and every run is recorded in the history."""

from __future__ import annotations

from dataclasses import dataclass

import hf_models
import pytest

from attnc.capture.program import capture
from attnc.errors import PassError, RecipeError
from attnc.load.models import wrap_hf
from attnc.recipe.manager import (
    Decision,
    PassContext,
    PassInfo,
    get_pass,
    list_passes,
    register_pass,
    run_passes,
    unregister_pass,
)
from attnc.recipe.schema import PassStep, parse_recipe


@dataclass(frozen=True)
class _Cfg:
    pass


def _noop_plan(program, cfg, ctx):
    return [Decision(s.module, "keep", "test pass", {}) for s in program.sites]


def _boom_plan(program, cfg, ctx):
    raise ValueError("kaboom")


def test_entry_point_discovery_and_duplicates():
    ids = [p.id for p in list_passes()]
    assert "llm-drop" in ids
    with pytest.raises(RuntimeError, match="registered twice"):
        register_pass(get_pass("llm-drop"))
    with pytest.raises(RecipeError, match="unknown pass id"):
        get_pass("no-such-pass")


@pytest.fixture
def noop_and_boom():
    """Two throwaway passes, unregistered afterwards (another test may register the same ids)."""
    register_pass(PassInfo("api-noop", _Cfg, _noop_plan, lambda p, d, c: p, True, "noop"))
    register_pass(PassInfo("api-boom", _Cfg, _boom_plan, lambda p, d, c: p, True, "boom"))
    try:
        yield
    finally:
        unregister_pass("api-noop")
        unregister_pass("api-boom")


def test_failures_name_the_pass_and_history_records_runs(noop_and_boom):
    program = capture(wrap_hf(hf_models.build("gpt2"), "gpt2", None, None))
    steps = [PassStep("api-noop", _Cfg()), PassStep("api-boom", _Cfg())]
    with pytest.raises(PassError, match=r"kaboom while running 'api-boom' after \['api-noop'\]"):
        run_passes(program.clone(), steps, PassContext())
    out, results = run_passes(program.clone(), steps[:1], PassContext())
    assert [r.pass_id for r in out.history] == ["api-noop"]
    assert len(results[0].decisions) == len(program.sites) and not results[0].decisions[0].fired


def test_recipe_checks_keys_types_and_selectors():
    r = parse_recipe(
        {
            "version": 1,
            "passes": [{"id": "llm-drop", "count": 2, "layers": "0-3"}],
            "fidelity": {"min_cosine": 0.9},
        }
    )
    assert r.passes[0].config.count == 2 and r.fidelity.min_cosine == 0.9
    for bad, msg in (
        ({"version": 1, "passes": [{"id": "llm-drop", "count": 1.5}]}, "not a valid value"),
        ({"version": 1, "passes": [{"id": "llm-drop", "layers": "3-1"}]}, "bad layer selector"),
        ({"version": 1, "passes": [{"id": "llm-drop", "mode": "twice"}]}, "not one of"),
        ({"version": 1, "passes": [], "fidelity": {"min_cosine": 2}}, "within"),
        ({"version": 1, "passes": [], "calibration": {"holdout": 1.0}}, "holdout"),
        ({"version": 1, "passes": [{"count": 1}]}, "needs an 'id'"),
    ):
        with pytest.raises(RecipeError, match=msg):
            parse_recipe(bad)
