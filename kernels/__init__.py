"""attnc's attention ops: one `attnc::<op>` custom op per pattern.

Importing this package registers every op (with its fake kernel and ONNX translation).
Each op runs its Triton kernel on CUDA and its plain-PyTorch reference elsewhere.
"""

from __future__ import annotations

from attnc.kernels import attention as _attention  # noqa: F401  (registers attnc::attention)
from attnc.kernels.onnx import translation_table

__all__ = ["translation_table"]
from attnc.kernels import block_sparse as _block_sparse  # noqa: F401,E402
from attnc.kernels import neighborhood as _neighborhood  # noqa: F401,E402
from attnc.kernels import patterns as _patterns  # noqa: F401,E402  (attnc::attention_colsum)
from attnc.kernels import routed_attention as _routed_attention  # noqa: F401,E402
from attnc.kernels import sink_calibrated as _sink_calibrated  # noqa: F401,E402
from attnc.kernels import sliding_window as _sliding_window  # noqa: F401,E402
