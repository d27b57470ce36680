"""A KV-cache-heavy attention block under Transformer Engine recipes, and its torch reference.

Block (pre-norm, decode with a cache):
  qkv  = LayerNormLinear(x)                 TE module, quantised GEMM under the recipe
  q, k, v split as [q heads | k heads | v heads] along the output features
  K/V of past and new tokens are stored compressed (``kv_format``: fp8 per-token/block,
  MXFP8 or NVFP4 with the project's quantisers) and dequantised to BF16 before attending
  attn = softmax(q k^T / sqrt(D)) v          causal over the new tokens, GQA
  out  = Linear(attn)                       TE module, quantised GEMM under the recipe

``attention_block_ref`` is the same block in torch with the same weights, computed in
float32 over the uncompressed cache (or over a compressed one, to isolate the cache's
share of the error). It runs anywhere; ``TEAttentionBlock`` needs TE and a CUDA GPU.

TE's FP8/FP4 GEMMs need both GEMM dims divisible by 16: every block dim (hidden, head_dim)
and the token count of a call (batch * tokens) must be multiples of 16, else ValueError
naming the dim (TE itself asserts stricter alignments for some recipes with its own text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvperf_kernels.attention.compressed import CompressedKV, compress, decompress
from kvperf_kernels.cache.kv_memory import check_positive
from kvperf_kernels.formats.checks import check_same_device, check_tensor
from kvperf_kernels.quant.groups import tensor_amax_ref
from kvperf_kernels.te.availability import import_te
from kvperf_kernels.te.recipes import (
    KV_FORMAT_FOR_RECIPE,
    LADDER,
    make_calibration_recipe,
    make_recipe,
    te_autocast,
)

ALIGN = 16
LN_EPS = 1e-5
# Formats whose scales are local to a (token, head) row (NVFP4 with a fixed global amax):
# appending tokens one call at a time stores exactly what compressing all at once would.
ROW_LOCAL_FORMATS = ("bf16", "fp8_per_token", "fp8_per_block128", "mxfp8", "nvfp4")


def _check_multiple(name: str, value: int, align: int = ALIGN) -> None:
    check_positive(**{name: value})
    if value % align:
        raise ValueError(
            f"{name}={value} is not a multiple of {align}: TE's FP8/FP4 GEMMs need every "
            f"dimension divisible by {align}"
        )


def _compress_kv(k, v, kv_format: str, amax) -> tuple[CompressedKV, CompressedKV]:
    """K and V stored in kv_format; amax (k, v) fixes NVFP4's global scales (else None)."""
    return (compress(k.contiguous(), kv_format, global_amax=amax[0]),
            compress(v.contiguous(), kv_format, global_amax=amax[1]))


