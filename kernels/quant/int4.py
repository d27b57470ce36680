"""Packed INT4 KV (the lab's int4 tier, made real): symmetric signed 4-bit codes with one
float16 scale per group of ``group`` channels of each token vector.

    scale = amax(|x_group|) / 7   (0 for an all-zero group: codes 0)
    code  = clamp(round(x / scale), -8, 7)      stored + 8 as a nibble in [0, 15]
    value = code * scale

Two codes a byte, element 2k in the low nibble (as NVFP4's packing). Bytes per token vector of
D: D / 2 + 2 * D / group (64 channels, group 32: 36 bytes, vs 128 for BF16). The lab's "int4"
was a cast that stored nothing smaller; this one stores the nibbles, and the decode kernel
(``persistent_decode``) reads them, checked against ``dequantize_int4`` + the float64
attention reference.
"""

from __future__ import annotations

import torch

from kvperf_kernels.cache.paged_kv import PagedKV, build_page_table, slot_mapping
from kvperf_kernels.formats.checks import check_int, check_tensor

INT4_GROUPS = (16, 32, 64, 128)


def quantize_int4(x: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (codes uint8 [..., D/2], scales float16 [..., D/group])."""
    check_tensor(x, "x")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if group not in INT4_GROUPS:
        raise ValueError(f"group must be one of {INT4_GROUPS}, got {group!r}")
    d = x.shape[-1]
    if d % group:
        raise ValueError(f"x: last dim {d} is not a multiple of group {group}")
    g = x.float().reshape(*x.shape[:-1], d // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    if not torch.isfinite(amax).all():
        raise ValueError("x: NaN or Inf values cannot be quantised to INT4")
    scale = (amax / 7).to(torch.float16)
    s = scale.float()
    codes = torch.where(s > 0, torch.round(g / torch.where(s > 0, s, 1.0)), 0.0).clamp(-8, 7)
    nib = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(*x.shape[:-1], d)
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1).contiguous()


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reference decode: (codes, scales) from ``quantize_int4`` -> [..., D] in dtype."""
    lo = (codes & 15).to(torch.int16) - 8
    hi = (codes >> 4).to(torch.int16) - 8
    vals = torch.stack([lo, hi], -1).flatten(-2).to(dtype)  # element 2k = low nibble
    group = vals.shape[-1] // scales.shape[-1]
    g = vals.reshape(*vals.shape[:-1], scales.shape[-1], group) * scales.to(dtype)[..., None]
    return g.reshape(vals.shape)


def pack_paged_int4(k_tokens: torch.Tensor, v_tokens: torch.Tensor, seq_lens, page_size: int,
                    *, group: int = 32, generator: torch.Generator | None = None
                    ) -> tuple[PagedKV, torch.Tensor, torch.Tensor]:
    """Ragged K/V tokens [sum(lens), Hkv, D] as a paged INT4 cache: (PagedKV with uint8 code
    caches [pages, page_size, Hkv, D/2], k_scales, v_scales float16 [pages, page_size, Hkv,
    D/group]). Slots no sequence owns hold code 0 and a NaN scale: a read past shows."""
    check_int(page_size, "page_size", 1)
    device = k_tokens.device
    block_tables, lens, num_pages, _ = build_page_table(seq_lens, page_size,
                                                        generator=generator, device=device)
    slots = slot_mapping(block_tables, lens, page_size)
    _, hkv, dim = k_tokens.shape
    out = []
    for tokens in (k_tokens, v_tokens):
        codes, scales = quantize_int4(tokens, group)
        code_cache = torch.zeros(num_pages * page_size, hkv, dim // 2, dtype=torch.uint8,
                                 device=device)
        scale_cache = torch.full((num_pages * page_size, hkv, dim // group), float("nan"),
                                 dtype=torch.float16, device=device)
        code_cache[slots] = codes
        scale_cache[slots] = scales
        out.append((code_cache.reshape(num_pages, page_size, hkv, dim // 2),
                    scale_cache.reshape(num_pages, page_size, hkv, dim // group)))
    kv = PagedKV(k_cache=out[0][0], v_cache=out[1][0], block_tables=block_tables, seq_lens=lens,
                 page_size=page_size)
    return kv, out[0][1], out[1][1]
