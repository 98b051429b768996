"""llm-drop on the real MiniLM: ONNX Runtime latency of the optimized export against the original
export, measured in the same run, for 0..N dropped attention sublayers, with fidelity beside each
(cosine of mean-pooled, normalized sentence embeddings on held-out sentences, as the model is used).

    python benchmarks/llm_drop.py [--runs 30] [--threads 2] [--batch 32] [--max-length 64]

Prints a table and writes benchmarks/results/llm_drop-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def embed(hidden, mask):
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C)
    return torch.nn.functional.normalize(pooled, dim=-1)


def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def time_session(sess, feed, runs: int) -> float:
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=49)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-drop", type=int, default=6)
    args = ap.parse_args()

    import torch

    import attnc.passes.llm_drop as D
    from attnc.capture.program import capture
    from attnc.export.artifacts import export_onnx
    from attnc.load.calibration import CalibrationConfig, load_calibration
    from attnc.load.models import load_model
    from attnc.recipe.manager import PassContext

    torch.set_num_threads(args.threads)
    loaded = load_model(f"{ROOT / 'examples' / 'minilm.py'}:load")
    program = capture(loaded)
    calib = load_calibration(
        str(ROOT / "examples/data/minilm_calib.jsonl"),
        names=loaded.input_names,
        example_args=loaded.example_args,
        tokenizer=loaded.tokenizer,
        cfg=CalibrationConfig(samples=192, max_length=args.max_length, batch_size=32, holdout=0.0),
    )
    decisions = D.plan(
        program, D.LLMDropConfig(count=args.max_drop), PassContext(calibration=calib)
    )
    order = [d.site for d in sorted(decisions, key=lambda d: d.metrics["rank"])]

    sents = [
        json.loads(x)["text"]
        for x in (ROOT / "examples/data/minilm_eval.jsonl").read_text().splitlines()
        if x.strip()
    ]
    tok = loaded.tokenizer(
        sents[:128], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
    )
    ids, mask = tok["input_ids"], tok["attention_mask"]
    bench = {"input_ids": ids[: args.batch].numpy(), "attention_mask": mask[: args.batch].numpy()}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "orig.onnx"
        export_onnx(program, base_path)
        base = session(str(base_path), args.threads)
        ref_emb = embed(
            torch.from_numpy(
                base.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            ),
            mask,
        )
        for n in range(0, args.max_drop + 1):
            cand = D.drop_units(program, order[:n])
            path = Path(tmp) / f"drop{n}.onnx"
            info = export_onnx(cand, path)
            sess = session(str(path), args.threads)
            emb = embed(
                torch.from_numpy(
                    sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
                ),
                mask,
            )
            cos = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=-1)
            # interleave baseline and candidate in short blocks so drift and noisy neighbours
            # hit both alike; the drop-0 row (identical graphs) shows the remaining noise
            t_base, t_cand = [], []
            for _ in range(args.rounds):
                t_base.append(time_session(base, bench, max(1, args.runs // args.rounds)))
                t_cand.append(time_session(sess, bench, max(1, args.runs // args.rounds)))
            tb, tc = statistics.median(t_base), statistics.median(t_cand)
            rows.append(
                {
                    "dropped": n,
                    "sites": order[:n],
                    "attention_nodes": info["attention_nodes"],
                    "ort_ms_original": round(tb, 3),
                    "ort_ms_optimized": round(tc, 3),
                    "speedup": round(tb / tc, 4),
                    "embedding_cosine_mean": round(float(cos.mean()), 6),
                    "embedding_cosine_min": round(float(cos.min()), 6),
                }
            )
            r = rows[-1]
            print(
                f"drop {n}: attention nodes {r['attention_nodes']}, ORT {tc:7.2f} ms vs "
                f"{tb:7.2f} ms original ({r['speedup']:.3f}x), embedding cosine "
                f"mean {r['embedding_cosine_mean']:.4f} min {r['embedding_cosine_min']:.4f}",
                flush=True,
            )

    device = f"cpu-{args.threads}threads"
    result = {
        "benchmark": "llm_drop",
        "model": "all-MiniLM-L6-v2 (real weights)",
        "device": device,
        "cpu": cpu_name(),
        "threads": args.threads,
        "batch": args.batch,
        "seq_len": int(ids.shape[1]),
        "runs": args.runs,
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__,
        "ranking": order,
        "fidelity_sentences": int(ids.shape[0]),
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / f"llm_drop-{device}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
