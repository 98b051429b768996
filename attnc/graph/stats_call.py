"""The inputs of one attention call as the statistics read them (`attnc.graph.stats`): SDPA's
arguments checked and normalised, the keys the original attention allows, and its softmax
probabilities for one tile of (one sequence, a block of query rows, every key) at a time."""

from __future__ import annotations

import math

import torch

from attnc.errors import KernelError, PassError

# a float mask entry at or below this masks its key (kernels.masks.mask_allowed's rule: Hugging
# Face masks with finfo.min or -inf, older models with -1e4; exp of it underflows in float32)
MASKED = -1e4


class CallInputs:
    """One attention call's inputs, checked, with per-tile scores and allowed-key masks."""

    def __init__(self, q, k, attn_mask=None, is_causal=False, scale=None, key_padding_mask=None,
                 query_mask=None, softcap=None):
        if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1]:
            raise PassError(f"attention statistics need q (B, H, Sq, D) and k (B, Hkv, Skv, D), "
                            f"got {tuple(q.shape)} and {tuple(k.shape)}")
        self.B, self.H, self.Sq, self.D = q.shape
        self.Hkv, self.Skv = k.shape[1], k.shape[2]
        if k.shape[0] not in (1, self.B) or self.Hkv < 1 or self.H % self.Hkv:
            raise PassError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch, or "
                            f"query heads not a multiple of kv heads)")
        self.q, self.k = q, k
        self.scale = 1.0 / math.sqrt(self.D) if scale is None else float(scale)
        self.causal, self.softcap = bool(is_causal), softcap
        self.bool_mask = self.bias = None
        if attn_mask is not None:
            m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            try:
                torch.broadcast_shapes(m.shape, (self.B, self.H, self.Sq, self.Skv))
            except RuntimeError:
                raise PassError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to the "
                                f"scores {(self.B, self.H, self.Sq, self.Skv)}") from None
            if m.dtype == torch.bool:
                self.bool_mask = m
            else:
                self.bias = m
        self.kpm = _check_tokens(key_padding_mask, (self.B, self.Skv), "key_padding_mask")
        self.qm = _check_tokens(query_mask, (self.B, self.Sq), "query_mask")
        self._kf: tuple[int, torch.Tensor] | None = None

    @property
    def device(self):
        return self.q.device

    def tiles(self, chunk_bytes: int):
        """(b, rows) covering every query row, rows a block sized for `chunk_bytes`."""
        n = max(1, chunk_bytes // (4 * self.H * max(self.Skv, 1)))
        for b in range(self.B):
            for r0 in range(0, self.Sq, n):
                yield b, torch.arange(r0, min(r0 + n, self.Sq), device=self.device)

    def allowed(self, b: int, rows: torch.Tensor) -> torch.Tensor | None:
        """(H|1, n, Skv) bool: the keys the original attention lets rows see, or None (all)."""
        out = None
        if self.bool_mask is not None:
            out = _tile(self.bool_mask, b, rows)
        if self.bias is not None:
            t = _tile(self.bias, b, rows)
            ok = t > MASKED
            out = ok if out is None else out & ok
        if self.causal:
            c = torch.arange(self.Skv, device=self.device)[None, None, :] <= rows[None, :, None]
            out = c if out is None else out & c
        if self.kpm is not None:
            kp = self.kpm[b][None, None, :]
            out = kp if out is None else out & kp
        return out

    def probs(self, b: int, rows: torch.Tensor, allowed: torch.Tensor | None,
              normalize: bool = True):
        """(p (H, n, Skv) float32, row total (H, n), row valid (H, n)): softmax over A_i, or
        without `normalize` exp(s - row max), which `total` normalises."""
        if self._kf is None or self._kf[0] != b:
            self._kf = (b, self.k[b if self.k.shape[0] > 1 else 0].float())
        g, n = self.H // self.Hkv, rows.numel()
        qb = self.q[b].index_select(1, rows).float().reshape(self.Hkv, g * n, self.D)
        s = torch.matmul(qb * self.scale, self._kf[1].transpose(-1, -2)).view(self.H, n, self.Skv)
        if self.softcap:
            s = torch.tanh(s / self.softcap).mul_(self.softcap)
        if self.bias is not None:
            s.add_(_tile(self.bias, b, rows).float())
        if allowed is not None:
            s.masked_fill_(~allowed, float("-inf"))
        mx = s.amax(-1, keepdim=True)  # (H, n, 1); -inf: the row sees no key
        finite = torch.isfinite(mx)
        s.sub_(torch.where(finite, mx, 0.0)).exp_()  # rows that see nothing stay 0
        total, valid = s.sum(-1), finite[..., 0]
        if normalize:
            s.div_(torch.where(finite, total.unsqueeze(-1), 1.0))
            total = torch.where(valid, 1.0, 0.0)
        if self.qm is not None:
            valid = valid & self.qm[b].index_select(0, rows)[None, :]
        return s, total, valid

    def index_grids(self, b: int, rows: torch.Tensor):
        """(b, h, q, kv) integer tensors for a `MaskMod` over one tile."""
        dev = self.device
        return (torch.tensor(b, device=dev), torch.arange(self.H, device=dev)[:, None, None],
                rows[None, :, None], torch.arange(self.Skv, device=dev)[None, None, :])

    def flash_mask(self) -> torch.Tensor | None:
        """The site's mask (padding keys folded in, masked float entries -inf) for the kernels."""
        m = self.bool_mask
        if self.bias is not None:
            m = self.bias.float().masked_fill(self.bias <= MASKED, float("-inf"))
        if self.kpm is not None:
            kp = self.kpm[:, None, None, :]
            if m is None or m.dtype == torch.bool:
                m = kp if m is None else m & kp
            else:
                m = m.masked_fill(~kp, float("-inf"))
        return m


def _check_tokens(mask, shape, name) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise PassError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.bool()


def _tile(m: torch.Tensor, b: int, rows: torch.Tensor) -> torch.Tensor:
    """(Hm, n|1, Skv|1) slice of a 4-D broadcastable mask for sequence b and query rows."""
    t = m[b if m.shape[0] > 1 else 0]
    return t.index_select(1, rows) if t.shape[1] > 1 else t



def flash_backend(backend: str, call: CallInputs):
    """The `kernels.flash` module when the Triton path serves this call, else None."""
    if backend not in ("auto", "torch", "triton"):
        raise PassError(f"unknown statistics backend {backend!r}", "auto, torch or triton")
    if backend == "torch" or (backend == "auto" and call.device.type != "cuda"):
        return None
    try:
        from attnc.kernels import flash
    except ImportError:
        flash, reason = None, "triton is not installed"
    else:
        k = call.k.expand(call.B, *call.k.shape[1:])
        reason = flash.can_use_flash(call.q, k, k, call.flash_mask())
        if call.softcap:
            reason = "the scores are soft-capped"
    if reason is None:
        return flash
    if backend == "triton":
        raise KernelError(f"the Triton statistics path cannot run: {reason}",
                          "use backend='torch'")
    return None
