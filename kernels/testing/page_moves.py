"""Page moves the peer-transfer tests share: which pages go to which slots, and their bytes.

A ``MoveSpec`` names one move (page layout, pool sizes, how many pages, a seed); each rank
of a two-process move builds its own side from it (the sender its source pages, the
receiver its pool as it was before and the expected bytes), so nothing large crosses
between the processes but the pages themselves. Page bytes come from an integer hash of
(seed, word index), computed where the pages live: the same bytes on every device, cheap
at 64 MB, every page different.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvperf_kernels.formats.checks import check_int
from kvperf_kernels.offload import peer_transfer as pt

_MASK = 0xFFFF_FFFF


def pattern(pages: int, page_shape: tuple[int, ...], dtype: torch.dtype, seed: int,
            device) -> torch.Tensor:
    """[pages, *page_shape] of ``dtype`` holding hashed words of (seed, position)."""
    nbytes = pages * torch.empty((), dtype=dtype).element_size()
    for d in page_shape:
        nbytes *= d
    if nbytes % 4:
        raise ValueError(f"pages of {page_shape} {dtype} are not whole 32-bit words")
    h = torch.arange(nbytes // 4, dtype=torch.int64, device=device)
    h = (h + (seed + 1) * 0x3C6E_F372) & _MASK  # (products below stay under 2**63)
    h = ((h ^ (h >> 16)) * 0x7FEB_352D) & _MASK
    h = ((h ^ (h >> 15)) * 0x68E3_1DA5) & _MASK
    h = h ^ (h >> 16)
    w = torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)
    return w.view(dtype).reshape(pages, *page_shape)


@dataclass(frozen=True)
class MoveSpec:
    """n of ``src_pages`` source pages into n of ``dst_pages`` pool slots, from ``seed``."""

    page_shape: tuple[int, ...]
    dtype: torch.dtype
    src_pages: int
    dst_pages: int
    n: int
    seed: int = 0

    def __post_init__(self):
        check_int(self.src_pages, "src_pages", 1)
        check_int(self.dst_pages, "dst_pages", 1)
        check_int(self.n, "n", 0)
        if self.n > min(self.src_pages, self.dst_pages):
            raise ValueError(f"n ({self.n}) exceeds the pages ({self.src_pages}) or the "
                             f"slots ({self.dst_pages})")

    @classmethod
    def of_bytes(cls, page_bytes: int, n: int, *, pool: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> MoveSpec:
        """KV pages of ``page_bytes``: K and V of rows x 128 channels; pools of 2n pages."""
        row = 128 * torch.empty((), dtype=dtype).element_size()
        if page_bytes % (2 * row):
            raise ValueError(f"page_bytes ({page_bytes}) is not K and V of whole "
                             f"{row}-byte rows")
        pool = pool if pool is not None else max(2 * n, 1)
        return cls((2, page_bytes // (2 * row), 128), dtype, pool, pool, n, seed)

    @property
    def page_bytes(self) -> int:
        return pt.page_bytes(torch.empty((0, *self.page_shape), dtype=self.dtype))

    @property
    def bytes_moved(self) -> int:
        return self.n * self.page_bytes

    def ids(self) -> torch.Tensor:
        """Source pages, host int64, in the order they are moved."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.src_pages, generator=g)[:self.n]

    def slots(self) -> torch.Tensor:
        """Destination slots, host int64 (distinct)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randperm(self.dst_pages, generator=g)[:self.n]

    def wrong_slots(self) -> torch.Tensor:
        """The negative control's mapping: each page into its neighbour's slot."""
        return self.slots().roll(1)

    def source(self, device="cpu") -> torch.Tensor:
        return pattern(self.src_pages, self.page_shape, self.dtype, 2 * self.seed, device)

    def pool(self, device="cpu") -> torch.Tensor:
        """The destination before the move: other bytes in every page."""
        return pattern(self.dst_pages, self.page_shape, self.dtype, 2 * self.seed + 1, device)

    def expected(self) -> torch.Tensor:
        """The destination after the move, by the torch reference (host)."""
        return pt.moved_pages_ref(self.source(), self.ids(), self.pool(), self.slots())
