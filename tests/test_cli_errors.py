"""The command line under bad input and faults: every case runs the real `attnc` entry point and
checks the exit code, exactly one `error:` line, no traceback, and that nothing was left behind
(no `.attnc-` staging folder) or deleted (the user's files intact).

Usage errors, output-folder refusals and pre-load checks run in-process (no model is loaded: a
factory that leaves a mark when it runs proves it). Signals and a real EFBIG run a subprocess."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = "version: 1\npasses: []\ncalibration: {samples: 4, batch_size: 2}\n"
# the same without model.onnx (its export is most of a tiny build): for the builds whose point is
# the output folder or `attnc eval` (which runs model.pt2), not the ONNX file
NO_ONNX = FAST + "export: {onnx: false}\n"
NO_FILES = FAST + "export: {onnx: false, pt2: false}\n"  # with --no-save-original: no model file


def _build_args(spy, out, onnx: bool | None = True) -> list:
    """An optimize command line for the spy model (no speed step: these tests are not about it);
    `onnx=None`: a build that writes no model file (model.onnx, model.pt2, original.pt2)."""
    if onnx is None:
        return ["optimize", spy["spec"], "-r", spy["recipe_no_files"], "-o", out, "--no-bench",
                "--no-save-original"]
    recipe = spy["recipe"] if onnx else spy["recipe_no_onnx"]
    return ["optimize", spy["spec"], "-r", recipe, "-o", out, "--no-bench"]

def run(args, capsys) -> tuple[int, str, str]:
    from attnc.cli.main import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error(code, err, expect, match=None):
    assert code == expect, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1].startswith("error:"), err
    assert "Traceback" not in err, err
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Staging and swap folders (`.<name>.attnc-*`), not the marker file of a build."""
    return sorted(
        p.name for p in folder.rglob("*") if ".attnc-" in p.name and p.name != ".attnc-build"
    )


