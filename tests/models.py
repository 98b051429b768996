"""Small hand-written models used across the test suite.

Every model takes token ids `(B, S)` int64 (plus pixel values for the VLM) and returns logits or
hidden states. Each `make_<name>(seed=0)` returns `(model.eval(), example_args)`; sizes are tiny
(hidden 32-64, 2 layers, vocab 128) so a CPU run takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 128
MAX_SEQ = 64


def _ids(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)  # (B, S)


# --------------------------------------------------------------------------------------------
# nanoGPT: manual causal attention with a registered lower-triangular `bias` buffer.


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, block_size: int):
        super().__init__()
        self.n_head, self.n_embd = n_head, dim
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(0.0)
        self.resid_dropout = nn.Dropout(0.0)
        tril = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer("bias", tril.view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPTMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_head, block_size)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GPTMLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, dim: int = 48, n_head: int = 4, n_layer: int = 2, block_size: int = MAX_SEQ):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.h = nn.ModuleList(NanoBlock(dim, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)  # (S,)
        x = self.wte(idx) + self.wpe(pos)  # (B, S, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, S, V)


# --------------------------------------------------------------------------------------------
# gpt-fast / llama family: RMSNorm, RoPE, SwiGLU, GQA.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_seq: int, base: float = 10000.0) -> tuple[torch.Tensor, ...]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (D/2,)
    ang = torch.outer(torch.arange(max_seq).float(), inv)  # (S, D/2)
    ang = torch.cat([ang, ang], dim=-1)  # (S, D)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, S, D); cos/sin: (S, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Llama's repeat_kv: (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D) by expand + reshape."""
    b, hkv, s, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, hkv, n_rep, s, d)  # (B, Hkv, R, S, D)
    return x.reshape(b, hkv * n_rep, s, d)  # (B, H, S, D)


class GQAAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv: int, manual: bool):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim, self.manual = n_head, n_kv, dim // n_head, manual
        self.wq = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.wk(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.wv(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_head // self.n_kv
        if self.manual:
            k, v = repeat_kv(k, rep), repeat_kv(v, rep)  # (B, H, S, D)
            q = q * (1.0 / math.sqrt(self.head_dim))
            mask = torch.full((S, S), float("-inf"), device=x.device).triu(1)  # (S, S)
            scores = torch.matmul(q, k.transpose(2, 3)) + mask  # (B, H, S, S)
            probs = F.softmax(scores.float(), dim=-1).type_as(q)
            y = torch.matmul(probs, v)  # (B, H, S, D)
        else:
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))  # (B, S, C)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv: int, manual: bool):
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = GQAAttention(dim, n_head, n_kv, manual)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = SwiGLU(dim, 2 * dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class GPTFast(nn.Module):
    """gpt-fast-style causal LM; `manual=True` gives ManualGQA's hand-written attention."""

    def __init__(self, dim=64, n_head=4, n_kv=2, n_layer=2, manual=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, n_head, n_kv, manual) for _ in range(n_layer))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)
        cos, sin = rope_tables(dim // n_head, MAX_SEQ)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        S = idx.shape[1]
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]  # (S, D)
        x = self.tok_embeddings(idx)  # (B, S, C)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))  # (B, S, V)


class ManualGQA(GPTFast):
    def __init__(self, dim=64, n_head=4, n_kv=2, n_layer=2):
        super().__init__(dim, n_head, n_kv, n_layer, manual=True)


# --------------------------------------------------------------------------------------------
# BERT-like post-norm encoder with a padding mask.


class EncoderSelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, manual: bool):
        super().__init__()
        self.n_head, self.head_dim, self.manual = n_head, dim // n_head, manual
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, S, C = h.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, S, self.n_head, self.head_dim).permute(0, 2, 1, 3)  # (B, H, S, D)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        if self.manual:
            scores = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(self.head_dim)
            if attention_mask is not None:  # float additive mask, (B, 1, 1, S)
                ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
                scores = scores + ext
            y = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, S, D)
        else:
            mask = None
            if attention_mask is not None:
                mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, D)
        return self.out(y.permute(0, 2, 1, 3).reshape(B, S, C))  # (B, S, C)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, n_head: int, manual: bool):
        super().__init__()
        self.attention = EncoderSelfAttention(dim, n_head, manual)
        self.attention_norm = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, 4 * dim)
        self.output = nn.Linear(4 * dim, dim)
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention_norm(h + self.attention(h, attention_mask))
        return self.output_norm(h + self.output(F.gelu(self.intermediate(h))))


class TinyEncoder(nn.Module):
    """Post-norm BERT-like encoder; returns hidden states (B, S, C)."""

    def __init__(self, dim=32, n_head=4, n_layer=2, manual=False):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, dim)
        self.position_embeddings = nn.Embedding(MAX_SEQ, dim)
        self.embeddings_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, n_head, manual) for _ in range(n_layer))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (S,)
        h = self.embeddings_norm(self.embeddings(input_ids) + self.position_embeddings(pos))
        for layer in self.layers:
            h = layer(h, attention_mask)
        return h  # (B, S, C)


