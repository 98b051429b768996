"""The report is method-free: each pass renders its own section and plots through
`PassInfo.report`; a pass without a renderer gets a table of its decisions; the core names no pass.
No model is built here: the report is written from report dicts (fast)."""

from __future__ import annotations

import json
import xml.dom.minidom
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnc.errors import PassError, RecipeError
from attnc.recipe.manager import Decision, PassInfo, get_pass, register_pass, unregister_pass
from attnc.report.plots import bar_svg, curve_svg
from attnc.report.section import PassSection, ReportPart, decisions_table
from attnc.report.write import render_markdown, write_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _Cfg:
    min_mass: float = 0.9


def _plan(program, cfg, ctx):
    return []


def _apply(program, decisions, cfg):
    return program


def _curves(section: PassSection) -> ReportPart:
    """A sparse-like renderer: one kept-mass-versus-density curve per site."""
    series = {d.site: d.metrics["curve"] for d in section.decisions}
    svg = curve_svg(series, "kept mass versus density", "density", "kept mass", xlim=(0, 1),
                    ylim=(0, 1), marks=[(0.25, 0.97, "window")])
    md = f"rewrote {sum(d.fired for d in section.decisions)} site(s)\n\n" \
         f"![curves]({section.file('curves.svg')})"
    return ReportPart(md, {"curves.svg": svg, "raw.bin": b"\x00\x01"})


@pytest.fixture
def fake_passes():
    infos = [
        PassInfo("test-curves", _Cfg, _plan, _apply, False, "curves", report=_curves),
        PassInfo("test-plain", _Cfg, _plan, _apply, True, "no renderer"),
        PassInfo("test-boom", _Cfg, _plan, _apply, True, "bad renderer",
                 report=lambda s: 1 / 0),
        PassInfo("test-badname", _Cfg, _plan, _apply, True, "bad file name",
                 report=lambda s: ReportPart("x", {"../evil.svg": "<svg/>"})),
    ]
    for info in infos:
        register_pass(info)
    try:
        yield
    finally:
        for info in infos:
            unregister_pass(info.id)


def _entry(pass_id: str, decisions: list[Decision], config=None) -> dict:
    return {"pass_id": pass_id, "config": config or {"min_mass": 0.9}, "seconds": 0.25,
            "decisions": [vars(d) for d in decisions]}


def _report(passes: list[dict]) -> dict:
    return {
        "model": {"source": "fake", "kind": "text", "inputs": ["input_ids"], "dynamic_dims": {},
                  "params_before": 10, "params_after": 8},
        "sites_before": [], "sites_after": [], "candidates": [],
        "calibration": {"source": "fake", "calib_batches": 1, "holdout_batches": 1},
        "passes": passes,
        "verification": {"comparisons": {"torch": {"cosine": 0.999}}, "bound": {},
                         "ok": True},
        "artifacts": [], "versions": {"torch": "x"}, "seconds": 1.0,
    }


_CURVE = [(0.1, 0.6), (0.25, 0.97), (0.5, 0.99), (1.0, 1.0)]


def _sites():
    return [Decision("layers.0.attn", "window", "kept 0.97 at density 0.25",
                     {"curve": _CURVE, "density": 0.25}),
            Decision("layers.1.attn", "keep", "sequence 64: dense is cheaper",
                     {"curve": _CURVE[::-1], "density": 1.0})]


