"""Decode attention over a compressed KV cache: dequantise, then attend.

One place that knows every KV storage format of the project (the names of
``kvperf_kernels.cache.kv_memory``) and how to store a K or V tensor in it with the project's
quantisers (Triton kernels in ``quant.fp8``, ``quant.mxfp8``, ``quant.nvfp4``) and read it back.

``attend_compressed`` is the unfused path an engine without fused kernels pays for:
the quantisers' dequantise kernels write a BF16 copy of K and V, then attention runs on
it (``torch.nn.functional.scaled_dot_product_attention``: flash/cuDNN on an H100, the math
backend on the CPU). Its cost against plain BF16 attention is what the speed suite
measures. ``decode_attention_ref`` is the float64 reference on the original cache.

Layouts: q ``[B, Hq, D]`` (one decode token per sequence), K/V ``[B, T, Hkv, D]``
(token-major, as a cache is appended), GQA with Hq a multiple of Hkv and query head h
reading KV head ``h // (Hq // Hkv)`` (FlashInfer's and torch's ``enable_gqa`` grouping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvperf_kernels.cache.kv_memory import stored_bytes, tensor_bytes
from kvperf_kernels.device import run_where_kernels_run
from kvperf_kernels.formats.checks import (
    QUANT_INPUT_DTYPES,
    check_out_dtype,
    check_same_device,
    check_scale_value,
    check_tensor,
)
from kvperf_kernels.quant import fp8, mxfp8, nvfp4

ATTN_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class CompressedKV:
    """One K or V tensor as stored: ``tensors`` are named as in ``kv_memory.tensor_layout``."""

    fmt: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.tensors)

    @property
    def expected_nbytes(self) -> int:
        """What the format costs by the formula (``kv_memory.tensor_bytes``)."""
        return tensor_bytes(self.shape, self.fmt).total


def compress(x: torch.Tensor, fmt: str, *, global_amax: torch.Tensor | None = None) -> CompressedKV:
    """Store ``x`` (last dim = head_dim) in ``fmt`` with the project's quantisers.

    ``global_amax`` (NVFP4 only) fixes the tensor-level scale, e.g. from calibration, so a
    cache that grows token by token keeps one global scale. x: bf16/fp16/fp32, any leading
    dims (0 too: an empty batch stores empty tensors).
    """
    check_tensor(x, "x", QUANT_INPUT_DTYPES)
    shape = tuple(x.shape)
    # known format and its shape rules (block multiples), with kv_memory's messages
    tensor_bytes(shape, fmt)
    if global_amax is not None and fmt != "nvfp4":
        raise ValueError(f"global_amax applies to nvfp4 only, not {fmt}")
    if fmt in ("bf16", "fp16"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
        return CompressedKV(fmt, shape, {"values": x.to(dtype).contiguous()})
    if fmt == "fp8_per_tensor":
        q, s = run_where_kernels_run(fp8.quantize_per_tensor, x)
        return CompressedKV(fmt, shape, {"q": q, "scale": s})
    if fmt == "fp8_per_token":
        q, s = run_where_kernels_run(fp8.quantize_per_token, x)
        return CompressedKV(fmt, shape, {"q": q, "scale": s})
    if fmt == "fp8_per_block128":
        q, s = run_where_kernels_run(fp8.quantize_per_block, x, block=128)
        return CompressedKV(fmt, shape, {"q": q, "scale": s})
    if fmt == "mxfp8":
        q, s = run_where_kernels_run(mxfp8.quantize_mxfp8, x)
        return CompressedKV(fmt, shape, {"q": q, "scale_e8m0": s})
    packed, block_scale, global_scale = run_where_kernels_run(
        nvfp4.quantize_nvfp4, x, global_amax=global_amax)
    return CompressedKV(fmt, shape, {"packed": packed, "block_scale": block_scale,
                                     "global_scale": global_scale})


def decompress(c: CompressedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored tensor read back as ``dtype`` (the quantisers' dequantise kernels)."""
    if not isinstance(c, CompressedKV):
        raise TypeError(f"c must be a CompressedKV (from compress), got {type(c).__name__}")
    check_out_dtype(dtype, "dtype")
    t = c.tensors
    if c.fmt in ("bf16", "fp16"):
        return t["values"].to(dtype)
    if c.fmt.startswith("fp8_"):
        return run_where_kernels_run(fp8.dequantize, t["q"], t["scale"], dtype=dtype)
    if c.fmt == "mxfp8":
        return run_where_kernels_run(mxfp8.dequantize_mxfp8, t["q"], t["scale_e8m0"], dtype=dtype)
    if c.fmt == "nvfp4":
        return run_where_kernels_run(nvfp4.dequantize_nvfp4, t["packed"], t["block_scale"],
                              t["global_scale"], dtype=dtype)
    raise ValueError(f"unknown KV format {c.fmt!r}")


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------