@dataclass(frozen=True)
class BlockDims:
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self):
        _check_multiple("hidden", self.hidden)
        _check_multiple("head_dim", self.head_dim)
        check_positive(q_heads=self.q_heads, kv_heads=self.kv_heads)
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads={self.q_heads} is not a multiple of "
                             f"kv_heads={self.kv_heads} (GQA)")

    @property
    def qkv_features(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def attn_features(self) -> int:
        return self.q_heads * self.head_dim


@dataclass
class BlockWeights:
    ln_weight: torch.Tensor  # [hidden]
    ln_bias: torch.Tensor  # [hidden]
    qkv_weight: torch.Tensor  # [qkv_features, hidden]
    qkv_bias: torch.Tensor  # [qkv_features]
    proj_weight: torch.Tensor  # [hidden, attn_features]
    proj_bias: torch.Tensor  # [hidden]


def random_weights(dims: BlockDims, *, generator: torch.Generator, device=None,
                   dtype: torch.dtype = torch.bfloat16) -> BlockWeights:
    """Seeded weights at the scale of a trained block (unit-variance activations)."""
    g = generator

    def rnd(*shape, std=1.0, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    return BlockWeights(
        ln_weight=rnd(dims.hidden, std=0.1, mean=1.0),
        ln_bias=rnd(dims.hidden, std=0.1),
        qkv_weight=rnd(dims.qkv_features, dims.hidden, std=1.0 / math.sqrt(dims.hidden)),
        qkv_bias=rnd(dims.qkv_features, std=0.02),
        proj_weight=rnd(dims.hidden, dims.attn_features, std=1.0 / math.sqrt(dims.attn_features)),
        proj_bias=rnd(dims.hidden, std=0.02),
    )


def _check_hidden(x: torch.Tensor, dims: BlockDims, what: str) -> None:
    check_tensor(x, what)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be a float tensor, got {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != dims.hidden:
        raise ValueError(f"{what} must be [batch, tokens, hidden={dims.hidden}], "
                         f"got {tuple(x.shape)}")


def _split_qkv(qkv: torch.Tensor, dims: BlockDims):
    b, s, _ = qkv.shape
    hq, hkv, d = dims.q_heads, dims.kv_heads, dims.head_dim
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.reshape(b, s, hq, d), k.reshape(b, s, hkv, d), v.reshape(b, s, hkv, d)


def _causal_decode_mask(new: int, past: int, device) -> torch.Tensor:
    """[new, past + new] bool: new token i (position past + i) sees keys 0 .. past + i."""
    keys = torch.arange(past + new, device=device)
    return keys[None, :] <= (past + torch.arange(new, device=device))[:, None]


def _amax(t: torch.Tensor) -> torch.Tensor:
    return tensor_amax_ref(t.detach())  # 0 for no tokens


# --------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------

def attention_block_ref(w: BlockWeights, dims: BlockDims, x_past: torch.Tensor,
                        x_new: torch.Tensor, *, kv_format: str | None = None) -> torch.Tensor:
    """float32 output [B, S, hidden] of the block over past + new tokens.

    ``kv_format`` None: the cache is exact (float32). Otherwise K/V of all tokens are
    stored in that format (NVFP4 with the past tokens' amax as global amax, as the TE
    block without calibration does) and read back before attending.
    """
    if not isinstance(w, BlockWeights) or not isinstance(dims, BlockDims):
        raise TypeError(f"w and dims must be BlockWeights and BlockDims, got "
                        f"{type(w).__name__} and {type(dims).__name__}")
    _check_hidden(x_past, dims, "x_past")
    _check_hidden(x_new, dims, "x_new")
    if x_new.shape[0] != x_past.shape[0]:
        raise ValueError(f"x_new batch {x_new.shape[0]} != x_past batch {x_past.shape[0]}")
    check_same_device(x_past, "x_past", w.qkv_weight, "the weights")
    check_same_device(x_new, "x_new", w.qkv_weight, "the weights")
    f32 = torch.float32

    def project(x):
        ln = F.layer_norm(x.to(f32), (dims.hidden,), w.ln_weight.to(f32), w.ln_bias.to(f32),
                          LN_EPS)
        return _split_qkv(ln @ w.qkv_weight.to(f32).T + w.qkv_bias.to(f32), dims)

    _, k_past, v_past = project(x_past)
    q, k_new, v_new = project(x_new)
    k = torch.cat([k_past, k_new], dim=1)
    v = torch.cat([v_past, v_new], dim=1)
    if kv_format is not None:
        if kv_format not in ROW_LOCAL_FORMATS:
            raise ValueError(f"kv_format {kv_format!r} is not one of {ROW_LOCAL_FORMATS}")
        amax = (_amax(k_past), _amax(v_past)) if kv_format == "nvfp4" else (None, None)
        k, v = (decompress(c, f32) for c in _compress_kv(k, v, kv_format, amax))
    b, s, hq, d = q.shape
    hkv = dims.kv_heads
    past = x_past.shape[1]
    logits = torch.einsum("bshgd,bthd->bhgst", q.reshape(b, s, hkv, hq // hkv, d), k)
    logits = logits / math.sqrt(d)
    logits = logits.masked_fill(~_causal_decode_mask(s, past, q.device), float("-inf"))
    p = torch.softmax(logits, dim=-1)
    attn = torch.einsum("bhgst,bthd->bshgd", p, v).reshape(b, s, dims.attn_features)
    return attn @ w.proj_weight.to(f32).T + w.proj_bias.to(f32)


# --------------------------------------------------------------------------------------
# The TE block
# --------------------------------------------------------------------------------------

def _cat_compressed(a: CompressedKV, b: CompressedKV) -> CompressedKV:
    """Append b's tokens (dim 1) to a; row-local formats only.

    NVFP4 rows of a and b must come from the same global amax (the block passes its one
    ``kv_amax`` to every call), so a's global scale stands for both; comparing them here
    would cost a device sync per decode step.
    """
    if a.fmt != b.fmt:
        raise ValueError(f"cannot append {b.fmt} rows to a {a.fmt} cache")
    tensors = {}
    for name, t in a.tensors.items():
        tensors[name] = t if name == "global_scale" else torch.cat([t, b.tensors[name]], dim=1)
    shape = (a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
    return CompressedKV(a.fmt, shape, tensors)


class TEAttentionBlock:
    """The block on TE modules, run under one rung of the recipe ladder.

    ``calibrate`` (the NVFP4 rung's FP8 calibration) runs forward passes under
    ``autocast(enabled=False, calibrating=True, recipe=DelayedScaling)`` and keeps the
    largest K/V amax seen: the NVFP4 cache's global scale. Without calibration the
    prefill's amax is used. ``prefill`` stores the past tokens' K/V compressed; ``decode``
    projects new tokens, appends their K/V (unless ``append=False``), attends over the
    dequantised cache and projects out.
    """

    def __init__(self, dims: BlockDims, weights: BlockWeights, *, recipe: str,
                 kv_format: str | None = None):
        if recipe not in LADDER:
            raise ValueError(f"unknown recipe {recipe!r}; the ladder is {LADDER}")
        kv_format = KV_FORMAT_FOR_RECIPE[recipe] if kv_format is None else kv_format
        if kv_format not in ROW_LOCAL_FORMATS:
            raise ValueError(f"kv_format {kv_format!r} is not one of {ROW_LOCAL_FORMATS}: a "
                             "per-tensor scale would change as the cache grows")
        device = weights.qkv_weight.device
        if device.type != "cuda":
            raise ValueError(f"TE modules run on a CUDA GPU; the weights are on {device}")
        self.te = import_te()
        self.dims, self.recipe_name, self.kv_format = dims, recipe, kv_format
        self.recipe = make_recipe(recipe)
        te_ = self.te
        bf16 = torch.bfloat16
        self.qkv = te_.LayerNormLinear(dims.hidden, dims.qkv_features, eps=LN_EPS, bias=True,
                                       normalization="LayerNorm", params_dtype=bf16,
                                       device=device)
        self.proj = te_.Linear(dims.attn_features, dims.hidden, bias=True, params_dtype=bf16,
                               device=device)
        with torch.no_grad():
            self.qkv.layer_norm_weight.copy_(weights.ln_weight)
            self.qkv.layer_norm_bias.copy_(weights.ln_bias)
            self.qkv.weight.copy_(weights.qkv_weight)
            self.qkv.bias.copy_(weights.qkv_bias)
            self.proj.weight.copy_(weights.proj_weight)
            self.proj.bias.copy_(weights.proj_bias)
        self.qkv.eval()
        self.proj.eval()
        self.k_cache: CompressedKV | None = None
        self.v_cache: CompressedKV | None = None
        self.kv_amax: tuple[torch.Tensor, torch.Tensor] | None = None  # from calibration
        self.calibration_steps = 0

    def _check_tokens(self, x: torch.Tensor, what: str) -> None:
        _check_hidden(x, self.dims, what)
        if x.dtype != torch.bfloat16:
            raise TypeError(f"{what} must be bfloat16, got {x.dtype}")
        check_same_device(x, what, self.qkv.weight, "the block")
        if x.numel():  # no tokens (an empty batch) runs no GEMM
            _check_multiple(f"{what} batch*tokens", x.shape[0] * x.shape[1])

    def _project_qkv(self, x, recipe, **autocast_kw):
        with te_autocast(self.te, recipe, **autocast_kw):
            return _split_qkv(self.qkv(x), self.dims)

    def _project_out(self, attn, recipe, **autocast_kw):
        with te_autocast(self.te, recipe, **autocast_kw):
            return self.proj(attn)

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor]) -> None:
        """FP8 calibration passes (high-precision math, amax recorded by TE and by us)."""
        cal = make_calibration_recipe()
        kw = dict(enabled=False, calibrating=True)
        k_amax = v_amax = None
        for x in batches:
            self._check_tokens(x, "calibration batch")
            if not x.numel():
                continue
            q, k, v = self._project_qkv(x, cal, **kw)
            attn = self._attend(q, k.to(torch.bfloat16), v.to(torch.bfloat16), past=0)
            self._project_out(attn, cal, **kw)
            k_amax = _amax(k) if k_amax is None else torch.maximum(k_amax, _amax(k))
            v_amax = _amax(v) if v_amax is None else torch.maximum(v_amax, _amax(v))
            self.calibration_steps += 1
        if k_amax is not None:
            self.kv_amax = (k_amax, v_amax)

    def _compress(self, k, v) -> tuple[CompressedKV, CompressedKV]:
        amax = self.kv_amax if self.kv_format == "nvfp4" else (None, None)
        return _compress_kv(k, v, self.kv_format, amax)

    def _attend(self, q, k, v, *, past: int):
        """q [B, S, Hq, D], k/v [B, past+S, Hkv, D] bf16 -> [B, S, Hq*D] bf16 (SDPA)."""
        b, s, hq, d = q.shape
        hkv = k.shape[2]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if hkv != hq:
            kh = kh.repeat_interleave(hq // hkv, dim=1)
            vh = vh.repeat_interleave(hq // hkv, dim=1)
        mask = _causal_decode_mask(s, past, q.device)
        out = F.scaled_dot_product_attention(qh.to(torch.bfloat16), kh, vh, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, s, hq * d)

    @torch.no_grad()
    def prefill(self, x_past: torch.Tensor) -> None:
        self._check_tokens(x_past, "x_past")
        if x_past.numel():
            _, k, v = self._project_qkv(x_past, self.recipe)
        else:  # no tokens: an empty cache of the right shape, no GEMM
            d = self.dims
            k = v = x_past.new_empty(*x_past.shape[:2], d.kv_heads, d.head_dim)
        if self.kv_format == "nvfp4" and self.kv_amax is None:
            self.kv_amax = (_amax(k), _amax(v))
        self.k_cache, self.v_cache = self._compress(k, v)

    @torch.no_grad()
    def decode(self, x_new: torch.Tensor, *, append: bool = True) -> torch.Tensor:
        """bf16 output [B, S, hidden] for the new tokens over the cache."""
        if self.k_cache is None:
            raise RuntimeError("decode before prefill: the block has no KV cache")
        self._check_tokens(x_new, "x_new")
        if x_new.shape[0] != self.k_cache.shape[0]:
            raise ValueError(f"x_new batch {x_new.shape[0]} != cache batch "
                             f"{self.k_cache.shape[0]}")
        if not x_new.numel():  # an empty batch or no new tokens: nothing to attend
            return x_new.new_empty(x_new.shape)
        q, k, v = self._project_qkv(x_new, self.recipe)
        k_new, v_new = self._compress(k, v)
        k_all, v_all = _cat_compressed(self.k_cache, k_new), _cat_compressed(self.v_cache, v_new)
        if append:
            self.k_cache, self.v_cache = k_all, v_all
        past = k_all.shape[1] - x_new.shape[1]
        attn = self._attend(q, decompress(k_all, torch.bfloat16),
                            decompress(v_all, torch.bfloat16), past=past)
        return self._project_out(attn, self.recipe)

    def forward(self, x_past: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """prefill(x_past) then decode(x_new): the comparison with ``attention_block_ref``."""
        self.prefill(x_past)
        return self.decode(x_new)