def test_renderer_section_and_plot_file(fake_passes, tmp_path):
    write_report(_report([_entry("test-curves", _sites())]), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Pass `test-curves` (0.2 s)" in md and "rewrote 1 site(s)" in md
    assert "![curves](test-curves-curves.svg)" in md
    svg = (tmp_path / "test-curves-curves.svg").read_text()
    dom = xml.dom.minidom.parseString(svg)
    assert len(dom.getElementsByTagName("polyline")) == 2
    assert "layers.0.attn" in svg and "window" in svg
    assert (tmp_path / "test-curves-raw.bin").read_bytes() == b"\x00\x01"
    # its own section replaces the generic table; report.json keeps the decisions as data
    assert "| site | action | reason" not in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passes"][0]["decisions"][0]["metrics"]["density"] == 0.25


def test_pass_without_renderer_gets_the_decisions_table(fake_passes, tmp_path):
    assert get_pass("test-plain").report is None
    write_report(_report([_entry("test-plain", _sites())]), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Pass `test-plain`" in md
    # scalar metrics become columns, a list (the curve) does not
    assert "| site | action | reason | density |" in md
    assert "| layers.1.attn | keep | sequence 64: dense is cheaper | 1 |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_repeated_pass_files_do_not_clash(fake_passes, tmp_path):
    entries = [_entry("test-curves", _sites()), _entry("test-curves", _sites()[:1])]
    write_report(_report(entries), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (tmp_path / "test-curves-curves.svg").exists()
    assert (tmp_path / "test-curves-2-curves.svg").exists()
    assert "](test-curves-2-curves.svg)" in md and md.count("## Pass `test-curves`") == 2


def test_renderer_failures_name_the_pass(fake_passes, tmp_path):
    with pytest.raises(PassError, match="while rendering the report section of pass 'test-boom'"):
        render_markdown(_report([_entry("test-boom", _sites())]))
    with pytest.raises(PassError, match="names a report file '../evil.svg'"):
        write_report(_report([_entry("test-badname", _sites())]), tmp_path)
    assert not (tmp_path.parent / "evil.svg").exists()


def test_unknown_pass_falls_back_to_the_table_and_unregister(fake_passes):
    md = render_markdown(_report([_entry("test-gone", _sites())]))
    assert "| site | action | reason | density |" in md
    with pytest.raises(RecipeError, match="not registered"):
        unregister_pass("test-gone")
    with pytest.raises(RuntimeError, match="registered twice"):
        register_pass(get_pass("test-plain"))


def test_llm_drop_renders_its_own_section(tmp_path):
    decisions = [
        Decision("attention@layers.0", "keep", "similarity 0.9000, rank 2 of 2: kept",
                 {"cosine": 0.9, "rank": 2,
                  "auto_trail": [{"count": 1, "cosine": 0.995, "ok": True},
                                 {"count": 2, "cosine": 0.95, "ok": False}]}),
        Decision("attention@layers.1", "drop", "similarity 0.9900, rank 1 of 2: dropped",
                 {"cosine": 0.99, "rank": 1, "removed_params": 4160, "removed_tensors": 8,
                  "removed_modules": ["layers.1.attn"]}),
    ]
    entry = _entry("llm-drop", decisions, {"target": "attention", "count": "auto"})
    write_report(_report([entry]), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "dropped 1 of 2 scored sublayer(s), 4,160 parameters removed." in md
    assert "| attention@layers.1 | drop | similarity 0.9900, rank 1 of 2: dropped | 4160 |" in md
    assert "automatic count search:" in md and "| 2 | 0.95 | False |" in md
    assert "![similarity per sublayer](llm-drop-similarity.svg)" in md
    svg = (tmp_path / "llm-drop-similarity.svg").read_text()
    xml.dom.minidom.parseString(svg)
    assert svg.count('fill="#d62728"') == 1  # the dropped sublayer, in red
    assert not (tmp_path / "similarity.svg").exists()


def test_core_names_no_pass():
    files = [*sorted((ROOT / "attnc/report").glob("*.py")), ROOT / "attnc/build.py",
             ROOT / "attnc/build_steps.py"]
    assert len(files) >= 4
    for path in files:
        text = path.read_text()
        for word in ("llm-drop", "llm_drop", "similarity.svg", "auto_trail"):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word!r}"


def test_plot_helpers():
    assert bar_svg([], "t") == "" and curve_svg({"a": [(float("nan"), 1.0)]}, "t", "x", "y") == ""
    svg = bar_svg([("a", 0.5), ("b", float("nan"), True)], "t & u", hi=1.0, legend="red: b")
    xml.dom.minidom.parseString(svg)
    assert "t &amp; u" in svg and ">nan<" in svg and "axis from 0 to 1" in svg
    many = curve_svg({f"head {i}": _CURVE for i in range(30)}, "t", "x", "y")
    xml.dom.minidom.parseString(many)
    assert many.count("<polyline") == 30 and "more</text>" in many
    section = PassSection.from_entry(_entry("x", _sites()), "x-")
    assert decisions_table(section, ["density"]).splitlines()[0] == \
        "| site | action | reason | density |"


def test_stages_section_names_the_peak_stage():
    r = _report([])
    r["model"]["weights_bytes"] = 2_000_000_000
    r["stages"] = [
        {"stage": "load", "seconds": 1.0, "rss_bytes": 1_000_000_000,
         "peak_rss_bytes": 1_100_000_000},
        {"stage": "verify onnx runtime", "seconds": 9.5, "rss_bytes": 2_000_000_000,
         "peak_rss_bytes": 3_000_000_000},
        {"stage": "report", "seconds": 0.1, "rss_bytes": 1_500_000_000,
         "peak_rss_bytes": 3_000_000_000},
    ]
    md = render_markdown(r)
    assert "## Time and memory per stage" in md
    assert "| verify onnx runtime | 9.5 | 2.00 | 3.00 |" in md
    assert "Peak resident memory 3.00 GB (1.50× the 2.00 GB of weights), first reached in " \
           "`verify onnx runtime`" in md
    r.pop("stages")
    assert "## Time and memory per stage" not in render_markdown(r)


def test_timeline_stages_and_their_seconds():
    from attnc import progress

    tl = progress.start_timeline()
    progress.stage("load")
    progress.stage("verify torch")
    assert progress.stage_seconds("load") is not None
    assert progress.stage_seconds("verify torch") is None  # still running
    progress.stage(None)
    assert [s["stage"] for s in tl.as_list()] == ["load", "verify torch"]
    assert all(s["seconds"] >= 0 and s["rss_bytes"] > 0 for s in tl.as_list())
    assert progress.stage_seconds("never") is None
