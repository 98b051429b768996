"""Held-out exact match of a tiny LLaVA (examples/train_vlm.py) per question type, against the
answer prior (each type's most common held-out answer) and chance given the question's form
(1 / the answers the question allows: colour 5, shape 4, count 5, the rest 2).

    python examples/eval_vlm.py [--model examples/models/attnc-tiny-vlm] [--n 2048] [--json out]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_vqa import make_sample, qtype_of  # noqa: E402
from train_vlm import evaluate  # noqa: E402

CHANCE = {"color": 1 / 5, "shape": 1 / 4, "count": 1 / 5, "size": 1 / 2, "position": 1 / 2,
          "relation": 1 / 2, "exist": 1 / 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).parent / "models" / "attnc-tiny-vlm"))
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from make_vqa import make_batch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    samples = [make_sample("eval", i) for i in range(args.n)]
    m = evaluate(model, make_batch("eval", range(args.n)), [s["question"] for s in samples])
    by: dict[str, dict[str, int]] = {}
    for s in samples:
        d = by.setdefault(qtype_of(s["question"]), {})
        d[s["answer"]] = d.get(s["answer"], 0) + 1
    rows = {}
    for k in sorted(by):
        n = sum(by[k].values())
        rows[k] = {"n": n, "accuracy": m["per_type"][k], "prior": round(max(by[k].values()) / n, 4),
                   "chance": round(CHANCE[k], 4)}
    prior = sum(max(d.values()) for d in by.values()) / args.n
    chance = sum(CHANCE[k] * r["n"] for k, r in rows.items()) / args.n
    out = {"model": args.model, "n": args.n, "accuracy": round(m["accuracy"], 4),
           "prior": round(prior, 4), "chance": round(chance, 4), "per_type": rows}
    print("| question type | n | accuracy | answer prior | chance |\n|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['n']} | {r['accuracy']:.3f} | {r['prior']:.3f} | {r['chance']:.3f} |")
    print(f"| all | {args.n} | {out['accuracy']:.3f} | {prior:.3f} | {chance:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
