"""Numerical comparison of an optimized model against the original: max abs diff, per-token
cosine, SQNR (dB) and top-1 agreement, on held-out calibration batches, over real tokens only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnc.errors import ExportError, VerificationError
from attnc.load.calibration import Batch


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out)
    if isinstance(out, (list, tuple)) and out:
        return _first(out[0])
    raise VerificationError(f"cannot compare an output of type {type(out).__name__}")


def _pruned_sequence(ref: torch.Tensor, out: torch.Tensor) -> bool:
    """`out` lost sequence positions (axis 1) and nothing else: a token-pruned model, whose
    outputs align with the original's only at the last position (which pruning always keeps)."""
    return (
        ref.dim() >= 2
        and ref.dim() == out.dim()
        and out.shape[1] < ref.shape[1]
        and ref.shape[0] == out.shape[0]
        and ref.shape[2:] == out.shape[2:]
    )


@dataclass
class _Acc:
    max_abs: float = 0.0
    cos_sum: float = 0.0
    cos_n: float = 0.0
    sig: float = 0.0
    err: float = 0.0
    top1_hit: float = 0.0
    top1_n: float = 0.0
    nonfinite: int = 0
    want_top1: bool = False

    def add(self, ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None, top1: bool):
        ref, out = ref.double(), out.double()
        if _pruned_sequence(ref, out):  # token pruning: the last position stays, compare it
            ref, out, mask = ref[:, -1:], out[:, -1:], None
        if ref.shape != out.shape:
            raise VerificationError(
                f"output shape {tuple(out.shape)} != original {tuple(ref.shape)}"
            )
        self.nonfinite += int((~torch.isfinite(out)).sum())
        w = None
        if mask is not None and ref.dim() >= 2 and tuple(mask.shape) == tuple(ref.shape[:2]):
            w = mask.to(torch.float64)
        diff = (ref - out).abs()
        if w is not None:
            diff = diff * w.reshape(*w.shape, *([1] * (ref.dim() - 2)))
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.numel() else 0.0)
        vec_ref = ref if ref.dim() >= 2 else ref.unsqueeze(-1)
        vec_out = out if out.dim() >= 2 else out.unsqueeze(-1)
        cos = torch.nn.functional.cosine_similarity(vec_ref, vec_out, dim=-1, eps=1e-12)
        sq_sig = vec_ref.pow(2).sum(-1)
        sq_err = (vec_ref - vec_out).pow(2).sum(-1)
        hit = (vec_ref.argmax(-1) == vec_out.argmax(-1)).double()
        if w is not None and tuple(cos.shape) == tuple(w.shape):
            self.cos_sum += float((cos * w).sum())
            self.cos_n += float(w.sum())
            self.sig += float((sq_sig * w).sum())
            self.err += float((sq_err * w).sum())
            self.top1_hit += float((hit * w).sum())
            self.top1_n += float(w.sum())
        else:
            self.cos_sum += float(cos.sum())
            self.cos_n += cos.numel()
            self.sig += float(sq_sig.sum())
            self.err += float(sq_err.sum())
            self.top1_hit += float(hit.sum())
            self.top1_n += hit.numel()
        self.want_top1 = top1

    def metrics(self) -> dict[str, float]:
        sqnr = math.inf if self.err == 0 else 10.0 * math.log10(max(self.sig, 1e-300) / self.err)
        m = {
            "max_abs_diff": self.max_abs,
            "cosine": self.cos_sum / self.cos_n if self.cos_n else float("nan"),
            "sqnr_db": sqnr,
            "nonfinite": self.nonfinite,
        }
        if self.want_top1:
            m["top1"] = self.top1_hit / self.top1_n if self.top1_n else float("nan")
        return m


