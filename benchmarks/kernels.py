"""Benchmark attnc's attention kernels against torch SDPA and FlexAttention, in one run.

    python benchmarks/kernels.py                 # GPU: times, speedups, TFLOP/s, JSON
    python benchmarks/kernels.py --device cpu    # CPU: correctness of the Triton kernels
                                                 # (interpreter) vs reference; no timings

For every case: torch SDPA dense (flash backend), SDPA with the same boolean mask, FlexAttention
(torch.compile'd, create_block_mask from the same masks.py predicate) and attnc. TFLOP/s count
only the visible tiles at attnc's tile size (4 * BM * BN * D flops per (b, h, tile)), against
989 TFLOP/s (H100 SXM bf16 dense). Writes benchmarks/results/kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}


def _cases(device: str):
    if device == "cpu":
        return [
            dict(name="dense", kind="dense", b=1, h=2, hkv=1, s=67, d=32, causal=False),
            dict(name="dense-causal", kind="dense", b=1, h=2, hkv=1, s=67, d=80, causal=True),
            dict(name="na1d", kind="natten", b=1, h=2, hkv=2, s=96, d=32, grid=[96],
                 ks=[15], dil=[1], st=[1], ca=[False]),
            dict(name="na2d", kind="natten", b=1, h=2, hkv=2, s=144, d=32, grid=[12, 12],
                 ks=[5, 5], dil=[1, 1], st=[1, 1], ca=[False, False]),
            dict(name="na3d", kind="natten", b=1, h=1, hkv=1, s=120, d=32, grid=[4, 5, 6],
                 ks=[3, 3, 3], dil=[1, 1, 2], st=[1, 1, 1], ca=[True, False, False]),
            dict(name="sliding+sinks", kind="sliding", b=1, h=2, hkv=1, s=120, d=64,
                 window=16, sinks=4, causal=True),
            dict(name="block-sparse", kind="block", b=1, h=2, hkv=2, s=128, d=32, bs=16,
                 density=0.3, causal=False),
        ]
    return [
        dict(name="dense S=8192", kind="dense", b=2, h=16, hkv=16, s=8192, d=128, causal=False,
             target="ratio_sdpa_dense>=1"),
        dict(name="dense causal S=8192", kind="dense", b=2, h=16, hkv=16, s=8192, d=128,
             causal=True, target="ratio_sdpa_dense>=1"),
        dict(name="na1d S=32768 w=2048", kind="natten", b=1, h=16, hkv=16, s=32768, d=128,
             grid=[32768], ks=[2048], dil=[1], st=[1], ca=[False], target="speedup>=8"),
        dict(name="na2d 128x128 w=31x31", kind="natten", b=1, h=16, hkv=16, s=16384, d=128,
             grid=[128, 128], ks=[31, 31], dil=[1, 1], st=[1, 1], ca=[False, False],
             target="speedup>=0.8/density"),
        dict(name="na3d 16x32x32 w=7x9x9", kind="natten", b=1, h=16, hkv=16, s=16384, d=128,
             grid=[16, 32, 32], ks=[7, 9, 9], dil=[1, 1, 1], st=[1, 1, 1],
             ca=[False, False, False]),
        dict(name="block-sparse 90% S=32768", kind="block", b=1, h=16, hkv=16, s=32768, d=128,
             bs=128, density=0.1, causal=False, target="speedup>=7"),
        dict(name="sliding w=2048+4 sinks causal S=32768", kind="sliding", b=1, h=32, hkv=8,
             s=32768, d=128, window=2048, sinks=4, causal=True),
    ]


def _setup(c, device, dtype):
    import torch

    from attnc.kernels import flash, masks

    g = torch.Generator().manual_seed(0)
    q = torch.randn(c["b"], c["h"], c["s"], c["d"], generator=g).to(device, dtype)
    k = torch.randn(c["b"], c["hkv"], c["s"], c["d"], generator=g).to(device, dtype)
    v = torch.randn(c["b"], c["hkv"], c["s"], c["d"], generator=g).to(device, dtype)
    s, causal, layout = c["s"], c.get("causal", False), None
    if c["kind"] == "dense":
        pat = flash.Pattern()

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) if causal else (qi >= 0)

    elif c["kind"] == "natten":
        pat = flash.natten_pattern(c["grid"], c["ks"], c["dil"], c["st"], c["ca"])
        mask_mod = masks.natten_mask_mod(c["grid"], c["ks"], c["dil"], c["st"], c["ca"])
    elif c["kind"] == "sliding":
        pat = flash.Pattern("sliding", window=c["window"], num_sinks=c["sinks"])
        mask_mod = masks.sliding_window_mask_mod(c["window"], c["sinks"], causal)
    else:
        n = -(-s // c["bs"])
        layout = masks.random_layout(n, n, c["density"], heads=1, seed=0, device=device)
        pat = flash.Pattern("block", block_size=c["bs"])
        mask_mod = masks.block_sparse_mask_mod(layout, c["bs"], causal)
    return q, k, v, pat, causal, layout, mask_mod


def _dense_mask(mask_mod, s, device):
    import torch

    i = torch.arange(s, device=device)
    z = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(z, z, i[:, None], i[None, :])  # (S, S)


def run_cpu(out_path: Path) -> list[dict]:
    import torch

    from attnc.kernels import autotune, flash, reference

    rows = []
    for c in _cases("cpu"):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, pat, causal, layout, mod = _setup(c, "cpu", dtype)
            allowed = _dense_mask(mod, c["s"], "cpu")
            ref, _ = reference.masked_attention(q, k, v, allowed, c["d"] ** -0.5)
            loops = flash.NA_LOOPS if flash.na_loop(pat) else (None,)
            for loop in loops:
                cfg = {**autotune.INTERPRETER_CONFIG, "na_loop": loop} if loop else None
                out, lse = flash.attention_fwd(q, k, v, causal=causal, scale=c["d"] ** -0.5,
                                               pattern=pat, layout=layout, config=cfg)
                err = (out.float() - ref.float()).abs().max().item()
                name = c["name"] + (f" ({loop} loop)" if loop else "")
                rows.append(dict(case=name, dtype=str(dtype), max_abs_err=err,
                                 density=allowed.float().mean().item()))
                print(f"{name:<26} {str(dtype):<15} max|err| {err:.2e}  "
                      f"density {rows[-1]['density']:.3f}")
    return rows


def _bench(fn):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _visible_flops(c, pat, causal, layout, cfg, device):
    """4 * BM * BN * D per visible (b, h, tile) at attnc's tile sizes."""
    from attnc.kernels import masks, tile_lists

    bm, bn, s = cfg["BLOCK_M"], cfg["BLOCK_N"], c["s"]
    if pat.kind == "dense":
        nq = -(-s // bm)
        tiles = sum(-(-min(s, (i + 1) * bm) // bn) for i in range(nq)) if causal else nq * (
            -(-s // bn))
        heads = 1
    else:
        tq = tk = None
        if pat.kind == "natten":
            reach = [a * b for a, b in zip(pat.kernel_size, pat.dilation, strict=True)]
            tq = masks.natten_tile_shape(bm, pat.grid, reach)
            tk = masks.natten_tile_shape(bn, pat.grid, reach)
        fnum, _, pnum, _ = tile_lists.lists(pat, s, s, bm, bn, layout, tq, tk, causal, device)
        tiles = int(fnum.sum() + pnum.sum())
        heads = fnum.shape[0] * fnum.shape[1]
    per_head = tiles / heads
    return 4.0 * bm * bn * c["d"] * per_head * c["b"] * c["h"]


def run_gpu(out_path: Path, only: str | None = None, meta: dict | None = None) -> list[dict]:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = "cuda"
    name = torch.cuda.get_device_name()
    peak = next((v for kk, v in PEAK_TFLOPS.items() if kk in name), None)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for c in _cases("gpu"):
        if only and not any(w in c["name"] for w in only.split(",")):
            continue
        torch.cuda.empty_cache()
        row = _gpu_case(c, dev, flex, peak, create_block_mask)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)  # partial results survive a timeout
        out_path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    return rows


def _gpu_case(c, dev, flex, peak, create_block_mask):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnc.kernels import autotune, flash

    q, k, v, pat, causal, layout, mod = _setup(c, dev, torch.bfloat16)
    s, d = c["s"], c["d"]
    scale = d**-0.5
    gqa = c["hkv"] != c["h"]
    row = dict(case=c["name"], B=c["b"], H=c["h"], Hkv=c["hkv"], S=s, D=d,
               dtype="bfloat16", target=c.get("target"))

    def ours():
        return flash.attention_fwd(q, k, v, causal=causal, scale=scale, pattern=pat,
                                   layout=layout)[0]

    out = ours()  # autotunes (cached on disk) and compiles
    cfg = autotune.choose(f"flash-{pat.kind}", q, k, causal, False, None, extra=repr(pat))
    row["config"] = cfg
    row["ms_attnc"] = _bench(ours)
    row["ms_by_variant"], row["variant_max_abs_diff"] = _variants_ab(q, k, v, pat, causal,
                                                                     layout, scale, cfg, out)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        row["ms_sdpa_dense"] = _bench(lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=False, scale=scale, enable_gqa=gqa))
        if pat.kind == "dense" and causal:
            row["ms_sdpa_dense_causal"] = _bench(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa))
    allowed = None
    if pat.kind != "dense":
        allowed = _dense_mask(mod, s, dev)
        row["density"] = allowed.float().mean().item()
        try:
            row["ms_sdpa_masked"] = _bench(lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa))
        except torch.OutOfMemoryError:
            row["ms_sdpa_masked"] = None
    else:
        row["density"] = 0.5 if causal else 1.0
    try:
        bmask = create_block_mask(mod, None, None, s, s, device=dev, BLOCK_SIZE=128,
                                  _compile=True)

        def fx():
            return flex(q, k, v, block_mask=bmask, scale=scale, enable_gqa=gqa)

        ref = fx()
        row["ms_flex"] = _bench(fx)
        row["rel_err_vs_flex"] = ((out.float() - ref.float()).norm()
                                  / ref.float().norm()).item()
    except Exception as e:  # noqa: BLE001  (a baseline failing must not stop the run)
        row["ms_flex"], row["flex_error"] = None, f"{type(e).__name__}: {e}"[:200]
    allowed = None  # free the S x S mask
    base = row["ms_sdpa_dense_causal"] if "ms_sdpa_dense_causal" in row else row[
        "ms_sdpa_dense"]
    row["ratio_sdpa_dense"] = base / row["ms_attnc"]
    row["speedup_vs_sdpa_dense"] = row["ms_sdpa_dense"] / row["ms_attnc"]
    if row.get("ms_flex"):
        row["speedup_vs_flex"] = row["ms_flex"] / row["ms_attnc"]
    if row.get("ms_sdpa_masked"):
        row["speedup_vs_sdpa_masked"] = row["ms_sdpa_masked"] / row["ms_attnc"]
    fl = _visible_flops(c, pat, causal, layout, cfg, dev)
    row["tflops_visible"] = fl / row["ms_attnc"] / 1e9
    row["pct_peak"] = 100 * row["tflops_visible"] / peak if peak else None
    row["target_met"] = _target_met(row)
    return row