def _check_decode_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         sm_scale) -> float | None:
    """Shapes, devices and sm_scale (None or a finite positive float, returned as float)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} has dtype {t.dtype}; attention takes float tensors")
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [batch, context, kv_heads, head_dim], got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if k.shape[1] < 1:
        raise ValueError("k: context must hold at least one token")
    if d < 1 or hq < 1 or k.shape[2] < 1 or hq % k.shape[2]:
        raise ValueError(f"q: q_heads {hq} is not a multiple of kv_heads {k.shape[2]} (GQA), "
                         f"or a dim is 0 (head_dim {d})")
    check_same_device(k, "k", q, "q")
    check_same_device(v, "v", q, "q")
    return None if sm_scale is None else check_scale_value(sm_scale, "sm_scale")


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v per query head, in float64; returns float64 [B, Hq, D]."""
    sm_scale = _check_decode_inputs(q, k, v, sm_scale)
    b, hq, d = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q64 = q.double().view(b, hkv, hq // hkv, d)  # head h -> kv head h // group
    k64, v64 = k.double(), v.double()
    logits = torch.einsum("bhgd,bthd->bhgt", q64, k64) * scale
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhgt,bthd->bhgd", p, v64).reshape(b, hq, d)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     sm_scale: float | None = None) -> torch.Tensor:
    """BF16/FP16 decode attention with torch SDPA (the baseline the compressed paths pay on)."""
    sm_scale = _check_decode_inputs(q, k, v, sm_scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in ATTN_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; attention takes bfloat16 or float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, d = q.shape
    hkv = k.shape[2]
    if b == 0:  # torch 2.11's CUDA SDPA returns None for an empty batch (seen on the H200)
        return q.new_empty(q.shape)
    qh = q.unsqueeze(2)  # [B, Hq, 1, D]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D] views, last dim contiguous
    if hkv != hq:
        try:
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=sm_scale, enable_gqa=True)
            return out.squeeze(2)
        except TypeError:  # torch < 2.5 has no enable_gqa: expand the KV heads instead
            kh = kh.repeat_interleave(hq // hkv, dim=1)
            vh = vh.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(qh, kh, vh, scale=sm_scale).squeeze(2)


def attend_compressed(q: torch.Tensor, k: CompressedKV, v: CompressedKV, *,
                      sm_scale: float | None = None) -> torch.Tensor:
    """Dequantise K and V to q's dtype, then ``decode_attention`` (the unfused path)."""
    check_tensor(q, "q")
    if q.dtype not in ATTN_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; attention takes bfloat16 or float16")
    for name, c in (("k", k), ("v", v)):
        if not isinstance(c, CompressedKV):
            raise TypeError(f"{name} must be a CompressedKV (from compress), got "
                            f"{type(c).__name__}")
    return decode_attention(q, decompress(k, q.dtype), decompress(v, q.dtype), sm_scale=sm_scale)


def attention_bytes(q: torch.Tensor, k: CompressedKV, v: CompressedKV) -> int:
    """HBM bytes the unfused path moves: stored K/V read, the dequantised copy written and
    read back by attention, q read and the output written (2-byte attention dtype)."""
    elem = q.element_size()
    kv_elements = math.prod(k.shape) + math.prod(v.shape)
    dequant_rw = 0 if k.fmt in ("bf16", "fp16") else 2 * kv_elements * elem
    return k.nbytes + v.nbytes + dequant_rw + 2 * q.numel() * elem


# --------------------------------------------------------------------------------------
# Test data: K/V that look like real ones
# --------------------------------------------------------------------------------------

def realistic_kv(batch: int, context: int, kv_heads: int, head_dim: int, *,
                 generator: torch.Generator, outlier_channels: int = 4,
                 outlier_scale: float = 20.0, token_sigma: float = 0.5,
                 sink_value_scale: float = 1e-3, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (k, v) [B, T, Hkv, D] with the structure of real caches, on ``device``.

    Keys: a log-normal spread per channel and ``outlier_channels`` channels per head scaled
    by ``outlier_scale`` (the fixed outlier dimensions real keys show, e.g. from RoPE pairs
    with low frequency). Both: log-normal token norms (sigma ``token_sigma``). Values of
    token 0 (the attention-sink token) are scaled by ``sink_value_scale``: sink tokens take
    much attention weight but carry near-zero values, so their small values must survive.
    """
    if outlier_channels > head_dim:
        raise ValueError(f"outlier_channels {outlier_channels} > head_dim {head_dim}")
    g = generator
    device = torch.device("cpu" if device is None else device)
    channel = torch.exp(0.3 * torch.randn(kv_heads, head_dim, generator=g))
    for h in range(kv_heads):
        idx = torch.randperm(head_dim, generator=g)[:outlier_channels]
        channel[h, idx] *= outlier_scale
    # the bulk is drawn where it is used (GPU-sized caches), seeded from the CPU generator
    bulk = g
    if device.type != "cpu":
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        bulk = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=bulk, device=device)

    k_tok = torch.exp(token_sigma * randn(batch, context, kv_heads, 1))
    v_tok = torch.exp(token_sigma * randn(batch, context, kv_heads, 1))
    v_tok[:, 0] *= sink_value_scale
    k = randn(batch, context, kv_heads, head_dim) * channel.to(device) * k_tok
    v = randn(batch, context, kv_heads, head_dim) * v_tok
    return k, v


def realistic_query(k: torch.Tensor, q_heads: int, *, generator: torch.Generator,
                    logit_std: float = 2.0) -> torch.Tensor:
    """float32 decode queries [B, Hq, D] for cache ``k`` [B, T, Hkv, D] at a fixed temperature.

    Directions are isotropic; each head's query is scaled so its logits q.k/sqrt(D) over
    the context have standard deviation ``logit_std``. The error a quantised K causes in
    the attention output grows with the logits' magnitude (an error of e in a logit scales
    that token's weight by exp(e)), so the temperature is stated, not left to chance.
    """
    b, t, hkv, d = k.shape
    if t < 2:
        raise ValueError(f"context {t}: a logit spread needs at least two tokens")
    if q_heads % hkv:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {hkv} (GQA)")
    q = torch.randn(b, q_heads, d, generator=generator).to(k.device)
    logits = torch.einsum("bhgd,bthd->bhgt", q.view(b, hkv, q_heads // hkv, d), k.float())
    std = (logits / math.sqrt(d)).std(dim=-1).reshape(b, q_heads, 1)
    return q * (logit_std / std)


def worst_token_rel_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """max over (token, head) rows of ||x_hat - x|| / ||x||: the row a format serves worst."""
    x64, xh64 = x.double().cpu(), x_hat.double().cpu()
    if not torch.isfinite(xh64).all():
        raise AssertionError("x_hat has NaN/Inf")
    norms = x64.norm(dim=-1)
    if (norms == 0).any():
        raise ValueError("x has an all-zero row: its relative error is undefined")
    return ((xh64 - x64).norm(dim=-1) / norms).max().item()
