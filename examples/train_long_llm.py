"""Train a small long-context (2048-byte) byte-level ``LlamaForCausalLM`` on the stdlib sources.

The long-context sibling of ``train_tiny_llm.py`` (same byte vocabulary, BOS at position 0, same
file-level train/held-out split with seed 0, so held-out files are never trained on), made to judge
attention-sparsity passes (sliding window + sinks, block-sparse) at 2048 tokens on real weights.

Curriculum: the first part of the wall-clock budget trains on BOS + 511-byte windows (cheap), the
last ``--long-frac`` on BOS + 2047-byte windows with the same tokens per step, so that the long
positions are trained. The cosine schedule runs over the whole budget (or ``--steps``).

After training it saves an fp16 Hugging Face folder, then measures held-out bits/byte on every
held-out byte at 2048 and at 256 context, and per layer/head attention statistics at 2048 with
eager attention (``attention.json``: share of attention mass in a sliding window of 64/128/256
keys plus 4 sink tokens, and 512). ``--analyze-only`` re-runs those measurements on a saved folder.

    python examples/train_long_llm.py --minutes 50 --threads 1 \
        --out examples/models/attnc-long-llama
    python examples/train_long_llm.py --make-data   # examples/data/long_llm_{calib,eval}.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_llm import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    _list_hash,
    evaluate_bpb,
    read_files,
    split_files,
    train_stream,
    val_windows,
    write_tokenizer_files,
)

CONTEXT = 2048  # BOS + 2047 bytes
SHORT = 512  # curriculum phase 1: BOS + 511 bytes
SINKS = 4
WINDOWS = (64, 128, 256, 512)
FAR_Q = 256  # queries at least this far in are where a window actually drops keys
HERE = Path(__file__).resolve().parent


def make_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=CONTEXT,
        rope_parameters={"rope_theta": args.rope_theta, "rope_type": "default"},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
        attn_implementation="sdpa",
        use_cache=True,
    )


def sample_batch(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    """``batch`` rows of BOS + (length-1) bytes from random offsets of the train stream."""
    n = length - 1
    offs = torch.randint(0, stream.numel() - n, (batch,), generator=gen)
    body = stream[offs[:, None] + torch.arange(n)[None, :]].long()
    return torch.cat([torch.full((batch, 1), BOS_ID, dtype=torch.long), body], dim=1)


def full_windows(blobs: list[bytes], length: int = CONTEXT) -> torch.Tensor:
    """Every complete BOS + (length-1)-byte window of the held-out files (no padding)."""
    n = length - 1
    rows = [[BOS_ID] + list(b[i : i + n]) for b in blobs for i in range(0, len(b) - n + 1, n)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def attention_stats(model, ids: torch.Tensor) -> dict:
    """Per layer/head attention-mass statistics at ``ids.shape[1]`` tokens (eager, fp32).

    ``window_sink[w]``: mean over queries q >= FAR_Q of the mass on keys k with q-k < w or
    k < SINKS (what a sliding window of w keys plus 4 sinks keeps); ``local[w]`` the same without
    sinks; ``bos`` the mass on key 0; ``density[w]``: share of the causal (q >= FAR_Q) entries
    that window + sinks keeps.
    """
    model.config._attn_implementation = "eager"
    t = ids.shape[1]
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    causal = k <= q
    far = (torch.arange(t) >= FAR_Q).float()
    n_far = far.sum() * ids.shape[0]
    masks = {w: ((q - k < w) & causal) for w in WINDOWS}
    acc: dict[str, torch.Tensor] = {}
    for row in ids:
        atts = model(input_ids=row[None], output_attentions=True, use_cache=False).attentions
        a = torch.stack([x[0].float() for x in atts])  # (L, H, T, T)
        per = {"bos": a[..., 0]}
        for w, m in masks.items():
            per[f"local_{w}"] = (a * m).sum(-1)
            per[f"window_sink_{w}"] = per[f"local_{w}"] + (a[..., :SINKS] * ~m[:, :SINKS]).sum(-1)
        for key, v in per.items():
            acc[key] = acc.get(key, 0) + (v * far).sum(-1)
    model.config._attn_implementation = "sdpa"
    out = {k_: [[round(x, 4) for x in r] for r in (v / n_far).tolist()] for k_, v in acc.items()}
    causal_far = causal[FAR_Q:]
    out["density"] = {
        str(w): round(
            float(((masks[w] | (k < SINKS)) & causal)[FAR_Q:].sum() / causal_far.sum()), 4
        )
        for w in WINDOWS
    }
    out["method"] = (
        f"{ids.shape[0]} held-out windows of {t} tokens, eager fp32; means over queries "
        f"q >= {FAR_Q}; window_sink_w = mass on keys q-w < k <= q or k < {SINKS}"
    )
    return out


def analyze(out: Path, val_blobs: list[bytes], n_stat: int, log) -> dict:
    """Held-out bits/byte at 2048 and 256 context, plus attention statistics at 2048."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    res = {}
    for ctx in (CONTEXT, 256):
        t0 = time.time()
        ids, labels = val_windows(val_blobs, context=ctx)
        res[f"heldout_bpb_ctx{ctx}"] = round(
            evaluate_bpb(model, ids, labels, batch=max(1, 8192 // ctx)), 4
        )
        log(
            f"held-out bits/byte at context {ctx}: {res[f'heldout_bpb_ctx{ctx}']} "
            f"({ids.shape[0]} windows, {time.time() - t0:.0f}s)"
        )
    wins = full_windows(val_blobs)
    sel = torch.randperm(wins.shape[0], generator=torch.Generator().manual_seed(0))[:n_stat]
    stats = attention_stats(model, wins[sel.sort().values])
    stats.update(res)
    (out / "attention.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(f"attention stats: density {stats['density']}")
    return stats


def make_data(n: int = 64) -> None:
    """Calibration rows from train files and eval rows from held-out files, 2100 bytes each."""
    import sysconfig

    from make_lm_data import windows

    split = split_files(seed=0)
    root = Path(sysconfig.get_paths()["stdlib"])
    for name, names, seed in (
        ("long_llm_eval", split["val"], 1),
        ("long_llm_calib", split["train"], 2),
    ):
        rows = windows([root / p for p in names], n, seed, max_bytes=2100)
        rows = [r for r in rows if len(r.encode()) >= CONTEXT]
        with open(HERE / "data" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": r}) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to examples/data/{name}.jsonl")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=50.0, help="training wall-clock budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (overrides minutes)")
    ap.add_argument("--long-frac", type=float, default=0.5, help="last share at 2048 context")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="examples/models/attnc-long-llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--stat-windows", type=int, default=8)
    ap.add_argument("--analyze-only", action="store_true")
    ap.add_argument("--make-data", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.make_data:
        make_data()
        return 0
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    split = split_files(seed=args.seed)
    val_blobs = read_files(split["root"], split["val"])
    out = Path(args.out)
    if args.analyze_only:
        analyze(out, val_blobs, args.stat_windows, log)
        return 0
    train_blobs = read_files(split["root"], split["train"])
    stream = train_stream(train_blobs)
    data_info = {
        "corpus": "CPython standard library *.py sources (site-packages excluded)",
        "python": sys.version.split()[0],
        "stdlib_root": split["root"],
        "split_seed": args.seed,
        "split_by": "file (same split as attnc-tiny-llama)",
        "train_files": len(split["train"]),
        "val_files": len(split["val"]),
        "train_files_sha256_16": _list_hash(split["train"]),
        "val_files_sha256_16": _list_hash(split["val"]),
        "train_bytes": sum(len(b) for b in train_blobs),
        "val_bytes": sum(len(b) for b in val_blobs),
    }
    log(f"data: {json.dumps(data_info)}")
    pv_ids = full_windows(val_blobs)
    pv_ids = pv_ids[torch.randperm(pv_ids.shape[0], generator=torch.Generator().manual_seed(1))[:8]]

    model = LlamaForCausalLM(make_config(args)).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; bf16 autocast; threads={args.threads}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    budget_s = args.minutes * 60.0
    gen = torch.Generator().manual_seed(args.seed)
    history, losses = [], []
    step = tokens = 0
    long_from_step = None
    t_train = time.time()
    while True:
        elapsed = time.time() - t_train
        if (args.steps and step >= args.steps) or (not args.steps and elapsed >= budget_s):
            break
        prog = step / args.steps if args.steps else elapsed / budget_s
        lo = args.lr * args.min_lr_frac
        lr = lo + 0.5 * (args.lr - lo) * (1.0 + math.cos(math.pi * min(prog, 1.0)))
        lr = min(lr, args.lr * (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        length = CONTEXT if prog >= 1.0 - args.long_frac else SHORT
        if length == CONTEXT and long_from_step is None:
            long_from_step = step
            log(f"step {step}: switching to {CONTEXT}-token windows")
        x = sample_batch(stream, max(1, args.tokens_per_step // length), length, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        tokens += x.numel()
        losses.append(loss.item())
        if step % 50 == 0:
            el = time.time() - t_train
            log(
                f"step {step} len {length} tokens {tokens / 1e6:.2f}M "
                f"loss {sum(losses[-50:]) / 50:.4f} lr {lr:.2e} {tokens / el:,.0f} tok/s"
            )
        if step % args.eval_every == 0:
            bpb = evaluate_bpb(model, pv_ids, pv_ids.clone(), batch=2, bf16=True)
            history.append(
                {
                    "step": step,
                    "seconds": round(time.time() - t_train, 1),
                    "tokens": tokens,
                    "length": length,
                    "train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                    "val_bpb_sample_ctx2048": round(bpb, 4),
                }
            )
            log(f"eval step {step}: held-out bits/byte (8 windows of {CONTEXT}) {bpb:.4f}")
    train_seconds = time.time() - t_train
    log(f"training done: {step} steps, {tokens:,} tokens, {train_seconds:.0f}s")

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.config.architectures = ["LlamaForCausalLM"]
    model.half().save_pretrained(out)
    GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        max_length=CONTEXT,
        do_sample=True,
        temperature=0.8,
    ).save_pretrained(out)
    write_tokenizer_files(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = CONTEXT
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "data_split.json").write_text(
        json.dumps(
            {"root": split["root"], "val": split["val"], "train_count": len(split["train"])},
            indent=2,
        )
        + "\n"
    )
    record = {
        "seed": args.seed,
        "args": vars(args),
        "torch": torch.__version__,
        "threads": args.threads,
        "bf16_autocast": True,
        "parameters": n_params,
        "data": data_info,
        "steps": step,
        "tokens": tokens,
        "curriculum": {
            "short_length": SHORT,
            "long_length": CONTEXT,
            "long_from_step": long_from_step,
            "tokens_per_step": args.tokens_per_step,
        },
        "train_wall_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens / train_seconds, 1),
        "final_train_loss_nats_per_byte_last100": round(sum(losses[-100:]) / 100, 4),
        "heldout_eval": "every held-out byte, fp32 from the saved fp16 weights, each file cut "
        "into BOS + (context-1)-byte windows",
        "history": history,
    }
    (out / "training_log.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )  # kept if analyze fails
    stats = analyze(out, val_blobs, args.stat_windows, log)
    for ctx in (CONTEXT, 256):
        record[f"heldout_bpb_ctx{ctx}"] = stats[f"heldout_bpb_ctx{ctx}"]
    record["total_wall_seconds"] = round(time.time() - t_start, 1)
    (out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
