"""GPU check of the lowering path: capture a model on CUDA, lower every dense SDPA site to
`attnc::attention`, and confirm the lowered graph runs attnc's Triton flash kernel (counted) and
matches the original. Writes benchmarks/results/gpu_pipeline-<device>.json.

    python benchmarks/gpu_pipeline_check.py          # needs a CUDA device
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import attnc.kernels.flash as flash
    from attnc.capture.program import capture
    from attnc.export.artifacts import lower_dense
    from attnc.load.models import load_model

    calls = {"n": 0}
    real = flash.attention_fwd

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    flash.attention_fwd = counting
    rows = []
    for name, dtype in (("attnc-tiny-llama", "float32"), ("attnc-tiny-llama", "bfloat16")):
        loaded = load_model(str(ROOT / "examples/models" / name), dtype=dtype)
        loaded.module.to("cuda")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (4, 256), generator=g).cuda()
        loaded.example_args = (ids, torch.ones_like(ids))
        program = capture(loaded)
        with torch.no_grad():
            ref = program(*loaded.example_args).float()
        n_sites = lower_dense(program)
        calls["n"] = 0
        with torch.no_grad():
            got = program(*loaded.example_args).float()
        rel = float((got - ref).norm() / ref.norm())
        rows.append({"model": name, "dtype": dtype, "sites_lowered": n_sites,
                     "triton_calls": calls["n"], "rel_error_vs_sdpa": rel,
                     "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())})
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    out = ROOT / "benchmarks" / "results" / f"gpu_pipeline-{device}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
