"""Train a tiny byte-level ``LlamaForCausalLM`` on the Python standard library's sources.

The result is a plain Hugging Face directory (config.json + fp16 model.safetensors +
generation_config.json + a byte tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads
offline. It is the real-weight causal LM that attnc's fidelity checks run on.

Vocabulary: ids 0..255 are raw bytes, 256 = BOS, 257 = EOS, 258 = PAD; the embedding table is
padded to 272 rows for alignment (ids 259..271 are unused). Every sequence starts with BOS at
position 0, so the model sees a fixed first token (which is where attention sinks tend to form).

Data: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (site-packages excluded), split
by FILE with a fixed seed into train and a ~2% held-out validation split that is never trained
on. Training windows are random 255-byte slices of the train files joined with EOS, each
prefixed by BOS. Validation windows are each held-out file cut into 255-byte chunks (BOS + chunk,
the last chunk padded and masked), so held-out bits/byte is exactly the mean code length of the
held-out files' bytes.

Usage::

    python examples/train_tiny_llm.py --minutes 32 --threads 1 \
        --out examples/models/attnc-tiny-llama

With ``--minutes`` the cosine schedule runs on wall-clock progress, so the step count depends on
the machine; pass ``--steps N`` (e.g. the ``steps`` recorded in training_log.json) for a purely
step-driven, reproducible schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
N_SPECIAL = 3
VOCAB_SIZE = 272  # 259 used ids, padded to a multiple of 16
CONTEXT = 256  # BOS + 255 bytes
VAL_FRACTION = 0.02


# --------------------------------------------------------------------------- tokenizer helpers


def encode(text: str | bytes, add_bos: bool = True) -> list[int]:
    """Byte-level encoding: UTF-8 bytes as ids 0..255, optionally prefixed with BOS (256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return ([BOS_ID] if add_bos else []) + list(data)


def decode(ids: list[int] | torch.Tensor) -> str:
    """Inverse of :func:`encode`; special ids are dropped, invalid UTF-8 is replaced."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- data


def stdlib_python_files() -> list[Path]:
    """All ``*.py`` files of the standard library, sorted, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        if p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def split_files(seed: int = 0, val_fraction: float = VAL_FRACTION) -> dict:
    """Split the stdlib files into train/val by file with a fixed seed.

    Returns a dict with ``root``, ``train`` and ``val`` (relative paths, sorted).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [str(p.relative_to(root)) for p in stdlib_python_files()]
    order = list(rel)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return {"root": str(root), "train": train, "val": val}


def _list_hash(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def read_files(root: str, names: list[str]) -> list[bytes]:
    out = []
    for n in names:
        try:
            out.append((Path(root) / n).read_bytes())
        except OSError:
            out.append(b"")
    return out


def train_stream(blobs: list[bytes]) -> torch.Tensor:
    """Train files joined with EOS, as an int16 tensor."""
    parts = []
    eos = torch.tensor([EOS_ID], dtype=torch.int16)
    for b in blobs:
        if not b:
            continue
        parts.append(torch.frombuffer(bytearray(b), dtype=torch.uint8).to(torch.int16))
        parts.append(eos)
    return torch.cat(parts)


def val_windows(blobs: list[bytes], context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each held-out file into (BOS + up to context-1 bytes) windows.

    Returns ``(input_ids, labels)`` of shape (N, context); labels are the inputs with PAD
    positions set to -100 (the HF loss shifts them by one).
    """
    n = context - 1
    rows = []
    for b in blobs:
        for i in range(0, len(b), n):
            chunk = list(b[i : i + n])
            rows.append([BOS_ID] + chunk + [PAD_ID] * (n - len(chunk)))
    ids = torch.tensor(rows, dtype=torch.long)
    labels = ids.clone()
    labels[ids == PAD_ID] = -100
    labels[:, 0] = -100
    return ids, labels


def sample_batch(stream: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    n = CONTEXT - 1
    offs = torch.randint(0, stream.numel() - n, (batch,), generator=gen)
    idx = offs[:, None] + torch.arange(n)[None, :]
    body = stream[idx].long()
    bos = torch.full((batch, 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


# --------------------------------------------------------------------------- model


def make_config(args: argparse.Namespace | None = None):
    from transformers import LlamaConfig

    layers = getattr(args, "layers", 4)
    hidden = getattr(args, "hidden", 256)
    heads = getattr(args, "heads", 4)
    kv_heads = getattr(args, "kv_heads", 2)
    inter = getattr(args, "intermediate", 688)
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=CONTEXT,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
        attn_implementation="sdpa",
        use_cache=True,
    )


@torch.no_grad()
def evaluate_bpb(
    model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 32, bf16: bool = False
) -> float:
    """Held-out bits per byte: summed NLL over all labelled positions / (ln 2 * count)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x, y = ids[i : i + batch], labels[i : i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x, use_cache=False).logits
        logits = logits[:, :-1].float()
        tgt = y[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tgt.reshape(-1),
            reduction="sum",
            ignore_index=-100,
        )
        total += nll.item()
        count += int((tgt != -100).sum())
    if was_training:
        model.train()
    return total / (math.log(2) * count)


@torch.no_grad()
def sample_text(model, prompt: str, n: int = 200, temperature: float = 0.8, seed: int = 0) -> str:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([encode(prompt)], dtype=torch.long)
    for _ in range(n):
        logits = model(input_ids=ids[:, -CONTEXT:], use_cache=False).logits[0, -1].float()
        logits[256:] = -float("inf")
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        ids = torch.cat([ids, nxt[None]], dim=1)
    return decode(ids[0])


# --------------------------------------------------------------------------- export


def write_tokenizer_files(out: Path) -> None:
    """A JSON description of the byte vocabulary plus, when `tokenizers` is available, a
    tokenizer.json that AutoTokenizer can load (bytes map 1:1 to ids 0..255)."""
    note = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "attnc_byte_vocab": {
            "description": "byte-level: ids 0..255 are UTF-8 bytes; specials below; ids "
            "259..271 unused (embedding padded to 272)",
            "byte_ids": [0, 255],
            "encode": "examples/train_tiny_llm.py: encode(text) -> [256] + list(text.encode())",
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "add_bos_token": True,
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
    }
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = ByteLevel.alphabet()  # the 256 GPT-2 byte->unicode characters
        byte_to_char = _bytes_to_unicode()
        assert set(byte_to_char.values()) == set(alphabet)
        vocab = {byte_to_char[b]: b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>")])
        assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("<pad>") == PAD_ID
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
        )
        tok.save(str(out / "tokenizer.json"))
    except Exception as exc:  # pragma: no cover - tokenizers is optional
        note["tokenizer_json_error"] = repr(exc)
    (out / "tokenizer_config.json").write_text(json.dumps(note, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n"
    )


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=32.0, help="training wall-clock budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (overrides minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="examples/models/attnc-tiny-llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=64, help="val windows for periodic eval")
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    bf16 = not args.no_bf16
    t_start = time.time()

    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    split = split_files(seed=args.seed)
    train_blobs = read_files(split["root"], split["train"])
    val_blobs = read_files(split["root"], split["val"])
    stream = train_stream(train_blobs)
    v_ids, v_labels = val_windows(val_blobs)
    data_info = {
        "corpus": "CPython standard library *.py sources (site-packages excluded)",
        "python": sys.version.split()[0],
        "stdlib_root": split["root"],
        "split_seed": args.seed,
        "split_by": "file",
        "train_files": len(split["train"]),
        "val_files": len(split["val"]),
        "train_files_sha256_16": _list_hash(split["train"]),
        "val_files_sha256_16": _list_hash(split["val"]),
        "train_bytes": sum(len(b) for b in train_blobs),
        "val_bytes": sum(len(b) for b in val_blobs),
        "val_windows": int(v_ids.shape[0]),
    }
    log(f"data: {json.dumps(data_info)}")
    g_eval = torch.Generator().manual_seed(args.seed + 1)
    sel = torch.randperm(v_ids.shape[0], generator=g_eval)[: args.eval_windows]
    pv_ids, pv_labels = v_ids[sel], v_labels[sel]

    config = make_config(args)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; bf16 autocast={bf16}; threads={args.threads}")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    # tied embedding is in no_decay (embedding weights are conventionally not decayed)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    budget_s = args.minutes * 60.0
    gen = torch.Generator().manual_seed(args.seed)

    def lr_at(step: int, elapsed: float) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        if args.steps:
            prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        else:
            prog = elapsed / budget_s
        prog = min(max(prog, 0.0), 1.0)
        lo = args.lr * args.min_lr_frac
        return lo + 0.5 * (args.lr - lo) * (1.0 + math.cos(math.pi * prog))

    history = []
    losses: list[float] = []
    step = 0
    tokens = 0
    t_train = time.time()
    while True:
        elapsed = time.time() - t_train
        if args.steps and step >= args.steps:
            break
        if not args.steps and elapsed >= budget_s:
            break
        lr = lr_at(step, elapsed)
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(stream, args.batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
                f"step {step} tokens {tokens / 1e6:.2f}M loss {sum(losses[-50:]) / 50:.4f} "
                f"lr {lr:.2e} {tokens / el:,.0f} tok/s"
            )
        if step % args.eval_every == 0:
            bpb = evaluate_bpb(model, pv_ids, pv_labels, bf16=bf16)
            el = time.time() - t_train
            history.append(
                {
                    "step": step,
                    "seconds": round(el, 1),
                    "tokens": tokens,
                    "train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                    "val_bpb_sample": round(bpb, 4),
                }
            )
            log(f"eval step {step}: val bits/byte (sample of {len(sel)} windows) {bpb:.4f}")
    train_seconds = time.time() - t_train
    final_train_loss = sum(losses[-100:]) / max(1, len(losses[-100:]))
    log(f"training done: {step} steps, {tokens:,} tokens, {train_seconds:.0f}s")

    out = Path(args.out)
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

    # Re-load the saved fp16 weights and measure in fp32 on the WHOLE validation split.
    reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded.eval()
    t_eval = time.time()
    val_bpb = evaluate_bpb(reloaded, v_ids, v_labels, batch=32, bf16=False)
    train_sample = sample_batch(stream, 32, torch.Generator().manual_seed(args.seed + 2))
    train_bpb_fp32 = evaluate_bpb(reloaded, train_sample, train_sample.clone(), bf16=False)
    log(
        f"held-out bits/byte (fp32, all {v_ids.shape[0]} windows): {val_bpb:.4f} "
        f"({time.time() - t_eval:.0f}s)"
    )
    sample = sample_text(reloaded, "def __init__(self", n=200, seed=args.seed)
    log(f"sample: {sample!r}")

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    record = {
        "seed": args.seed,
        "args": vars(args),
        "torch": torch.__version__,
        "threads": args.threads,
        "bf16_autocast": bf16,
        "parameters": n_params,
        "data": data_info,
        "steps": step,
        "tokens": tokens,
        "batch_tokens": args.batch * CONTEXT,
        "train_wall_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens / train_seconds, 1),
        "final_train_loss_nats_per_byte_last100": round(final_train_loss, 4),
        "final_train_bpb_fp32_from_saved_fp16": round(train_bpb_fp32, 4),
        "heldout_bpb_fp32_from_saved_fp16": round(val_bpb, 4),
        "heldout_eval": f"all {v_ids.shape[0]} windows (BOS + 255 bytes) of the "
        f"{len(split['val'])} held-out files, {data_info['val_bytes']} bytes",
        "history": history,
        "sample_prompt": "def __init__(self",
        "sample": sample,
        "dir_bytes_before_log": size,
        "total_wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "data_split.json").write_text(
        json.dumps(
            {"root": split["root"], "val": split["val"], "train_count": len(split["train"])},
            indent=2,
        )
        + "\n"
    )
    log(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