@pytest.fixture
def spy(tmp_path):
    """A factory file for the tiny nanoGPT that leaves a mark when it is imported or called."""
    d = tmp_path / "src" / "pkg"
    d.mkdir(parents=True)
    mark = tmp_path / "factory-ran"
    f = d / "spy.py"
    f.write_text(  # the mark is found from the file itself: the test moves the folders
        f"import sys\nfrom pathlib import Path\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import models\nMARK = Path(__file__).parents[2] / 'factory-ran'\n"
        "MARK.open('a').write('imported\\n')\n\n"
        "def make():\n    MARK.open('a').write('called\\n')\n"
        "    return models.make_nanogpt()\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FAST)
    no_onnx = tmp_path / "r-no-onnx.yaml"
    no_onnx.write_text(NO_ONNX)
    no_files = tmp_path / "r-no-files.yaml"
    no_files.write_text(NO_FILES)
    return {"spec": f"{f}:make", "file": f, "mark": mark, "recipe": recipe,
            "recipe_no_onnx": no_onnx, "recipe_no_files": no_files, "root": tmp_path}


# ----------------------------------------------------------------------------------------------
# every command-line parsing error: exit 2, one line (typer 0.29 vendors its own click)

USAGE = {
    "unknown option": (["optimize", "m.pt2", "-r", "r.yaml", "--bogus"], "No such option"),
    "missing --recipe": (["optimize", "m.pt2"], "Missing option '--recipe'"),
    "missing model": (["optimize", "-r", "r.yaml"], "Missing argument"),
    "option without value": (["optimize", "m.pt2", "-r"], "requires an argument"),
    "--samples abc": (["eval", "b", "--samples", "abc"], "Invalid value for '--samples'"),
    "--samples 0": (["eval", "b", "--samples", "0"], "Invalid value for '--samples'"),
    "--max-length x": (["eval", "b", "--max-length", "x"], "--max-length"),
    "unknown command": (["frobnicate"], "No such command"),
    "extra argument": (["passes", "extra"], "unexpected extra argument"),
    "unknown option, --debug after": (["passes", "--bogus", "--debug"], "--bogus"),
    "unknown option, --debug before": (["--debug", "passes", "--bogus"], "--bogus"),
    "inspect without model": (["inspect"], "Missing argument"),
    "eval without model": (["eval"], "Missing argument"),
    "unknown global option": (["--colour", "passes"], "No such option"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_2_on_one_line(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, match = USAGE[case]
    code, out, err = run(args, capsys)
    one_error(code, err, 2, match)
    assert "internal error" not in err and "--help" in err
    assert sorted(os.listdir(tmp_path)) == []


def test_bare_attnc_prints_help_on_stderr_and_exits_2(capsys):
    # as click does for a group with no command: the help on stderr, exit 2
    code, out, err = run([], capsys)
    one_error(code, err, 2, "missing command")
    assert "optimize" in err and "Usage" in err and out == ""


def test_version_help_and_global_flags_anywhere(capsys):
    from attnc import __version__

    code, out, err = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"attnc {__version__}"
    assert run(["--help"], capsys)[0] == 0
    for args in (["passes", "--debug"], ["passes", "-v"], ["--verbose", "passes", "--json"]):
        code, out, err = run(args, capsys)
        assert code == 0 and "error" not in err, (args, err)
        assert "llm-drop" in out


def test_global_flag_as_an_option_value_is_left_alone():
    from attnc.cli.main import hoist_global_flags

    assert hoist_global_flags(["optimize", "m", "-o", "--debug", "-v"]) == [
        "-v", "optimize", "m", "-o", "--debug"
    ]
    assert hoist_global_flags(["eval", "b", "--", "--debug"]) == ["eval", "b", "--", "--debug"]


def test_every_option_has_help():
    import typer.main

    from attnc.cli.main import app

    group = typer.main.get_command(app)
    for cmd in [group, *group.commands.values()]:
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option":
                assert (p.help or "").strip(), f"{cmd.name} {p.opts} has no help"
        if cmd is not group:
            assert (cmd.help or "").strip(), cmd.name


# ----------------------------------------------------------------------------------------------
# -o: refused before any work, the user's folder intact


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("mine\n")
    return path


def _fake_build(path: Path, extra: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "report.json").write_text('{"old": true}')
    (path / "model.onnx").write_bytes(b"old onnx")
    files = [".attnc-build", "model.onnx", "report.json"]
    (path / ".attnc-build").write_text(json.dumps({"tool": "attnc", "files": files}) + "\n")
    if extra:
        (path / extra).write_text("mine\n")
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


OUT_CASES = {
    "user folder": ("user", [], "not an attnc build"),
    "input's folder": ("src", [], "holds the input"),
    "input's folder with --force": ("src", ["--force"], "holds the input"),
    "folder holding the input's folder": ("root", ["--force"], "holds the input"),
    "current folder by absolute path": ("cwd", [], "current folder"),
    "current folder as .": (".", ["--force"], "current folder"),
    "ancestor of the current folder": ("cwd-parent", ["--force"], "ancestor"),
    "a file": ("file", [], "not a folder"),
    "a symlink": ("link", [], "symbolic link"),
    "earlier build plus a user file": ("build+user", [], "did not write"),
    "forged marker": ("forged", [], "not an attnc build"),
    "the recipe's folder": ("recipe-dir", [], "holds the input"),
}


@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_output_folder_refused_before_loading(case, spy, capsys, monkeypatch):
    kind, extra, match = OUT_CASES[case]
    root = spy["root"]
    cwd = _user_folder(root / "work" / "here")
    monkeypatch.chdir(cwd)
    recipe = spy["recipe"]
    out = {
        "user": lambda: _user_folder(root / "mine"),
        "src": lambda: spy["file"].parent,
        "root": lambda: root / "src",
        "cwd": lambda: cwd,
        ".": lambda: Path("."),
        "cwd-parent": lambda: cwd.parent,
        "build+user": lambda: _fake_build(root / "old", extra="notes.txt"),
    }.get(kind, lambda: None)()
    if kind == "file":
        out = root / "plain"
        out.write_text("data\n")
    elif kind == "link":
        target = _user_folder(root / "target")
        out = root / "link"
        out.symlink_to(target, target_is_directory=True)
    elif kind == "forged":
        out = _user_folder(root / "forged")
        (out / ".attnc-build").write_text("not json\n")
    elif kind == "recipe-dir":
        out = _user_folder(root / "recipes")
        recipe = out / "r.yaml"
        recipe.write_text(FAST)
    before = _snapshot(root)
    code, _, err = run(["optimize", spy["spec"], "-r", recipe, "-o", out, *extra], capsys)
    one_error(code, err, 2, match)
    assert not spy["mark"].exists(), "the model was loaded before the output folder was checked"
    assert _snapshot(root) == before and leftovers(root) == []


PRELOAD = {
    "opset 99": ("version: 1\npasses: []\nexport: {opset: 99}\n", None, "opset"),
    "opset 17": ("version: 1\npasses: []\nexport: {opset: 17}\n", None, "opset"),
    "missing recipe": (None, None, "recipe not found"),
    "missing calibration": (FAST, "@missing.jsonl", "not found"),
    "calibration format": (FAST, "calib.csv", "calibration"),
    "calibration JSON": (FAST, "calib.jsonl", "not valid JSON"),
    "calibration is a folder": (FAST, "@dir", "calibration"),
}


@pytest.mark.parametrize("case", sorted(PRELOAD))
def test_checks_that_need_no_model_run_before_loading(case, spy, capsys, tmp_path):
    body, calib, match = PRELOAD[case]
    recipe = tmp_path / "case.yaml"
    if body is not None:
        recipe.write_text(body)
    args = ["optimize", spy["spec"], "-r", recipe, "-o", tmp_path / "out"]
    if calib == "@missing.jsonl":
        args += ["--calib", tmp_path / "missing.jsonl"]
    elif calib == "@dir":
        (tmp_path / "cdir").mkdir()
        args += ["--calib", tmp_path / "cdir"]
    elif calib is not None:
        (tmp_path / calib).write_text('{"input_ids": [1, 2, 3]}\n{oops\n')
        args += ["--calib", tmp_path / calib]
    code, _, err = run(args, capsys)
    one_error(code, err, 2, match)
    assert not spy["mark"].exists(), "the model was loaded before a model-free check"
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_unreadable_pt2_prints_only_attncs_line(tmp_path):
    # torch.export.load logs a 12-18 line traceback through torch's own stderr handler; the
    # real process (not capsys, which torch's handler bypasses) must show only attnc's line
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FAST)
    proc = _cli(["optimize", bad, "-r", recipe, "-o", tmp_path / "out"], tmp_path)
    _, err = proc.communicate(timeout=300)
    one_error(proc.returncode, err, 2, "not a readable .pt2")
    assert "torch/export" not in err and "deserializ" not in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# builds: replacing earlier builds, write failures (slow: each runs a tiny build)


@pytest.mark.slow
def test_replaces_empty_folder_earlier_build_and_forced_folder(spy, capsys):
    root = spy["root"]
    out = root / "out"
    out.mkdir()  # an empty folder is fine
    code, _, err = run(_build_args(spy, out), capsys)
    assert code == 0, err
    marker = json.loads((out / ".attnc-build").read_text().splitlines()[0])
    assert marker["tool"] == "attnc" and "report.json" in marker["files"]
    report = json.loads((out / "report.json").read_text())
    src = report["model"]
    assert Path(src["source"].rsplit(":", 1)[0]).is_absolute()
    assert (out / src["source_relative"].rsplit(":", 1)[0]).resolve() == spy["file"].resolve()
    assert (out / "original.pt2").exists() and (out / "model.onnx").exists()
    # an earlier build is replaced (the next two builds write no model file: the replacing is
    # what is tested, and a file of the earlier build left behind would show)
    (out / "report.json").write_text("{}")
    code, _, err = run(_build_args(spy, out, onnx=None), capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["model"]["kind"]
    for name in ("model.onnx", "model.pt2", "original.pt2"):  # the earlier build's files went
        assert not (out / name).exists(), name
    # a user's folder only with --force
    mine = _user_folder(root / "mine")
    code, _, err = run([*_build_args(spy, mine, onnx=None), "--force"], capsys)
    assert code == 0, err
    assert not (mine / "notes.txt").exists() and (mine / "report.json").exists()
    assert leftovers(root) == []


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_the_earlier_build(spy, capsys, monkeypatch):
    import attnc.export.artifacts as artifacts

    def full(program, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifacts, "save_pt2", full)
    out = _fake_build(spy["root"] / "build")
    before = _snapshot(out)
    code, _, err = run(_build_args(spy, out), capsys)
    line = one_error(code, err, 1)
    assert f"could not write {out}/model.pt2: No space left on device" in line, line
    assert _snapshot(out) == before and leftovers(spy["root"]) == []


def _cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")
    code = "from attnc.cli.main import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_file_too_large_in_the_real_writers_is_one_line(spy):
    # a real EFBIG from torch's and onnx's own writers (a file-size ulimit); the C++ zip writer
    # used to abort the process from its destructor, leaving the staging folder behind
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = _fake_build(spy["root"] / "build")
    before = _snapshot(out)
    proc = _cli(_build_args(spy, out), spy["root"],
                preexec_fn=limit)
    _, err = proc.communicate(timeout=600)
    line = one_error(proc.returncode, err, 1, "File too large")
    assert f"{out}/model.pt2" in line, line
    assert _snapshot(out) == before and leftovers(spy["root"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_exits_with_its_code_and_removes_staging(spy, sig, code):
    out = spy["root"] / "build"
    proc = _cli(_build_args(spy, out), spy["root"])
    deadline = time.monotonic() + 300
    staged = False
    while time.monotonic() < deadline and proc.poll() is None:
        if leftovers(spy["root"]):
            staged = True
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err and "error:" not in err, err
    assert staged and leftovers(spy["root"]) == [] and not out.exists()


# ----------------------------------------------------------------------------------------------
# eval of a build folder runs no code unless asked


@pytest.fixture
def built(spy, capsys):
    out = spy["root"] / "b"
    code, _, err = run(_build_args(spy, out, onnx=False), capsys)  # eval runs model.pt2
    assert code == 0, err
    spy["mark"].unlink()
    data = spy["root"] / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(i, i + 10))}) + "\n"
                            for i in range(8)))
    return {**spy, "out": out, "data": data}


@pytest.mark.slow
def test_eval_of_a_build_never_runs_its_factory(built, capsys):
    out, data, mark = built["out"], built["data"], built["mark"]
    code, stdout, err = run(["eval", out, "--data", data, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["against"].endswith("original.pt2")
    assert not mark.exists(), "eval ran the factory named in report.json"
    # without original.pt2: refused, unless --trust-source
    (out / "original.pt2").unlink()
    code, _, err = run(["eval", out, "--data", data], capsys)
    one_error(code, err, 2, "--trust-source")
    assert not mark.exists()
    # the recorded relative source still finds the factory after both folders move
    moved = built["root"].with_name(built["root"].name + "-moved")
    built["root"].rename(moved)
    try:
        code, _, err = run(
            ["eval", moved / "b", "--data", moved / "d.jsonl", "--trust-source"], capsys
        )
        assert code == 0, err
    finally:
        moved.rename(built["root"])
    assert mark.exists()  # the user said so


@pytest.mark.parametrize("body", ['{"model": {"inputs": ["idx"], "ki', "[]", "\xff\xfe"])
def test_eval_of_a_broken_report_is_one_line(tmp_path, capsys, body):
    out = tmp_path / "b"
    out.mkdir()
    (out / "report.json").write_bytes(body.encode("latin-1"))
    (out / "model.pt2").write_bytes(b"")
    code, _, err = run(["eval", out, "--data", tmp_path / "d.jsonl"], capsys)
    one_error(code, err, 2, "report.json")