def _variants_ab(q, k, v, pat, causal, layout, scale, cfg, out):
    """Every kernel variant (neighborhood loops; pointer vs tensor-descriptor K/V loads) at the
    autotuned tile config: median ms each (or the error it raised), and how far its output is
    from the autotuned one's."""
    from attnc.kernels import flash

    base = {kk: cfg[kk] for kk in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    loops = [{"na_loop": n} for n in flash.NA_LOOPS] if flash.na_loop(pat) else [{}]
    tma = [{}, {"kv_tma": 1}] if flash._tma_ok(q, k, v) else [{}]
    ms, diff = {}, 0.0
    for lp in loops:
        for t in tma:
            c2 = {**base, **lp, **t}
            name = ",".join(f"{kk}={vv}" for kk, vv in {**lp, **t}.items()) or "default"

            def fn(c2=c2):
                return flash.attention_fwd(q, k, v, causal=causal, scale=scale, pattern=pat,
                                           layout=layout, config=c2)[0]

            try:
                diff = max(diff, (fn().float() - out.float()).abs().max().item())
                ms[name] = _bench(fn)
            except Exception as e:  # noqa: BLE001  (a variant failing is a result too)
                ms[name] = f"{type(e).__name__}: {e}"[:200]
    return ms, diff


def _target_met(row) -> bool | None:
    t = row.get("target")
    flex_ok = row.get("speedup_vs_flex") is None or row["speedup_vs_flex"] >= 1.0
    if t is None:
        return flex_ok
    if t.startswith("ratio_sdpa_dense"):
        return row["ratio_sdpa_dense"] >= 1.0
    if t == "speedup>=0.8/density":
        return row["speedup_vs_sdpa_dense"] >= 0.8 / row["density"] and flex_ok
    return row["speedup_vs_sdpa_dense"] >= float(t.split(">=")[1]) and flex_ok


def _table(rows) -> str:
    head = (f"{'case':<38}{'attnc ms':>10}{'sdpa ms':>10}{'masked':>10}{'flex ms':>10}"
            f"{'x dense':>9}{'x flex':>8}{'TF/s':>8}{'%peak':>7}  target")
    lines = [head]

    def f(x, w, p=3):
        return f"{x:>{w}.{p}f}" if isinstance(x, float) else f"{'-':>{w}}"

    for r in rows:
        base = r.get("ms_sdpa_dense_causal", r["ms_sdpa_dense"])
        lines.append(
            f"{r['case']:<38}{f(r['ms_attnc'], 10)}{f(base, 10)}{f(r.get('ms_sdpa_masked'), 10)}"
            f"{f(r.get('ms_flex'), 10)}{f(base / r['ms_attnc'], 9, 2)}"
            f"{f(r.get('speedup_vs_flex'), 8, 2)}{f(r['tflops_visible'], 8, 0)}"
            f"{f(r.get('pct_peak'), 7, 1)}  {r.get('target') or ''} "
            f"{'met' if r['target_met'] else 'MISSED'}")
    for r in rows:  # the variant A/B at the tuned tiles
        ms = {kk: vv for kk, vv in (r.get("ms_by_variant") or {}).items() if isinstance(vv, float)}
        if len(ms) > 1:
            best = min(ms, key=ms.get)
            parts = ", ".join(f"{kk} {vv:.3f}" for kk, vv in ms.items())
            lines.append(f"  {r['case']}: {parts} ms; best {best}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    slug = "cpu" if args.device == "cpu" else dev_name.replace(" ", "-").lower()
    out_path = Path(args.out or Path(__file__).parent / "results" / f"kernels-{slug}.json")
    meta = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                mode="correctness only (Triton interpreter)" if args.device == "cpu"
                else "forward, bf16, median of do_bench (L2 flushed)",
                peak_tflops=PEAK_TFLOPS.get("H100") if "H100" in dev_name else None)
    rows = run_cpu(out_path) if args.device == "cpu" else run_gpu(out_path, args.cases, meta)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    if args.device == "cuda":
        print(_table(rows))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
