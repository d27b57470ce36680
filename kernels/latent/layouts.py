"""The byte layouts of a DeepSeek latent KV cache: one latent head per token, in pages.

A cache is a ``uint8`` tensor ``[num_blocks, block_bytes(block_size)]``; token slot
``s`` lives in block ``s // block_size`` at offset ``s % block_size``. Three layouts:

``lab`` (the lab's own): 512 E4M3 values (448 "nope" dims and the 64 RoPE dims, after
  RoPE) and one float32 per-token decode scale, ``amax / 448`` (IEEE division; 0 -> 1),
  in one 516-byte row: ``[512 x e4m3][fp32 scale]``. Rows follow each other in the block.
``v32`` (DeepSeek V3.2, FlashMLA "V32_FP8Sparse"): input 576 = 512 c_kv + 64 k_pe; row of
  656 bytes ``[512 x e4m3][4 x fp32 scale][64 x bf16 rope]``, one scale per 128 values,
  the smallest power of two >= max(amax / 448, 1e-4). A block holds one spare row
  (FlashMLA allocates ``block_size + 1`` rows): block bytes = (block_size + 1) * 656.
``model1`` (DeepSeek V4, FlashMLA "MODEL1_FP8Sparse"): input 512 = 448 nope + 64 rope;
  584 bytes per token: a 576-byte row ``[448 x e4m3][64 x bf16 rope]`` and an 8-byte
  footer ``[7 x ue8m0 scale][1 pad byte = 0]`` (one power-of-two scale per 64 values, same
  rule as v32). A block holds all rows first, then all footers, and its size is rounded
  up to a multiple of 576 bytes (block 64: 36,864 + 512 = 37,376 -> 37,440 bytes).

kv_norm (RMSNorm over the first 512 input dims) comes first; RoPE (GPT-J interleaved)
acts on the 64 RoPE dims: dims 448..511 for lab and model1, the k_pe dims 512..575 for
v32 (which are not normalised: V3.2 norms c_kv only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvperf_kernels.formats.checks import (
    check_device,
    check_int,
    check_same_device,
    check_tensor,
)

D_NORM = 512  # kv_norm's width in every layout
D_ROPE = 64


@dataclass(frozen=True)
class LatentLayout:
    name: str
    d_in: int  # input (and dequantised output) width per token
    d_nope: int  # non-RoPE dims, all quantised
    tile: int  # values per scale (lab: the whole 512, RoPE dims included)
    scale_kind: str  # "amax" (fp32 amax/448), "pow2" (fp32 power of two), "ue8m0"
    rope_in: int  # first RoPE dim in the input
    rope_fp8: bool  # RoPE dims quantised with the nope dims (lab) or kept as bf16
    row_bytes: int  # bytes of one token's row
    footer_bytes: int = 0  # bytes of one token's footer entry after all rows (model1)
    spare_rows: int = 0  # rows allocated beyond block_size (v32)
    pad_block_to: int = 1  # block bytes rounded up to a multiple of this (model1)

    @property
    def d_fp8(self) -> int:
        """E4M3 values per token."""
        return self.d_nope + (D_ROPE if self.rope_fp8 else 0)

    @property
    def num_tiles(self) -> int:
        return self.d_fp8 // self.tile

    @property
    def norm_rope(self) -> bool:
        """Whether the RoPE dims lie inside kv_norm's 512 (lab, model1) or after it (v32)."""
        return self.rope_in < D_NORM

    @property
    def scale_row_off(self) -> int:
        """Byte offset of the fp32 scales in a row (lab, v32)."""
        return self.d_fp8

    @property
    def rope_row_off(self) -> int:
        """Byte offset of the bf16 RoPE dims in a row (v32: after its 4 fp32 scales)."""
        return self.d_nope + (4 * self.num_tiles if self.footer_bytes == 0 else 0)

    @property
    def bytes_per_token(self) -> int:
        return self.row_bytes + self.footer_bytes

    def block_bytes(self, block_size: int) -> int:
        raw = (block_size + self.spare_rows) * self.row_bytes + block_size * self.footer_bytes
        return -(-raw // self.pad_block_to) * self.pad_block_to

    def cache_bytes(self, num_blocks: int, block_size: int) -> int:
        return num_blocks * self.block_bytes(block_size)


LAB = LatentLayout("lab", d_in=512, d_nope=448, tile=512, scale_kind="amax", rope_in=448,
                   rope_fp8=True, row_bytes=512 + 4)
V32 = LatentLayout("v32", d_in=576, d_nope=512, tile=128, scale_kind="pow2", rope_in=512,
                   rope_fp8=False, row_bytes=512 + 4 * 4 + 2 * 64, spare_rows=1)
MODEL1 = LatentLayout("model1", d_in=512, d_nope=448, tile=64, scale_kind="ue8m0",
                      rope_in=448, rope_fp8=False, row_bytes=448 + 2 * 64, footer_bytes=8,
                      pad_block_to=576)
LAYOUTS = {layout.name: layout for layout in (LAB, V32, MODEL1)}


def get_layout(layout) -> LatentLayout:
    """A LatentLayout, or its name; anything else is a ValueError naming ``layout``."""
    if isinstance(layout, LatentLayout):
        return layout
    if isinstance(layout, str) and layout in LAYOUTS:
        return LAYOUTS[layout]
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)} or a LatentLayout, "
                     f"got {layout!r}")


# --------------------------------------------------------------------------------------
# The cache contract (checked on the host; value checks sync once)
# --------------------------------------------------------------------------------------

INDEX_DTYPES = (torch.int32, torch.int64)


def check_cache(cache, layout: LatentLayout, block_size, *, kernel: bool = True) -> int:
    """cache: contiguous uint8 [num_blocks, layout.block_bytes(block_size)]; returns
    num_blocks. TypeError / ValueError naming ``cache`` or ``block_size``."""
    check_int(block_size, "block_size", 1)
    check_tensor(cache, "cache", (torch.uint8,), dim=2)
    want = layout.block_bytes(block_size)
    if cache.shape[1] != want:
        raise ValueError(f"cache: layout {layout.name!r} with block_size {block_size} has "
                         f"{want} bytes per block, got cache of shape {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous")
    if kernel:
        check_device(cache, "cache")
    return cache.shape[0]


def check_slots(slots, what: str, n: int, capacity: int, ref: torch.Tensor, *,
                checked: bool = True) -> None:
    """slots: int32/int64 [n] on ref's device, each in [-1, capacity) (-1: no slot).
    The value check (one sync) runs when ``checked``."""
    check_tensor(slots, what, INDEX_DTYPES, dim=1)
    if slots.shape[0] != n:
        raise ValueError(f"{what} must have {n} entries, got shape {tuple(slots.shape)}")
    check_same_device(slots, what, ref, "cache")
    if checked and n:
        lo, hi = torch.aminmax(slots)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= capacity:
            raise ValueError(f"{what}: slots must be in [-1, {capacity}) (num_blocks x "
                             f"block_size), got min {lo} max {hi}")


def alloc_cache(layout, num_blocks: int, block_size: int, device=None,
                fill: int = 0) -> torch.Tensor:
    """A cache of num_blocks blocks, every byte ``fill``."""
    layout = get_layout(layout)
    check_int(num_blocks, "num_blocks", 0)
    check_int(block_size, "block_size", 1)
    return torch.full((num_blocks, layout.block_bytes(block_size)), fill, dtype=torch.uint8,
                      device=device)
