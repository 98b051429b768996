"""Big ONNX files: weights as external data beside `model.onnx`.

A protobuf message cannot exceed 2 GiB, and writing or reading one holds all of it in memory
(several times over: serialised bytes, the parsed message, the checker's copy), so a model whose
weights pass `limit()` (512 MiB) is written as `model.onnx` (the graph) plus `model.onnx.data`
(the weights, written tensor by tensor from the torch tensors, never as one in-memory protobuf).
Every later step edits the graph only: files are read with `load_graph` (external data left on
disk) and written back with `save_graph`, which keeps the references to the data file. ONNX
Runtime and `onnx.checker` read the pair by path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from attnc.errors import ExportError

# torch's exporter switches to external data at 1.5 GiB of initializers; the whole proto
# (graph, metadata) must stay under 2 GiB: past this, a single file is refused
PROTOBUF_LIMIT = 1536 * 2**20
# past this, external data by default: an inline file costs 2-4x the weights in memory while it is
# written, checked and edited (measured on a 0.3 B fp32 Llama: 1.9 -> 5.3 GB resident)
DEFAULT_LIMIT = 512 * 2**20
LIMIT_ENV = "ATTNC_ONNX_EXTERNAL_LIMIT"  # bytes; tests force the external path with a tiny one


def limit() -> int:
    """The initializer bytes past which ONNX weights go to an external data file."""
    raw = os.environ.get(LIMIT_ENV)
    if not raw:
        return DEFAULT_LIMIT
    try:
        return max(0, int(raw))
    except ValueError:
        raise ExportError(f"{LIMIT_ENV}={raw!r} is not a number of bytes") from None


def weight_bytes(gm: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters, buffers) a graph module holds."""
    seen: set[int] = set()
    n = 0
    for t in [*gm.parameters(), *gm.buffers()]:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        n += t.numel() * t.element_size()
    return n


def wanted(gm: torch.nn.Module, request: bool | None) -> bool:
    """External data when the recipe asks for it (True), never when it forbids it (False, and
    then the weights must fit), else when the weights pass `limit()`."""
    size = weight_bytes(gm)
    if request is False and size > PROTOBUF_LIMIT:
        raise ExportError(
            f"the weights take {size / 2**30:.2f} GiB, more than one ONNX protobuf can hold",
            "remove export.external_data: false from the recipe",
        )
    if request is not None:
        return bool(request)
    return size > limit()


def save_external(model: Any, path: Path, mapped: list[torch.Tensor]) -> None:
    """Write the exporter's `model` (an onnx_ir model) as `path` plus `<name>.data`, as
    `ONNXProgram.save(external_data=True)` does, paging the memory-mapped torch weights in
    `mapped` out every 64 MiB written: writing reads every weight, and without this all of them
    would be resident at the end (the kernel reads a page back from its file if it is used)."""
    import onnx_ir as ir

    written = [0]  # bytes since the last page-out

    def paged(tensor: Any, info: Any) -> None:
        written[0] += int(getattr(tensor, "nbytes", 0) or 0)
        if written[0] >= 64 << 20:
            written[0] = 0
            page_out(mapped)

    ir.save(model, str(path), external_data=f"{path.name}.data", callback=paged)
    page_out(mapped)


def load_graph(path: Path) -> Any:
    """The ONNX model at `path` with external data left on disk (references kept)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def save_graph(model: Any, path: Path) -> None:
    """Write `model` back to `path`; external tensors keep pointing at their data file(s)."""
    import onnx

    onnx.save(model, str(path))


def check(path: Path) -> None:
    """onnx.checker on the file by path (which is how it reads models past 2 GiB)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"the exported ONNX file fails the checker: {str(exc).splitlines()[0]}"
        ) from exc


def external_files(model: Any) -> dict[str, int]:
    """{data file name: bytes its tensors take} over the initializers stored externally."""
    import onnx

    out: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        name = info.get("location", "")
        out[name] = out.get(name, 0) + int(info.get("length", 0) or 0)
    return out


def initializer_bytes(model: Any) -> int:
    """Bytes of all initializers, inline or external."""
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    return inline + sum(external_files(model).values())


def layout(path: Path, model: Any | None = None) -> dict[str, Any]:
    """What a deployer copies: the graph file and its data file(s), with their sizes."""
    model = load_graph(path) if model is None else model
    files = {path.name: path.stat().st_size}
    for name in sorted(external_files(model)):
        data = path.parent / name
        if not data.is_file():
            raise ExportError(f"{path.name} names the external data file {name}, which is missing")
        files[name] = data.stat().st_size
    return {
        "external_data": len(files) > 1,
        "files": files,
        "total_bytes": sum(files.values()),
    }


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages now; contents never change (a hint)


def page_out(tensors) -> int:
    """Ask the kernel to drop the resident pages of `tensors` whose memory is a file mapping
    (weights memory-mapped from safetensors): they are read back from the file on the next use,
    with the same bytes (MADV_PAGEOUT changes no contents, unlike MADV_DONTNEED). Used while ONNX
    Runtime reads its own mapped copy of the weights, so that the two are not resident at once.
    Returns the bytes advised; 0 where the platform has no such call (a no-op)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        maps = [ln.split() for ln in Path("/proc/self/maps").read_text().splitlines()]
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    files = []  # (start, end) of file-backed mappings (an inode, a path)
    for f in maps:
        if len(f) >= 6 and f[4] != "0" and f[5].startswith("/"):
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            files.append((lo, hi))
    page = os.sysconf("SC_PAGE_SIZE")
    spans = set()
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        st = t.untyped_storage()
        a, b = st.data_ptr(), st.data_ptr() + st.nbytes()
        for lo, hi in files:
            if lo <= a < hi:
                spans.add((max(lo, a - a % page), min(hi, b)))
                break
    n = 0
    for a, b in sorted(spans):
        if libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_PAGEOUT) == 0:
            n += b - a
    return n
