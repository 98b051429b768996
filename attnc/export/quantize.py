"""INT8 quantization of the exported ONNX file, through `onnxruntime.quantization`.

Dynamic INT8 quantizes the weights of MatMul nodes only: ORT's `quantize_dynamic` would also turn
the standard `Attention` op into `QAttention`, which its own CPU provider then rejects as invalid.
Static INT8 (`int8-static`) calibrates activation ranges on the build's calibration batches.
Both are approximate steps: the build verifies, bounds and times them like a pass.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from attnc.errors import ExportError

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8-dynamic", "int8-static")


def quantize_onnx(
    src: Path,
    dst: Path,
    mode: str,
    calib_inputs: Sequence[dict[str, torch.Tensor]] = (),
) -> dict:
    """Write an INT8 copy of `src` to `dst`; returns what was done, for the report."""
    if mode not in QUANT_MODES or mode == "none":
        raise ExportError(f"unknown quantization {mode!r}: use {', '.join(QUANT_MODES[1:])}")
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    try:
        if mode == "int8-dynamic":
            quantize_dynamic(
                str(src),
                str(dst),
                op_types_to_quantize=["MatMul"],
                weight_type=QuantType.QInt8,
            )
        else:
            if not calib_inputs:
                raise ExportError("int8-static needs calibration batches")
            quantize_static(
                str(src),
                str(dst),
                _Reader(calib_inputs),
                op_types_to_quantize=["MatMul"],
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT's errors are many; one line for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{mode} quantization failed: {first}") from exc
    return {
        "mode": mode,
        "op_types": ["MatMul"],
        "bytes_before": src.stat().st_size,
        "bytes_after": dst.stat().st_size,
    }


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the build's calibration batches."""

    def __init__(self, feeds: Sequence[dict[str, torch.Tensor]]):
        self._it = iter([{k: v.numpy() for k, v in f.items()} for f in feeds])

    def get_next(self):
        return next(self._it, None)


def quantize_in_place(path: Path, mode: str, calib_inputs=()) -> dict:
    """Quantize `path` into a temporary file beside it, then replace it; external data files
    the quantized file no longer reads (it is written as one file) are removed."""
    from attnc.export import external_data as ext

    before = set(ext.external_files(ext.load_graph(path)))
    fd, tmp = tempfile.mkstemp(prefix=".quant-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        info = quantize_onnx(path, tmp_p, mode, calib_inputs)
        os.replace(tmp_p, path)
    finally:
        tmp_p.unlink(missing_ok=True)
    for name in before - set(ext.external_files(ext.load_graph(path))):
        (path.parent / name).unlink(missing_ok=True)
    info["layout"] = ext.layout(path)
    return info
