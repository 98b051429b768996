"""`.pt2` weights written straight from the tensors' storages.

`torch.export.save` turns every weight into a `bytes` object (`_get_raw_tensor_bytes`) before the
zip writer copies it to the file, and the next tensor's copy is made before the last one is freed:
two of the largest tensors at once, as Python bytes, on top of the weights (measured +2x a 125 MB
tensor on a 0.3 B Llama). `streaming()` makes the same writer take each tensor's storage instead
(`PyTorchFileWriter.write_record` accepts one, as `torch.save` uses it), so no copy is made; the
file's bytes are the same. A weight memory-mapped from safetensors is paged out once written
(`page_out`: the kernel reads it back from the file on its next use), so writing the archive does
not make every weight resident. Where torch's private layout differs from what is patched here,
the plain `torch.export.save` path runs unchanged (a copy, not a failure).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _Storage:
    """A tensor's whole CPU storage, handed to the archive writer in place of its bytes."""

    def __init__(self, tensor) -> None:
        self.tensor = tensor
        self.storage = tensor.untyped_storage()
        self.nbytes = self.storage.nbytes()


@contextlib.contextmanager
def streaming() -> Iterator[bool]:
    """Within the block, `torch.export.save` writes raw weights from their storages (no bytes
    copy) and pages each memory-mapped one out after writing it. Yields whether it could patch
    torch's writer (False: torch's own path, unchanged)."""
    try:
        from torch.export.pt2_archive import _package as pkg

        get_bytes = pkg._get_raw_tensor_bytes
        write_bytes = pkg.PT2ArchiveWriter.write_bytes
        fake = pkg._is_fake_tensor
    except (ImportError, AttributeError):  # pragma: no cover - another torch layout
        yield False
        return
    from attnc.export.external_data import page_out

    def raw(value):
        if fake(value) or value.device.type != "cpu" or not value.data_ptr():
            return get_bytes(value)  # fake, empty or on a device: torch's own handling
        return _Storage(value)

    def write(self, name: str, data) -> None:
        if not isinstance(data, _Storage):
            return write_bytes(self, name, data)
        self.archive_file.write_record(name, data.storage, data.nbytes)
        page_out([data.tensor])  # a mapped weight is read back from its file when next used
        return None

    pkg._get_raw_tensor_bytes = raw
    pkg.PT2ArchiveWriter.write_bytes = write
    try:
        yield True
    finally:
        pkg._get_raw_tensor_bytes = get_bytes
        pkg.PT2ArchiveWriter.write_bytes = write_bytes
