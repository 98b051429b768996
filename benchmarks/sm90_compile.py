"""Compile attnc's flash kernel for an H100 (sm_90a) ahead of time, without a GPU, and report what
the compiler made of each kernel variant: whether it compiles, shared memory, registers and
spills (ptxas -v), and the ops that matter in the Triton GPU IR (wgmma dots, TMA vs cp.async
copies, layout conversions). This is static evidence, not timing: it says whether a variant can
run on Hopper and whether its loads and dots took the fast forms.

    python benchmarks/sm90_compile.py [--cases na2d,dense] [--quick] [--cc 80] [--out FILE.json]

`--cc 80` compiles for an A100 instead (sm_80: mma.sync dots, no TMA, so no descriptor variant).

The launch arguments are those `flash._launch` passes for the benchmark cases of
`benchmarks/kernels.py` (captured, not launched), specialised the way Triton's JIT does (ints
equal to 1 become constants, multiples of 16 and pointers get 16-divisibility).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COUNT = {
    "wgmma": r"ttng\.warp_group_dot ",
    "mma_sync": r"= tt\.dot ",  # left as tt.dot: mma.sync (pre-Hopper) or FMA
    "tma_load": r"ttng\.async_tma_copy_global_to_local",
    "cp_async": r"ttg\.async_copy_global_to_local",
    "plain_load": r"= tt\.load ",
    "convert_layout": r"ttg\.convert_layout",
    "loops": r"scf\.for ",
}


def _capture(case, cfg):
    """The (args, kwargs) `flash._launch` would pass the kernel for this case and config."""
    import torch

    from attnc.kernels import flash

    sys.path.insert(0, str(HERE))
    import kernels as kb  # benchmarks/kernels.py

    c = dict(case)
    # batch and heads are runtime ints to the kernel: fewer of them, less memory, same code
    h = min(c["h"], 4)
    c["b"], c["h"], c["hkv"] = 1, h, max(1, h * c["hkv"] // c["h"])
    q, k, v, pat, causal, layout, _ = kb._setup(c, "cpu", torch.bfloat16)
    seen = {}

    class Grab:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen["args"], seen["kw"] = args, kw
            return launch

    real_kernel, real_interp = flash._fwd_kernel, flash._interpret
    flash._fwd_kernel, flash._interpret = Grab(), (lambda: True)
    try:
        flash.attention_fwd(q, k, v, causal=causal, scale=c["d"] ** -0.5, pattern=pat,
                            layout=layout, config=cfg)
    finally:
        flash._fwd_kernel, flash._interpret = real_kernel, real_interp
    seen["kw"]["IEEE"] = False  # bf16 on a GPU: tensor-core dots
    return seen["args"], seen["kw"], real_kernel


def _source(kernel, args, kw):
    import torch
    from triton.compiler import ASTSource

    names = kernel.arg_names
    consts = {kk: vv for kk, vv in kw.items() if kk not in ("num_warps", "num_stages")}
    sig, attrs = {}, {}
    tmap = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
    for i, (name, a) in enumerate(zip(names, args, strict=False)):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + tmap[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool) or a is None:
            consts[name] = a
            sig[name] = "constexpr"
        elif isinstance(a, int):
            if a == 1:
                consts[name] = 1
                sig[name] = "constexpr"
            else:
                sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    for name in consts:
        sig[name] = "constexpr"
    return ASTSource(kernel, sig, constexprs=consts, attrs=attrs)


def _ptxas(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia import compiler as nv

    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    exe = nv.get_ptxas(arch=cc).path if hasattr(nv, "get_ptxas") else "ptxas"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([exe, f"-arch={arch}", "-v", str(p), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    out = {}
    if m := re.search(r"Used (\d+) registers", text):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        out["spill_store_bytes"], out["spill_load_bytes"] = int(m.group(1)), int(m.group(2))
    return out


def compile_variant(case, cfg, cc: int = 90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    args, kw, kernel = _capture(case, cfg)
    src = _source(kernel, args, kw)
    row = dict(case=case["name"], config=cfg)
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=cfg["num_warps"],
                                         num_stages=cfg["num_stages"]))
    except Exception as e:  # noqa: BLE001  (a variant that does not compile is a result)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    ttgir = ck.asm["ttgir"]
    row["ops"] = {kk: len(re.findall(p, ttgir)) for kk, p in COUNT.items()}
    row["shared_bytes"] = ck.metadata.shared
    row.update(_ptxas(ck.asm["ptx"], cc))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    ap.add_argument("--out", default=None,
                    help="default: results/sm90_compile-triton<version>.json")
    ap.add_argument("--quick", action="store_true", help="one tile config (64x64, 4 warps)")
    ap.add_argument("--cc", type=int, default=90, choices=[80, 86, 89, 90],
                    help="compute capability to compile for (90: H100/H200, 80: A100)")
    a = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from attnc.kernels import flash

    sys.path.insert(0, str(HERE))
    import kernels as kb

    tiles = [{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
             {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}]
    if a.quick:
        tiles = tiles[:1]
    rows = []
    for case in kb._cases("gpu"):
        if a.cases and not any(w in case["name"] for w in a.cases.split(",")):
            continue
        natten = case["kind"] == "natten" and all(d == 1 for d in case["dil"])
        loops = [{"na_loop": n} for n in flash.NA_LOOPS] if natten else [{}]
        for t in tiles:
            for lp in loops:
                for tma in ({}, {"kv_tma": 1}) if a.cc >= 90 else ({},):
                    row = compile_variant(case, {**t, **lp, **tma}, a.cc)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    arch = "sm_90a" if a.cc == 90 else f"sm_{a.cc}"
    meta = dict(target=f"cuda {arch} (compiled offline, no GPU)", triton=triton.__version__)
    name = "sm90_compile" if a.cc == 90 else f"sm{a.cc}_compile"
    out = Path(a.out or HERE / "results" / f"{name}-triton{triton.__version__}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
