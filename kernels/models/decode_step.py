"""A multi-layer decode step with a real model's tensor sizes (the CUDA-graph lab's workload).

``DecodeStepModel``: token embedding, ``layers`` pre-norm blocks (RMSNorm, fused QKV
projection, rotate-half RoPE, the new token's K/V written into a paged cache, our paged
decode attention, output projection, RMSNorm, SwiGLU MLP), final RMSNorm and an LM head tied
to the embedding. Seeded random weights (scaled 1/sqrt(fan-in)); sizes from a ``StepConfig``
(``QWEN25_05B``: Qwen2.5-0.5B's 24 layers, hidden 896, 14/2 heads of 64, MLP 4864, vocab
151936; ``TINY`` for the CPU).

The step is written as pieces over a ``StepBuffers`` (every tensor a piece reads or writes
between pieces lives there), so that the eager step, one whole-step CUDA graph (FULL) and
graphs around the non-attention pieces (PIECEWISE, see ``step_graphs``) run the same code:

    embed -> [pre_attention(l) -> attention(l) -> post_attention(l)] * layers -> head

Matmuls in the model dtype (bf16 on the GPU), norms and residual in float32, float32 logits.
``reference_step``: the same step in float64 with the float64 attention reference, from the
same weights and cache: the check of the eager step itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.attention.persistent_decode import persistent_decode_attention
from kvperf_kernels.formats.checks import check_tensor
from kvperf_kernels.models.llama import apply_rope, rms_norm

ATTENTION = {"batched": paged_decode_attention, "persistent": persistent_decode_attention}


@dataclass(frozen=True)
class StepConfig:
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 1e6
    eps: float = 1e-6

    @property
    def qkv_width(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim


QWEN25_05B = StepConfig(layers=24, hidden=896, q_heads=14, kv_heads=2, head_dim=64,
                        intermediate=4864, vocab=151936)
TINY = StepConfig(layers=2, hidden=128, q_heads=4, kv_heads=2, head_dim=64, intermediate=256,
                  vocab=512)


@dataclass
class StepBuffers:
    """Inputs, the residual stream and the attention boundary of one step of ``batch`` rows."""

    tokens: torch.Tensor  # int64 [B]
    positions: torch.Tensor  # int64 [B]: the new token's position (= tokens cached before)
    slots: torch.Tensor  # int64 [B]: its flat cache slot (page * page_size + offset)
    block_tables: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B] = positions + 1
    x: torch.Tensor  # float32 [B, hidden]
    q: torch.Tensor  # [B, Hq, D] model dtype
    attn: torch.Tensor  # [B, Hq, D]
    logits: torch.Tensor  # float32 [B, vocab]
    next_tokens: torch.Tensor  # int64 [B]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


class DecodeStepModel:
    """Weights, a paged KV cache per layer, and the step's pieces (see the module docstring)."""

    def __init__(self, cfg: StepConfig, *, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, device=None, seed: int = 0,
                 attention: str = "batched"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {tuple(ATTENTION)}, got {attention!r}")
        self.cfg, self.dtype, self.page_size, self.attention = cfg, dtype, page_size, attention
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def w(*shape, scale=None):
            scale = scale if scale is not None else shape[0] ** -0.5
            return (torch.randn(*shape, generator=gen, device=self.device) * scale).to(dtype)

        h, c = cfg.hidden, cfg
        self.embed = w(c.vocab, h, scale=1.0)
        self.blocks = [
            dict(norm1=1.0 + 0.1 * torch.randn(h, generator=gen, device=self.device),
                 wqkv=w(h, c.qkv_width), wo=w(c.q_heads * c.head_dim, h),
                 norm2=1.0 + 0.1 * torch.randn(h, generator=gen, device=self.device),
                 wgu=w(h, 2 * c.intermediate), wdown=w(c.intermediate, h))
            for _ in range(c.layers)
        ]
        self.norm_f = torch.ones(h, device=self.device)
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2,
                                                            device=self.device).float()
                                                / c.head_dim))
        # K and V of every layer: [layers, 2, num_pages, page_size, Hkv, D]; the last page is
        # the scratch page that padded rows of a graph bucket write to and read from.
        self.cache = torch.zeros(c.layers, 2, num_pages, page_size, c.kv_heads, c.head_dim,
                                 dtype=dtype, device=self.device)
        self.scratch_page = num_pages - 1

    # --- cache and buffers ------------------------------------------------------------------
    def set_cache(self, cache: torch.Tensor) -> None:
        """Copy a cache snapshot in (the same tensor stays: graphs captured its address)."""
        check_cache(cache, self.cache)
        self.cache.copy_(cache)

    def new_buffers(self, batch: int, max_pages: int) -> StepBuffers:
        c, dev = self.cfg, self.device
        return StepBuffers(
            tokens=torch.zeros(batch, dtype=torch.int64, device=dev),
            positions=torch.zeros(batch, dtype=torch.int64, device=dev),
            slots=torch.zeros(batch, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(batch, max_pages, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(batch, dtype=torch.int32, device=dev),
            x=torch.zeros(batch, c.hidden, dtype=torch.float32, device=dev),
            q=torch.zeros(batch, c.q_heads, c.head_dim, dtype=self.dtype, device=dev),
            attn=torch.zeros(batch, c.q_heads, c.head_dim, dtype=self.dtype, device=dev),
            logits=torch.zeros(batch, c.vocab, dtype=torch.float32, device=dev),
            next_tokens=torch.zeros(batch, dtype=torch.int64, device=dev),
        )

    # --- the pieces -------------------------------------------------------------------------
    def embed_tokens(self, b: StepBuffers) -> None:
        b.x.copy_(self.embed[b.tokens].float())

    def pre_attention(self, layer: int, b: StepBuffers) -> None:
        """RMSNorm, QKV, RoPE, the new token's K/V into the cache; q to the boundary."""
        c, p = self.cfg, self.blocks[layer]
        h = rms_norm(b.x, p["norm1"], c.eps).to(self.dtype)
        qkv = (h @ p["wqkv"]).float()
        nq, nk = c.q_heads * c.head_dim, c.kv_heads * c.head_dim
        q = qkv[:, :nq].reshape(-1, c.q_heads, c.head_dim)
        k = qkv[:, nq:nq + nk].reshape(-1, c.kv_heads, c.head_dim)
        v = qkv[:, nq + nk:].reshape(-1, c.kv_heads, c.head_dim)
        angles = b.positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        q = apply_rope(q, cos, sin, "rotate_half")
        k = apply_rope(k, cos, sin, "rotate_half")
        kc = self.cache[layer, 0].view(-1, c.kv_heads, c.head_dim)
        vc = self.cache[layer, 1].view(-1, c.kv_heads, c.head_dim)
        kc.index_copy_(0, b.slots, k.to(self.dtype))
        vc.index_copy_(0, b.slots, v.to(self.dtype))
        b.q.copy_(q.to(self.dtype))

    def attend(self, layer: int, b: StepBuffers) -> None:
        """Our paged decode kernel, unchecked (no sync: capturable), into b.attn."""
        ATTENTION[self.attention](b.q, self.cache[layer, 0], self.cache[layer, 1],
                                  b.block_tables, b.seq_lens, checked=False, out=b.attn)

    def post_attention(self, layer: int, b: StepBuffers) -> None:
        c, p = self.cfg, self.blocks[layer]
        x = b.x + (b.attn.reshape(b.batch, -1) @ p["wo"]).float()
        h = rms_norm(x, p["norm2"], c.eps).to(self.dtype)
        gate, up = (h @ p["wgu"]).chunk(2, dim=-1)
        b.x.copy_(x + ((F.silu(gate.float()) * up.float()).to(self.dtype) @ p["wdown"]).float())

    def lm_head(self, b: StepBuffers) -> None:
        h = rms_norm(b.x, self.norm_f, self.cfg.eps).to(self.dtype)
        b.logits.copy_((h @ self.embed.T).float())
        b.next_tokens.copy_(b.logits.argmax(-1))

    def step(self, b: StepBuffers) -> None:
        """The eager step over buffers already filled (``fill_inputs``)."""
        self.embed_tokens(b)
        for layer in range(self.cfg.layers):
            self.pre_attention(layer, b)
            self.attend(layer, b)
            self.post_attention(layer, b)
        self.lm_head(b)


def check_cache(cache: torch.Tensor, like: torch.Tensor) -> None:
    """A cache snapshot must be the model's: same shape and dtype, contiguous (the step writes
    slots through a flat view)."""
    check_tensor(cache, "cache")
    if cache.dtype != like.dtype:
        raise TypeError(f"cache dtype {cache.dtype} != the model's {like.dtype}")
    if cache.shape != like.shape:
        raise ValueError(f"cache shape {tuple(cache.shape)} != the model's {tuple(like.shape)}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous (the step writes slots through a flat view)")


def fill_inputs(b: StepBuffers, tokens, positions, block_tables, page_size: int) -> None:
    """Real rows of a step: tokens, positions (tokens already cached per sequence), their page
    table; slots and lengths derived. Rows beyond len(tokens) are left as they are."""
    n = tokens.shape[0]
    b.tokens[:n].copy_(tokens)
    b.positions[:n].copy_(positions)
    b.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
    b.seq_lens[:n].copy_((positions + 1).to(torch.int32))
    page = block_tables.long().gather(1, (positions // page_size)[:, None])[:, 0]
    b.slots[:n].copy_(page * page_size + positions % page_size)


def reference_step(model: DecodeStepModel, tokens, positions, block_tables) -> torch.Tensor:
    """Float64 logits [B, vocab] of one step from the same weights and cache (the cache is
    not modified): the float64 attention reference over the cache plus the new K/V."""
    c, dt = model.cfg, torch.float64
    cache = model.cache.to(dt).clone()
    ps = model.page_size
    page = block_tables.long().gather(1, (positions // ps)[:, None])[:, 0]
    slots = page * ps + positions % ps
    seq_lens = (positions + 1).to(torch.int32)
    x = model.embed[tokens].to(dt)
    angles = positions.to(dt)[:, None] * model.inv_freq.to(dt)[None, :]
    cos, sin = angles.cos(), angles.sin()
    nq, nk = c.q_heads * c.head_dim, c.kv_heads * c.head_dim
    for layer, p in enumerate(model.blocks):
        qkv = rms_norm(x, p["norm1"].to(dt), c.eps) @ p["wqkv"].to(dt)
        q = apply_rope(qkv[:, :nq].reshape(-1, c.q_heads, c.head_dim), cos, sin, "rotate_half")
        k = apply_rope(qkv[:, nq:nq + nk].reshape(-1, c.kv_heads, c.head_dim), cos, sin,
                       "rotate_half")
        v = qkv[:, nq + nk:].reshape(-1, c.kv_heads, c.head_dim)
        cache[layer, 0].view(-1, c.kv_heads, c.head_dim)[slots] = k
        cache[layer, 1].view(-1, c.kv_heads, c.head_dim)[slots] = v
        attn = paged_decode_attention_ref(q, cache[layer, 0], cache[layer, 1], block_tables,
                                          seq_lens)
        x = x + attn.reshape(x.shape[0], -1) @ p["wo"].to(dt)
        gate, up = (rms_norm(x, p["norm2"].to(dt), c.eps) @ p["wgu"].to(dt)).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ p["wdown"].to(dt)
    return rms_norm(x, model.norm_f.to(dt), c.eps) @ model.embed.to(dt).T
