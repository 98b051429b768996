"""Fidelity of llm-drop on the two real-weight models, measured by `attnc eval`'s metrics on
held-out data, for the original and for 1..N dropped attention sublayers, on the torch program
and on the exported ONNX file (ONNX Runtime):

- attnc-tiny-llama (trained causal LM): bits/byte, perplexity, top-1 agreement, KL;
- all-MiniLM-L6-v2 (encoder): sentence-embedding cosine and nearest-neighbour retrieval agreement.

    python benchmarks/fidelity_llm_drop.py      # writes benchmarks/results/fidelity_llm_drop.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

MODELS = [
    # name, spec, calibration file, eval file, max_length
    (
        "attnc-tiny-llama",
        str(ROOT / "examples/models/attnc-tiny-llama"),
        "examples/data/tiny_llm_calib.jsonl",
        "examples/data/tiny_llm_eval.jsonl",
        256,
    ),
    (
        "all-MiniLM-L6-v2",
        f"{ROOT / 'examples/minilm.py'}:load",
        "examples/data/minilm_calib.jsonl",
        "examples/data/minilm_eval.jsonl",
        64,
    ),
]


def run_model(name, spec, calib_file, eval_file, max_length, tmp: Path) -> dict:

    import attnc.passes.llm_drop as D
    from attnc.capture.program import capture
    from attnc.check.fidelity import ort_runner
    from attnc.check.task import task_metrics
    from attnc.export.artifacts import export_onnx
    from attnc.load.calibration import CalibrationConfig, load_calibration
    from attnc.load.models import load_model
    from attnc.recipe.manager import PassContext

    loaded = load_model(spec)
    program = capture(loaded)
    cfg = CalibrationConfig(samples=128, max_length=max_length, batch_size=16, holdout=0.0)
    load = lambda f: load_calibration(
        str(ROOT / f),
        names=loaded.input_names,  # noqa: E731
        example_args=loaded.example_args,
        tokenizer=loaded.tokenizer,
        cfg=cfg,
    )
    calib, held = load(calib_file), load(eval_file)
    n_max = len(program.sites)
    decisions = D.plan(program, D.LLMDropConfig(count=n_max), PassContext(calibration=calib))
    order = [d.site for d in sorted(decisions, key=lambda d: d.metrics["rank"])]
    rows = []
    for n in range(0, n_max + 1):
        t0 = time.perf_counter()
        cand = D.drop_units(program, order[:n])
        torch_m = task_metrics(loaded.kind, cand, program, held.calib, loaded.tokenizer)
        path = tmp / f"{name}-{n}.onnx"
        export_onnx(cand, path)
        onnx_m = task_metrics(
            loaded.kind,
            ort_runner(str(path), cand.input_names),
            program,
            held.calib,
            loaded.tokenizer,
        )
        rows.append({"dropped": n, "sites": order[:n], "torch": torch_m, "onnx": onnx_m})
        key = "bits_per_byte" if loaded.kind == "causal-lm" else "embedding_cosine"
        print(
            f"{name:18s} drop {n}: {key} torch {torch_m[key]:.4f} onnx {onnx_m[key]:.4f} "
            f"({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    return {
        "model": name,
        "kind": loaded.kind,
        "ranking": order,
        "eval_data": eval_file,
        "eval_samples": sum(b.args[0].shape[0] for b in held.calib),
        "rows": rows,
    }


def main() -> None:
    import torch

    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in MODELS:
            results.append(run_model(*m, Path(tmp)))
    out = ROOT / "benchmarks" / "results" / "fidelity_llm_drop.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "fidelity_llm_drop",
                "device": "cpu",
                "torch": torch.__version__,
                "models": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