# --------------------------------------------------------------------------------------------
# Tiny VLM: ViT patch encoder -> projector -> causal LM over [prefix, image, suffix].


class SDPASelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, causal: bool):
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_head, C // self.n_head)  # (B, S, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, S, D)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))  # (B, S, C)


class SDPABlock(nn.Module):
    def __init__(self, dim: int, n_head: int, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SDPASelfAttention(dim, n_head, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GPTMLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyVLM(nn.Module):
    N_PREFIX = 2  # input_ids[:, :2] come before the image tokens, the rest after them

    def __init__(self, vis_dim=32, dim=48, n_head=4, n_layer=2, patch=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, vis_dim, kernel_size=patch, stride=patch)
        self.vis_pos = nn.Parameter(torch.randn(1, (32 // patch) ** 2, vis_dim) * 0.02)
        self.vision_layers = nn.ModuleList([SDPABlock(vis_dim, n_head, causal=False)])
        self.vision_norm = nn.LayerNorm(vis_dim)
        self.projector = nn.Linear(vis_dim, dim)
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(SDPABlock(dim, n_head, causal=True) for _ in range(n_layer))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, 16, Cv)
        p = p + self.vis_pos
        for layer in self.vision_layers:
            p = layer(p)
        img = self.projector(self.vision_norm(p))  # (B, 16, C)
        both = torch.cat([img, self.embed(input_ids)], dim=1)  # (B, 16+S, C): [image, text]
        # Reorder to [text[:2], image, text[2:]] with a gather, not slices, so that export keeps
        # the sequence length symbolic down to S = 2 (slices would specialise S - 2 in {0, 1}).
        n_img, pos = img.shape[1], torch.arange(both.shape[1], device=both.device)  # (16+S,)
        src = torch.where(pos < self.N_PREFIX, pos + n_img, pos - self.N_PREFIX)
        src = torch.where(pos < self.N_PREFIX + n_img, src, pos)
        x = both.index_select(1, src)  # (B, S+16, C)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))  # (B, S+16, V)


# --------------------------------------------------------------------------------------------
# Models without attention.


class NoAttention(nn.Module):
    def __init__(self, dim=32, n_layer=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(GPTMLP(dim) for _ in range(n_layer))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)  # (B, S, C)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)  # (B, S, V)


class SoftmaxGate(nn.Module):
    """A softmax used as a mixture-of-experts gate, not attention: must not be canonicalised."""

    def __init__(self, dim=32, n_experts=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.gate = nn.Linear(dim, n_experts)
        self.experts = nn.Linear(dim, n_experts * dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)  # (B, S, C)
        w = torch.softmax(self.gate(x), dim=-1)  # (B, S, E)
        e = self.experts(x).view(*x.shape[:2], w.shape[-1], -1)  # (B, S, E, C)
        x = x + torch.matmul(w.unsqueeze(-2), e).squeeze(-2)  # (B, S, C)
        return self.head(x)


# --------------------------------------------------------------------------------------------
# Factories.


def _seeded(seed: int, cls: Callable[..., nn.Module], **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).eval()


def make_nanogpt(seed: int = 0):
    return _seeded(seed, NanoGPT), (_ids(seed),)


def make_gpt_fast(seed: int = 0):
    return _seeded(seed, GPTFast), (_ids(seed),)


def make_manual_gqa(seed: int = 0):
    return _seeded(seed, ManualGQA), (_ids(seed),)


def _padding(batch: int = 2, seq: int = 12) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)  # (B, S)
    mask[-1, seq - 3 :] = 0  # the last row is padded at the end
    return mask


def make_tiny_encoder(seed: int = 0):
    return _seeded(seed, TinyEncoder), (_ids(seed), _padding())


def make_tiny_encoder_manual(seed: int = 0):
    return _seeded(seed, TinyEncoder, manual=True), (_ids(seed), _padding())


def make_tiny_vlm(seed: int = 0):
    model = _seeded(seed, TinyVLM)
    g = torch.Generator().manual_seed(seed + 2)
    return model, (_ids(seed, seq=6), torch.randn(2, 3, 32, 32, generator=g))


def make_no_attention(seed: int = 0):
    return _seeded(seed, NoAttention), (_ids(seed),)


def make_softmax_gate(seed: int = 0):
    return _seeded(seed, SoftmaxGate), (_ids(seed),)


ALL_HANDWRITTEN: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "nanogpt": make_nanogpt,
    "gpt_fast": make_gpt_fast,
    "manual_gqa": make_manual_gqa,
    "tiny_encoder": make_tiny_encoder,
    "tiny_encoder_manual": make_tiny_encoder_manual,
    "tiny_vlm": make_tiny_vlm,
    "no_attention": make_no_attention,
}
