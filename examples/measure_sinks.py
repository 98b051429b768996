"""Measure attention sinks in the tiny byte-level Llama trained by ``train_tiny_llm.py``.

For 32 held-out windows (BOS + 255 bytes, taken from the validation files the model never trained
on) it runs the model with eager attention and ``output_attentions=True`` and reports, per layer
and head:

* ``pos0``: mean attention probability on key 0 (the BOS token) over queries q >= 1, and
  ``pos0_far`` over far queries q >= 128, against the uniform causal baseline mean(1/(q+1));
* ``punct``: mean attention mass on non-initial sink-like keys (newline, ``:``, ``(``, ``)``,
  ``,``, ``.``, quotes, ``#``) against their share of the causal keys (what a uniform head would
  give them), plus a per-byte lift (mass per occurrence / uniform mass per occurrence).

The same statistics for a freshly initialised model of the same config are recorded as a control.

Usage::

    python examples/measure_sinks.py [--model examples/models/attnc-tiny-llama]

Writes ``<model>/sinks.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_llm import BOS_ID, CONTEXT, read_files  # noqa: E402

SINK_BYTES = {
    "\\n": ord("\n"),
    ":": ord(":"),
    "(": ord("("),
    ")": ord(")"),
    ",": ord(","),
    ".": ord("."),
    "'": ord("'"),
    '"': ord('"'),
    "#": ord("#"),
}
FAR_Q = 128


def heldout_windows(model_dir: Path, n: int, seed: int) -> torch.Tensor:
    """``n`` full windows (BOS + 255 bytes) from the held-out files, chosen with a fixed seed."""
    split = json.loads((model_dir / "data_split.json").read_text())
    root = split["root"]
    if not Path(root).is_dir():
        import sysconfig

        root = sysconfig.get_paths()["stdlib"]
    blobs = read_files(root, split["val"])
    body = CONTEXT - 1
    rows = []
    for b in blobs:
        for i in range(0, len(b) - body + 1, body):
            rows.append([BOS_ID] + list(b[i : i + body]))
    ids = torch.tensor(rows, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    sel = torch.randperm(ids.shape[0], generator=gen)[:n]
    return ids[sel.sort().values]


@torch.no_grad()
def sink_stats(model, ids: torch.Tensor, batch: int = 8) -> dict:
    """Per-layer, per-head sink statistics (see module docstring)."""
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    t = ids.shape[1]
    q_idx = torch.arange(t)
    pos0 = torch.zeros(n_layers, n_heads)
    pos0_far = torch.zeros(n_layers, n_heads)
    punct = torch.zeros(n_layers, n_heads)
    share_sum = 0.0
    byte_ids = torch.tensor(list(SINK_BYTES.values()))
    per_byte_mass = torch.zeros(n_layers, len(byte_ids))  # summed over heads, queries
    per_byte_uniform = torch.zeros(len(byte_ids))
    causal = torch.tril(torch.ones(t, t))
    uni = causal / causal.sum(-1, keepdim=True)  # uniform causal attention (t, t)
    n_rows = 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        out = model(input_ids=x, output_attentions=True, use_cache=False)
        b = x.shape[0]
        # sink-like keys: positions k >= 1 whose byte is in SINK_BYTES
        is_sink = torch.isin(x, byte_ids).float()
        is_sink[:, 0] = 0.0
        # share of causal keys a uniform head would give them, for queries q >= 1
        share = (uni[None, 1:, :] * is_sink[:, None, :]).sum(-1)  # (b, t-1)
        share_sum += share.sum().item()
        onehot = (x[..., None] == byte_ids).float()  # (b, t, nbytes)
        onehot[:, 0] = 0.0
        per_byte_uniform += torch.einsum("qk,bkc->c", uni[1:, :], onehot)
        for layer, att in enumerate(out.attentions):
            att = att.float()  # (b, h, t, t)
            pos0[layer] += att[:, :, 1:, 0].sum(dim=(0, 2))
            pos0_far[layer] += att[:, :, FAR_Q:, 0].sum(dim=(0, 2))
            punct[layer] += (att[:, :, 1:, :] * is_sink[:, None, None, :]).sum(-1).sum(dim=(0, 2))
            per_byte_mass[layer] += torch.einsum("bhqk,bkc->c", att[:, :, 1:, :], onehot)
        n_rows += b
    n_q = n_rows * (t - 1)
    n_far = n_rows * (t - FAR_Q)
    base0 = (1.0 / (q_idx[1:] + 1.0)).mean().item()
    base0_far = (1.0 / (q_idx[FAR_Q:] + 1.0)).mean().item()
    share_mean = share_sum / n_q
    lift = per_byte_mass / (n_heads * per_byte_uniform.clamp_min(1e-9))
    r = lambda v: round(float(v), 4)
    return {
        "windows": n_rows,
        "window_len": t,
        "uniform_pos0_q>=1": r(base0),
        f"uniform_pos0_q>={FAR_Q}": r(base0_far),
        "uniform_punct_share_q>=1": r(share_mean),
        "layers": [
            {
                "layer": layer,
                "pos0": [r(v) for v in pos0[layer] / n_q],
                "pos0_far": [r(v) for v in pos0_far[layer] / n_far],
                "pos0_ratio_to_uniform": [r(v / base0) for v in pos0[layer] / n_q],
                "punct": [r(v) for v in punct[layer] / n_q],
                "punct_ratio_to_share": [r(v / share_mean) for v in punct[layer] / n_q],
                "per_byte_lift_mean_over_heads": {
                    k: r(lift[layer, j]) for j, k in enumerate(SINK_BYTES)
                },
            }
            for layer in range(n_layers)
        ],
    }


def markdown_table(stats: dict) -> str:
    lines = [
        "| layer | head | mass on pos 0 (q≥1) | ×uniform | pos 0 (q≥128) | ×uniform "
        "| sink-like bytes | ×share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    b0 = stats["uniform_pos0_q>=1"]
    bf = stats[f"uniform_pos0_q>={FAR_Q}"]
    sh = stats["uniform_punct_share_q>=1"]
    for lay in stats["layers"]:
        for h, (p, pf, pu) in enumerate(
            zip(lay["pos0"], lay["pos0_far"], lay["punct"], strict=True)
        ):
            lines.append(
                f"| {lay['layer']} | {h} | {p:.3f} | {p / b0:.1f} | {pf:.3f} | {pf / bf:.1f} "
                f"| {pu:.3f} | {pu / sh:.2f} |"
            )
    lines.append(f"| uniform | | {b0:.3f} | 1.0 | {bf:.4f} | 1.0 | {sh:.3f} | 1.00 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="attention-sink statistics for the tiny Llama")
    ap.add_argument("--model", default="examples/models/attnc-tiny-llama")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-control", action="store_true", help="skip the untrained control")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    ids = heldout_windows(model_dir, args.windows, args.seed)
    stats = sink_stats(model, ids)
    result = {
        "model": str(model_dir),
        "method": "eager attention, output_attentions=True, fp32 from the saved fp16 weights; "
        "held-out windows = BOS + 255 bytes from the validation files; means over windows "
        "and queries",
        "sink_bytes": list(SINK_BYTES),
        "seed": args.seed,
        "trained": stats,
    }
    if not args.no_control:
        torch.manual_seed(args.seed)
        cfg = model.config
        cfg._attn_implementation = "eager"
        control = LlamaForCausalLM(cfg).eval()
        c = sink_stats(control, ids)
        result["untrained_control"] = {
            "note": "same config, random init (seed above); summary per layer",
            "pos0_max_per_layer": [max(lay["pos0"]) for lay in c["layers"]],
            "pos0_far_max_per_layer": [max(lay["pos0_far"]) for lay in c["layers"]],
            "punct_max_per_layer": [max(lay["punct"]) for lay in c["layers"]],
        }
    (model_dir / "sinks.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(markdown_table(stats))
    for lay in stats["layers"]:
        print(f"layer {lay['layer']} per-byte lift:", lay["per_byte_lift_mean_over_heads"])
    if "untrained_control" in result:
        print("untrained control:", json.dumps(result["untrained_control"]))
    print(f"wrote {model_dir / 'sinks.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
