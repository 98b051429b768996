"""Train a tiny ``ViTForImageClassification`` on procedural shapes (examples/make_shapes.py).

The result is a plain Hugging Face folder (config.json, fp16 model.safetensors,
preprocessor_config.json) with real trained weights: the ViT on which attnc judges 2-D
neighborhood attention (the ``sparse`` pass) and the vision tower its VLM reuses. 64x64 images,
4x4 patches: a 16x16 patch grid plus a CLS token (257 tokens); the classifier reads the CLS token.

Usage::

    python examples/train_vit.py --probe            # time a few steps per config, then exit
    python examples/train_vit.py --minutes 40 --threads 1 --out examples/models/attnc-tiny-vit
    python examples/train_vit.py --locality-only --out examples/models/attnc-tiny-vit

With ``--minutes`` the cosine schedule follows wall-clock progress, so the step count depends on
the machine; ``--steps N`` gives a step-driven, reproducible schedule. Training images are drawn
fresh from the "train" stream (index = step * batch + i); held-out accuracy is measured on the
fixed "eval" split, which the training stream never produces. Training follows a curriculum: the
make_shapes difficulty (background texture contrast, clutter, smallest shape size) ramps from
--d0 to 1 over the first --curriculum share of the run; held-out images are always difficulty 1.
Without it (--curriculum 0) a 6-layer model stayed at chance for 7,000 images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_shapes import CLASSES, IMAGE_SIZE, MEAN, STD, make_batch  # noqa: E402

PATCH = 4
GRID = IMAGE_SIZE // PATCH


def build_model(hidden: int, layers: int, heads: int, mlp_ratio: int = 4, attn: str = "sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp_ratio * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    cfg._attn_implementation = attn
    return ViTForImageClassification(cfg)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position code (MAE's), rows in raster order: half
    the channels encode the row, half the column, each as sin/cos at dim/4 frequencies."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang_y = ys.reshape(-1, 1).float() * omega  # (grid^2, dim/4)
    ang_x = xs.reshape(-1, 1).float() * omega
    return torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)


@torch.no_grad()
def init_spatial(model, pos_scale: float, mimetic: float) -> None:
    """Inductive-bias initialisation, architecture unchanged (a plain HF ViT).

    pos_scale > 0: the learned position embeddings start as a 2-D sine-cosine code times
    pos_scale (the CLS slot at 0), so nearby patches start with similar positions.
    mimetic > 0: "mimetic" attention init (Trockman & Kolter 2023): W_q W_k^T = a Z + b I and
    W_v W_o = a Z - b I with Z ~ N(0, 1/d), a = b = mimetic, split per layer by an SVD, so each
    head starts attending to tokens similar to the query, i.e. (with the 2-D code) to its
    spatial neighbours."""
    cfg = model.config
    d = cfg.hidden_size
    grid = cfg.image_size // cfg.patch_size
    if pos_scale > 0:
        pe = model.vit.embeddings.position_embeddings  # (1, 1 + grid^2, d)
        pe.zero_()
        pe[0, 1:] = pos_scale * sincos_2d(grid, d)
    if mimetic <= 0:
        return
    eye = torch.eye(d)
    for layer in model.vit.layers:
        att = layer.attention
        out = att.o_proj
        m = mimetic * torch.randn(d, d) / math.sqrt(d) + mimetic * eye  # W_q W_k^T
        u, sv, vh = torch.linalg.svd(m)
        att.q_proj.weight.copy_((u * sv.sqrt()).T)  # q = x W_q, nn.Linear stores W_q^T
        att.k_proj.weight.copy_((vh.T * sv.sqrt()).T)
        m = mimetic * torch.randn(d, d) / math.sqrt(d) - mimetic * eye  # W_v W_o
        u, sv, vh = torch.linalg.svd(m)
        att.v_proj.weight.copy_((u * sv.sqrt()).T)
        out.weight.copy_(vh.T * sv.sqrt())  # o = (x W_v) W_o, stored as W_o^T


def autocast(enabled: bool):
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def accuracy(model, pix: torch.Tensor, labels: torch.Tensor, bf16: bool, bs: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(pix), bs):
        with autocast(bf16):
            logits = model(pixel_values=pix[i : i + bs]).logits
        correct += int((logits.float().argmax(-1) == labels[i : i + bs]).sum())
    model.train()
    return correct / len(pix)


def probe(args) -> None:
    """Seconds per training step for a few configs (batch args.batch), to size the run."""
    for hidden, layers in ((128, 6), (160, 6), (192, 4), (192, 6)):
        torch.manual_seed(0)
        model = build_model(hidden, layers, args.heads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        n_params = sum(p.numel() for p in model.parameters())
        times = []
        for step in range(4):
            pix, lab = make_batch("train", range(step * args.batch, (step + 1) * args.batch))
            t0 = time.perf_counter()
            with autocast(args.bf16):
                loss = torch.nn.functional.cross_entropy(model(pixel_values=pix).logits, lab)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        make_batch("train", range(args.batch))
        gen = time.perf_counter() - t0
        step_s = sorted(times[1:])[1]
        print(
            f"hidden {hidden} layers {layers}: {n_params / 1e6:.2f} M params, "
            f"{step_s:.2f} s/step + {gen:.2f} s data (batch {args.batch}) -> "
            f"{args.minutes * 60 / (step_s + gen):.0f} steps in {args.minutes} min",
            flush=True,
        )


def lr_at(progress: float, step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def difficulty_at(progress: float, args) -> float:
    """Curriculum: make_shapes difficulty from args.d0 up to 1 (the held-out task) over the first
    args.curriculum of training, then 1."""
    if args.curriculum <= 0:
        return 1.0
    return args.d0 + (1.0 - args.d0) * min(progress / args.curriculum, 1.0)


def train(args) -> None:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.hidden, args.layers, args.heads)
    init_spatial(model, args.pos_init, args.mimetic)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    val_pix, val_lab = make_batch("eval", range(args.val_images))
    print(
        f"{n_params / 1e6:.2f} M params; budget {args.minutes} min / {args.steps} steps", flush=True
    )
    history, evals = [], []
    start = time.time()
    step, run_loss, run_acc = 0, 0.0, 0.0
    while True:
        elapsed = time.time() - start
        progress = step / args.steps if args.steps else elapsed / (args.minutes * 60)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step, args)
        diff = difficulty_at(progress, args)
        pix, lab = make_batch("train", range(step * args.batch, (step + 1) * args.batch), diff)
        with autocast(args.bf16):
            logits = model(pixel_values=pix).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), lab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(-1) == lab).float().mean())
        if step % args.log_every == 0:
            rec = {
                "step": step,
                "images": step * args.batch,
                "seconds": round(time.time() - start, 1),
                "lr": round(opt.param_groups[0]["lr"], 6),
                "difficulty": round(diff, 3),
                "train_loss": round(run_loss / args.log_every, 4),
                "train_acc": round(run_acc / args.log_every, 4),
            }
            run_loss = run_acc = 0.0
            if step % args.eval_every == 0:
                rec["heldout_acc"] = accuracy(model, val_pix, val_lab, args.bf16)
                evals.append(rec)
                model.save_pretrained(out / "ckpt")  # fp32, overwritten: a crash loses little
            history.append(rec)
            print(json.dumps(rec), flush=True)
    train_s = time.time() - start
    save(model, out)
    final = final_metrics(out, args)
    log = {
        "seed": args.seed,
        "args": vars(args),
        "parameters": n_params,
        "steps": step,
        "images_seen": step * args.batch,
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "bf16_autocast": args.bf16,
        "classes": list(CLASSES),
        "splits": {
            "train": "make_shapes stream 'train', indices 0..images_seen-1",
            "heldout": "make_shapes split 'eval', indices 0..N-1",
        },
        "history": history,
        "final": final,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(final), flush=True)


def save(model, out: Path) -> None:
    import shutil

    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    proc = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [MEAN] * 3,
        "image_std": [STD] * 3,
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")


def load_fp32(out: Path, attn: str = "sdpa"):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation=attn
    ).eval()


def final_metrics(out: Path, args) -> dict:
    """Held-out accuracy (fp32, from the saved fp16 weights) and attention locality."""
    model = load_fp32(out)
    pix, lab = make_batch("eval", range(args.final_images))
    with torch.no_grad():
        pred = torch.cat(
            [
                model(pixel_values=pix[i : i + 128]).logits.argmax(-1)
                for i in range(0, len(pix), 128)
            ]
        )
    per_class = {
        c: round(float((pred[lab == k] == k).float().mean()), 4) for k, c in enumerate(CLASSES)
    }
    first64 = float((pred[:64] == lab[:64]).float().mean())
    return {
        "heldout_images": args.final_images,
        "heldout_acc": round(float((pred == lab).float().mean()), 4),
        "heldout_acc_first64": round(first64, 4),
        "per_class_acc": per_class,
        "locality": locality(out, args.locality_images),
    }


@torch.no_grad()
def locality(out: Path, n_images: int) -> dict:
    """Per layer (and head), the share of patch-to-patch attention mass (CLS key and CLS query
    excluded, renormalized over patch keys) within a (2k+1)x(2k+1) patch neighborhood of the
    query, k = 1, 2, 3, on held-out images; the uniform share of each window for comparison,
    and the mass patch queries put on the CLS key."""
    model = load_fp32(out, attn="eager")
    pix, _ = make_batch("eval", range(n_images))
    attns = model(pixel_values=pix, output_attentions=True).attentions  # L x (B, H, 257, 257)
    rows = torch.arange(GRID).repeat_interleave(GRID)
    cols = torch.arange(GRID).repeat(GRID)
    cheb = torch.maximum((rows[:, None] - rows).abs(), (cols[:, None] - cols).abs())
    result = {"images": n_images, "grid": [GRID, GRID], "uniform": {}, "layers": []}
    for k in (1, 2, 3):
        win = (cheb <= k).float()
        result["uniform"][f"{2 * k + 1}x{2 * k + 1}"] = round(float(win.sum(1).mean() / GRID**2), 4)
    for li, a in enumerate(attns):
        cls_mass = a[:, :, 1:, 0].mean(dim=(0, 2))  # (H,)
        pp = a[:, :, 1:, 1:]
        pp = pp / pp.sum(-1, keepdim=True)
        layer = {"layer": li, "cls_key_mass": [round(float(x), 4) for x in cls_mass]}
        for k in (1, 2, 3):
            win = (cheb <= k).float()
            share = (pp * win).sum(-1).mean(dim=(0, 2))  # (H,)
            name = f"{2 * k + 1}x{2 * k + 1}"
            layer[name] = round(float(share.mean()), 4)
            layer[f"{name}_per_head"] = [round(float(x), 4) for x in share]
        result["layers"].append(layer)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/models/attnc-tiny-vit")
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--steps", type=int, default=0, help="step-driven schedule (overrides minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d0", type=float, default=0.3, help="starting make_shapes difficulty")
    ap.add_argument("--curriculum", type=float, default=0.3, help="share of training to reach 1")
    ap.add_argument("--pos-init", type=float, default=0.0,
                    help="position embeddings start as a 2-D sin-cos code times this (0: random)")
    ap.add_argument("--mimetic", type=float, default=0.0,
                    help="mimetic attention init strength (0: the HF default init)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast (6x slower than fp32 on a CPU without AVX512-BF16/AMX)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-images", type=int, default=256)
    ap.add_argument("--final-images", type=int, default=2048)
    ap.add_argument("--locality-images", type=int, default=64)
    ap.add_argument("--probe", action="store_true", help="time a few configs and exit")
    ap.add_argument("--locality-only", action="store_true", help="re-measure a saved model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args)
    elif args.locality_only:
        print(json.dumps(final_metrics(Path(args.out), args), indent=1))
    else:
        train(args)


if __name__ == "__main__":
    main()