class Memo:
    """A runner that computes each batch once: the build compares the same held-out batches for
    verification, task metrics and the ONNX check, so each model runs over them only once."""

    def __init__(self, run: Callable[..., Any]):
        self.run = run
        self._seen: dict[tuple[int, ...], tuple[tuple, Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple(id(a) for a in args)
        hit = self._seen.get(key)
        if hit is None or not all(a is b for a, b in zip(hit[0], args, strict=True)):
            with torch.no_grad():
                hit = (args, self.run(*args))
            self._seen[key] = hit
        return hit[1]


def reference_outputs(run: Callable[..., Any], batches: Sequence[Batch]) -> list[torch.Tensor]:
    from attnc.progress import track

    with torch.no_grad():
        return [
            _first(run(*b.args)).detach()
            for b in track(batches, "running the original", len(batches))
        ]


def compare(
    run: Callable[..., Any],
    batches: Sequence[Batch],
    refs: Sequence[torch.Tensor],
    top1: bool,
) -> dict[str, float]:
    """Run `run` on each batch and compare with `refs` (outputs of the original)."""
    from attnc.progress import track

    acc = _Acc()
    with torch.no_grad():
        pairs = list(zip(batches, refs, strict=True))
        for b, ref in track(pairs, "comparing on held-out batches", len(pairs)):
            acc.add(ref, _first(run(*b.args)), b.token_mask, top1)
    return acc.metrics()


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus what bounds read from combinations: the relative bits-per-byte rise."""
    out = dict(metrics)
    bpb, orig = out.get("bits_per_byte"), out.get("bits_per_byte_original")
    if "bits_per_byte_increase" not in out and bpb is not None and orig:
        out["bits_per_byte_increase"] = (bpb - orig) / orig
    return out


def meets(metrics: dict[str, float], bound: Any) -> tuple[bool, list[str]]:
    """Check `metrics` against a FidelityBound; returns (ok, reasons it failed). A bound whose
    metric was not measured, or came out NaN, fails: a bound is never met by default."""
    from attnc.recipe.bounds import BOUND_KEYS

    metrics = derived_metrics(metrics)
    fails = []
    if metrics.get("nonfinite", 0):
        fails.append(f"{metrics['nonfinite']} non-finite outputs")
    for bkey, (mkey, side, _kinds, _what) in BOUND_KEYS.items():
        b = getattr(bound, bkey, None) if bound is not None else None
        if b is None:
            continue
        v = metrics.get(mkey)
        if v is None:
            fails.append(f"{mkey} was not measured, so {bkey} {b:g} cannot be checked")
        elif isinstance(v, float) and math.isnan(v):
            fails.append(f"{mkey} is NaN, so {bkey} {b:g} cannot be checked")
        elif not (v >= b if side == "min" else v <= b):
            fails.append(f"{mkey} {v:.6g} misses {bkey} {b:g}")
    return (not fails), fails


def _ort_msg(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def ort_options(optimize: bool = True, low_memory: bool = False):
    """ONNX Runtime session options. `low_memory` (the float32-compute copy of a bf16/fp16
    model, whose every weight feeds a Cast to float32): nodes run in the file's order (the
    priority order's tie-break; the default order runs every Cast of an initializer first, so all
    the float32 weights are alive at once), and no CPU arena or memory pattern (each would keep
    the largest float32 weights allocated): each weight is cast when its layer runs and freed
    after it, so the peak is the mapped low-precision weights plus about one layer's float32."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if low_memory:
        # no prepacked (re-laid-out) copy of the weights: the mapped file's pages are used
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    return so


def ort_runner(onnx_path: str, input_names: list[str], optimize: bool = True,
               low_memory: bool = False):
    """A callable running the ONNX file in ONNX Runtime (CUDA provider when present);
    `optimize` and `low_memory` as in `ort_options`."""
    import onnxruntime as ort

    so = ort_options(optimize, low_memory)
    providers = [
        p
        for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if p in ort.get_available_providers()
    ]
    try:
        sess = ort.InferenceSession(onnx_path, so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT's errors are many: one line, named
        name = Path(onnx_path).name
        raise ExportError(f"ONNX Runtime cannot load {name}: {_ort_msg(exc)}") from exc
    names = [i.name for i in sess.get_inputs()]

    def run(*args: torch.Tensor):
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=False)}
        try:
            return torch.from_numpy(sess.run(None, feed)[0])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(
                f"ONNX Runtime cannot run {Path(onnx_path).name}: {_ort_msg(exc)}",
                "the exported graph uses an op/dtype pair this ONNX Runtime build lacks",
            ) from exc

    run.providers = sess.get_providers()  # type: ignore[attr-defined]
    return run


# per floating dtype of the weights: ONNX Runtime vs torch may differ by this many units in the
# last place of the output's largest magnitude (accumulation order differs between runtimes)
_ULPS = 8
_EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def onnx_tolerance(recipe: Any, program: Any, refs: Sequence[torch.Tensor]) -> float:
    """export.onnx_max_abs_diff when the recipe sets it; else the float32 default, widened for a
    bf16/fp16 program to `_ULPS` units in the last place of the largest reference output."""
    given = (recipe.raw.get("export") or {}).get("onnx_max_abs_diff")
    base = float(recipe.export.onnx_max_abs_diff)
    if given is not None:
        return base
    from attnc.export.artifacts import _source_dtype

    eps = _EPS.get(_source_dtype(program))
    if eps is None:
        return base
    scale = max([1.0] + [float(r.detach().abs().max()) for r in refs if r.numel()])
    return max(base, _ULPS * eps * scale)


def ort_check_file(onnx_path: Path, info: dict) -> tuple[Path, bool]:
    """The file ONNX Runtime verifies, and whether with graph optimizations: `model.onnx`, or
    on a machine without CUDA its float32-compute copy (a bf16 model; unoptimized, so ORT does
    not fold a float32 copy of every weight: run it with `ort_options(False, low_memory=True)`,
    so each weight is cast when its layer runs)."""
    import onnxruntime as ort

    copy = (info.get("cpu_fp32_compute_copy") or {}).get("file")
    if copy and "CUDAExecutionProvider" not in ort.get_available_providers():
        return onnx_path.with_name(copy), False
    if copy:
        onnx_path.with_name(copy).unlink(missing_ok=True)
    return onnx_path, True
