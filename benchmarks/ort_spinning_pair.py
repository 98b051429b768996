"""ONNX Runtime's intra-op spinning in the build's interleaved bench: the README's MiniLM build
(`model.onnx`, two attention sublayers dropped) against an export of the original, timed
interleaved (A, B, A, B, ...) and each alone, with ORT's default spinning and without it, in one
run. Why `attnc.check.bench` makes its sessions without spinning.

    .venv/bin/attnc optimize examples/minilm.py:load \
        --recipe examples/recipes/minilm_llm_drop.yaml \
        --calib examples/data/minilm_calib.jsonl -o /tmp/mb
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ort_spinning_pair.py /tmp/mb

Writes benchmarks/results/ort_spinning_pair-<device>.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]


def _session(path: str, spin: bool, threads: int):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 30000, (8, 46)).astype(np.int64)
    feed = {i.name: ids if "input_ids" in i.name else
            (np.ones_like(ids) if "mask" in i.name else np.zeros_like(ids))
            for i in sess.get_inputs()}
    return lambda: sess.run(None, feed)


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    build = Path(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    from attnc.capture.program import capture
    from attnc.check.bench import device_name
    from attnc.export.artifacts import export_onnx
    from attnc.load.models import load_model

    orig = Path(tempfile.mkdtemp()) / "original.onnx"
    export_onnx(capture(load_model(str(ROOT / "examples/minilm.py") + ":load")), orig, 23)
    rows = []
    for spin in (True, False):
        a, b = _session(str(orig), spin, threads), _session(str(build / "model.onnx"), spin,
                                                             threads)
        for _ in range(3):
            a(), b()
        ta, tb = [], []
        for _ in range(30):
            ta.append(_ms(a))
            tb.append(_ms(b))
        alone_a = [_ms(a) for _ in range(20)]
        alone_b = [_ms(b) for _ in range(20)]
        med = lambda x: round(float(np.median(x)), 2)  # noqa: E731
        rows.append({"intra_op_spinning": spin,
                     "interleaved_original_ms": med(ta), "interleaved_optimized_ms": med(tb),
                     "interleaved_speedup": round(med(ta) / med(tb), 3),
                     "alone_original_ms": med(alone_a), "alone_optimized_ms": med(alone_b),
                     "alone_speedup": round(med(alone_a) / med(alone_b), 3)})
        print(json.dumps(rows[-1]), flush=True)
    dev = device_name()
    out = ROOT / "benchmarks" / "results" / (
        "ort_spinning_pair-" + "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
        + ".json")
    out.write_text(json.dumps({
        "device": dev, "threads": threads, "shape": [8, 46], "ort": ort.__version__,
        "model": "README MiniLM build (2 attention sublayers dropped) vs the original's export",
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "rows": rows}, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
