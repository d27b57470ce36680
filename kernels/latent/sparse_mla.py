"""MLA decode over an FP8 latent cache: sparse (top-k indices, -1 padded) and dense (a
block table), for the three layouts, reading the cache bytes directly.

All query heads share the one latent per token (MQA on the latent): with the token's
dequantised latent ``c`` (``gather.latent_gather``'s row: d_in values),
    key = c (d_qk = d_in: 576 for v32, 512 for lab and model1),
    value = c[:512] (v32: the 512 c_kv dims; lab, model1: the whole 512),
    out[h] = softmax_n(sm_scale * q[h] . key[n]) @ value,   lse[h] = log sum exp,
FlashMLA's widths (V3.2: qk 576 / v 512; V4: 512 / 512). Indices are cache slots; -1
entries are skipped (a row with none gives out 0, lse -inf). The kernel dequantises each
token to bf16 (exact for the power-of-two layouts; the lab's amax scale rounds once, as
``latent_gather(out_dtype=bf16)``), multiplies in bf16 with float32 accumulation and rounds
the softmax weights P to bf16 for P @ V, as FlashMLA does; the reference is float64 on
the same bf16 latent, and also returns P @ |V|, which bounds what rounding P can change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvperf_kernels.attention.offline_compile import compile_offline, in_child
from kvperf_kernels.device import interpreted
from kvperf_kernels.formats.checks import check_device, check_int, check_tensor, use_hw_cast
from kvperf_kernels.formats.codecs import cast_out, decode_e4m3
from kvperf_kernels.latent.gather import latent_gather_ref
from kvperf_kernels.latent.layouts import (
    INDEX_DTYPES,
    LAYOUTS,
    check_cache,
    check_slots,
    get_layout,
)
from kvperf_kernels.latent.write import SCALE_KINDS

D_V = 512
NUM_WARPS = 8

__all__ = ["MLALaunch", "sparse_mla_decode", "dense_mla_decode", "mla_decode_ref",
           "dense_indices"]


@dataclass(frozen=True)
class MLALaunch:
    """Launch parameters of the MLA decode kernel (grid: query rows x head groups).

    block_h: query heads per program (16, 32 or 64; None: the fewest of those that hold
        the heads, 64 beyond 32). Every program dequantises the rows it reads, so 128 heads
        in groups of 32 decode each selected token 4 times; 64 halves that and gives the
        dots M = 64, which wgmma takes (compiled offline for sm90: 32 heads use mma.sync
        and spill 512 bytes, 64 use wgmma and spill 80). On the H200 (128 heads, top-2048,
        batch 64) 64-head programs ran 3.3x faster than 32-head ones (v32: 599.5 against
        1985.1 us, 122 against 37 TFLOP/s), 16-key tiles 1.5x slower than 32.
    block_n: keys per tile (16, 32 or 64; None: 64 in 64-head programs, else 32). There
        64 keys ran 1.2-1.4x faster than 32 although they spill 232 bytes offline (v32
        batch 64: 497.6 against 602.3 us, 147 against 121 TFLOP/s; model1 117 against 82),
        16 keys 1.5x slower.
    num_warps: Triton's (4 or 8).
    test_sparse_decode_speed times the variants in SPEED_SWEEP beside the default.
    """

    block_h: int | None = None
    block_n: int | None = None
    num_warps: int = NUM_WARPS

    def __post_init__(self):
        if self.block_h is not None and check_int(self.block_h, "MLALaunch.block_h", 1) \
                not in (16, 32, 64):
            raise ValueError(f"MLALaunch.block_h must be 16, 32, 64 or None, got "
                             f"{self.block_h!r}")
        if self.block_n is not None and check_int(self.block_n, "MLALaunch.block_n", 1) \
                not in (16, 32, 64):
            raise ValueError(f"MLALaunch.block_n must be 16, 32, 64 or None, got "
                             f"{self.block_n!r}")
        if check_int(self.num_warps, "MLALaunch.num_warps", 1) not in (4, 8):
            raise ValueError(f"MLALaunch.num_warps must be 4 or 8, got {self.num_warps!r}")

    def heads_per_program(self, heads: int) -> int:
        if self.block_h is not None:
            return self.block_h
        return 16 if heads <= 16 else 32 if heads <= 32 else 64

    def keys_per_tile(self, heads: int) -> int:
        if self.block_n is not None:
            return self.block_n
        return 64 if self.heads_per_program(heads) == 64 else 32


# the variants the speed test times beside the default (their outputs checked too)
SPEED_SWEEP = {"h32": MLALaunch(block_h=32), "h64n32": MLALaunch(block_h=64, block_n=32)}


def mla_decode_ref(q, cache, indices, *, layout, block_size: int, sm_scale=None):
    """(out, lse, spread) in float64 over the bf16 latent at indices [R, K]: out
    [R, H, 512], lse [R, H] and spread = P @ |V| [R, H, 512], the scale of the error that
    rounding P to bf16 (2^-9 relative per weight) can cause in each output."""
    layout = get_layout(layout)
    r, h, d = q.shape
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    flat = indices.reshape(-1)
    lat = latent_gather_ref(cache, flat, layout=layout, block_size=block_size,
                            out_dtype=torch.bfloat16).double().reshape(r, -1, layout.d_in)
    s = torch.einsum("rhd,rnd->rhn", q.double(), lat) * sm_scale
    s = torch.where((indices >= 0)[:, None, :], s, torch.full_like(s, float("-inf")))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(s),
                    torch.exp(s - lse[..., None]))
    v = lat[..., :D_V]
    return torch.einsum("rhn,rnd->rhd", p, v), lse, torch.einsum("rhn,rnd->rhd", p, v.abs())


def dense_indices(block_tables, seq_lens, block_size: int) -> torch.Tensor:
    """int64 [R, max_len] slots of each row's tokens 0..len-1 (-1 beyond): the dense decode
    as an index list, for the reference."""
    n = int(seq_lens.max()) if len(seq_lens) else 0
    pos = torch.arange(n, device=block_tables.device)
    pages = block_tables.long()[:, (pos // block_size).clamp(max=block_tables.shape[1] - 1)]
    slots = pages * block_size + pos % block_size
    return torch.where(pos[None, :] < seq_lens[:, None], slots, torch.full_like(slots, -1))


@triton.jit
def mma(a, b, F32: tl.constexpr):
    """a @ b of bf16 tiles, float32 accumulation. F32 (the CPU interpreter, whose bf16 dot
    multiplies the raw bit patterns) widens the operands first: the same exact products."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_ids(idx_ptr, bt_ptr, r, idx_stride, bt_stride, n, total, block_size,
              DENSE: tl.constexpr):
    """Keys n's page ids from the block table (dense; 0 past the length) or their slots from
    the index list (sparse; -1 past the list, as its own padding)."""
    if DENSE:
        return tl.load(bt_ptr + r * bt_stride + n // block_size, mask=n < total, other=0)
    return tl.load(idx_ptr + r * idx_stride + n, mask=n < total, other=-1)


@triton.jit
def _mla_decode_kernel(
    q_ptr, q_sr, q_sh, cache_ptr, idx_ptr, idx_stride, n_keys, bt_ptr, bt_stride, len_ptr,
    out_ptr, o_sr, o_sh, lse_ptr, sm_scale, block_size, block_bytes, H,
    D_FP8: tl.constexpr, PA: tl.constexpr, TILE: tl.constexpr, NT: tl.constexpr,
    NT_PAD: tl.constexpr, HAS_R: tl.constexpr, ROPE_TILE: tl.constexpr,
    V_HAS_R: tl.constexpr, SCALE_KIND: tl.constexpr, ROW_BYTES: tl.constexpr,
    SCALE_ROW_OFF: tl.constexpr, ROPE_ROW_OFF: tl.constexpr, FOOTER_BYTES: tl.constexpr,
    DENSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HW_CAST: tl.constexpr,
    F32: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = heads < H
    ca = tl.arange(0, PA)
    # ROPE_TILE (model1): the padded last tile of the codes holds the 64 RoPE dims, so
    # keys and values are one [., 512] operand (no separate RoPE dots or accumulator)
    am = ca < (D_FP8 + 64 if ROPE_TILE else D_FP8)
    cr = tl.arange(0, 64)
    q_row = q_ptr + r * q_sr + heads[:, None] * q_sh
    qa = tl.load(q_row + ca[None, :], mask=hm[:, None] & am[None, :], other=0.0)
    if HAS_R:
        qr = tl.load(q_row + D_FP8 + cr[None, :], mask=hm[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_a = tl.zeros([BLOCK_H, PA], tl.float32)
    acc_r = tl.zeros([BLOCK_H, 64], tl.float32)
    if DENSE:
        total = tl.load(len_ptr + r)
    else:
        total = n_keys
    # The tile's page ids (dense) or slots (sparse) load one tile ahead: loaded in the tile
    # that uses them, they sit in the chain of the rows' addresses, and Triton's pipeliner
    # spends a stage on them (the loop then waits for every copy in flight). H200, 128
    # heads, top-2048, batch 64: model1 448.9 against 547.3 us, v32 502.9 against 498.0;
    # sparse at 128K 204.6 against 244.9.
    offs_n = tl.arange(0, BLOCK_N)
    next_ids = _tile_ids(idx_ptr, bt_ptr, r, idx_stride, bt_stride, offs_n, total, block_size,
                         DENSE)
    for start in range(0, total, BLOCK_N):
        n = start + offs_n
        ids = next_ids
        next_ids = _tile_ids(idx_ptr, bt_ptr, r, idx_stride, bt_stride, n + BLOCK_N, total,
                             block_size, DENSE)
        if DENSE:
            # the page and its offset straight from n: Triton 3.6 takes the offset of a
            # rebuilt slot, (page * block_size + n % block_size) % block_size, to be a
            # multiple of 16 in every lane (triton-lang/triton#11544) and reads the lab's
            # 516-byte rows (4-byte aligned) in 16-byte copies: misaligned on the GPU
            valid = n < total
            blk = ids.to(tl.int64)
            off = n % block_size
        else:
            slot = ids.to(tl.int64)
            valid = slot >= 0
            slot = tl.where(valid, slot, 0)
            blk = slot // block_size
            off = slot % block_size
        row = cache_ptr + blk * block_bytes + off * ROW_BYTES
        # codes as [BLOCK_N, tiles, TILE] so that each tile's scale is loaded once
        tile = tl.arange(0, NT_PAD)
        d3 = tile[None, :, None] * TILE + tl.arange(0, TILE)[None, None, :]
        m3 = valid[:, None, None] & (d3 < D_FP8)
        code = tl.load(row[:, None, None] + d3, mask=m3, other=0).to(tl.int32)
        ms = valid[:, None] & (tile < NT)[None, :]
        if FOOTER_BYTES == 0:
            sp = (row + SCALE_ROW_OFF).to(tl.pointer_type(tl.float32))
            scale = tl.load(sp[:, None] + tile[None, :], mask=ms, other=0.0)
        else:
            foot = cache_ptr + blk * block_bytes + block_size * ROW_BYTES + off * FOOTER_BYTES
            e = tl.load(foot[:, None] + tile[None, :], mask=ms, other=127).to(tl.int32)
            scale = tl.where(e == 255, float("nan"), (e << 23).to(tl.float32, bitcast=True))
        a3 = cast_out(decode_e4m3(code, HW_CAST) * scale[:, :, None], tl.bfloat16, HW_CAST)
        a3 = tl.where(m3, a3, 0.0).to(tl.bfloat16)
        if ROPE_TILE:  # [BLOCK_N, 64] RoPE values, broadcast into the last tile
            rp = (row + ROPE_ROW_OFF).to(tl.pointer_type(tl.bfloat16))
            rv = tl.load(rp[:, None] + cr[None, :], mask=valid[:, None], other=0.0)
            a3 = tl.where(d3 < D_FP8, a3, rv[:, None, :])
        a = tl.reshape(a3, [BLOCK_N, PA])
        s = mma(qa, tl.trans(a), F32)
        if HAS_R:
            rp = (row + ROPE_ROW_OFF).to(tl.pointer_type(tl.bfloat16))
            rv = tl.load(rp[:, None] + cr[None, :], mask=valid[:, None], other=0.0)
            s += mma(qr, tl.trans(rv), F32)
        s = tl.where(valid[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pb = cast_out(p, tl.bfloat16, HW_CAST)  # P rounded to bf16, as FlashMLA
        acc_a = acc_a * alpha[:, None] + mma(pb, a, F32)
        if V_HAS_R:
            acc_r = acc_r * alpha[:, None] + mma(pb, rv, F32)
        m_i = m_new
    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    o_row = out_ptr + r * o_sr + heads[:, None] * o_sh
    tl.store(o_row + ca[None, :], cast_out(acc_a * inv[:, None], out_ptr.dtype.element_ty, HW_CAST),
             mask=hm[:, None] & am[None, :])
    if V_HAS_R:
        o_r = cast_out(acc_r * inv[:, None], out_ptr.dtype.element_ty, HW_CAST)
        tl.store(o_row + D_FP8 + cr[None, :], o_r, mask=hm[:, None])
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    tl.store(lse_ptr + r * H + heads, lse, mask=hm)


def _check_q(q, layout):
    check_tensor(q, "q", (torch.bfloat16,), dim=3)
    if q.shape[2] != layout.d_in or q.stride(2) != 1:
        raise ValueError(f"q: layout {layout.name!r} takes bf16 [R, H, {layout.d_in}] queries "
                         f"with a contiguous last dim, got {tuple(q.shape)}")
    check_device(q, "q")


def _launch(q, cache, layout, block_size, sm_scale, hw_cast, launch, *, indices=None,
            block_tables=None, seq_lens=None):
    if not isinstance(launch, MLALaunch):
        raise TypeError(f"launch must be an MLALaunch, got {type(launch).__name__}")
    r, h, d = q.shape
    out = torch.empty(r, h, D_V, dtype=torch.bfloat16, device=q.device)
    lse = torch.empty(r, h, dtype=torch.float32, device=q.device)
    if r == 0 or h == 0:
        return out, lse
    sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a finite positive float, got {sm_scale!r}")
    dense = indices is None
    dummy = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    idx = dummy if dense else indices
    bt = block_tables if dense else dummy
    lens = seq_lens if dense else dummy.view(-1)
    block_h = launch.heads_per_program(h)
    _mla_decode_kernel[(r, triton.cdiv(h, block_h))](
        q, q.stride(0), q.stride(1), cache, idx, idx.stride(0), 0 if dense else idx.shape[1],
        bt, bt.stride(0), lens, out, out.stride(0), out.stride(1), lse, sm_scale, block_size,
        layout.block_bytes(block_size), h, num_warps=launch.num_warps,
        **_constexprs(layout, dense, block_h, use_hw_cast(q.device, hw_cast), interpreted(),
                      launch.keys_per_tile(h)),
    )
    return out, lse


def _constexprs(layout, dense: bool, block_h: int, hw_cast: bool, f32: bool,
                block_n: int) -> dict:
    nt_pad = triton.next_power_of_2(layout.num_tiles)  # tiles x TILE = 512 in each layout
    # the RoPE dims fill the codes' padding exactly (model1: 7 tiles of 64 + 64 bf16)
    rope_tile = not layout.rope_fp8 and nt_pad * layout.tile - layout.d_fp8 == 64
    return dict(
        D_FP8=layout.d_fp8, PA=nt_pad * layout.tile, TILE=layout.tile, NT=layout.num_tiles,
        NT_PAD=nt_pad, HAS_R=not layout.rope_fp8 and not rope_tile, ROPE_TILE=rope_tile,
        V_HAS_R=layout.d_fp8 < D_V and not rope_tile,
        SCALE_KIND=SCALE_KINDS[layout.scale_kind], ROW_BYTES=layout.row_bytes,
        SCALE_ROW_OFF=layout.scale_row_off, ROPE_ROW_OFF=layout.rope_row_off,
        FOOTER_BYTES=layout.footer_bytes, DENSE=dense, BLOCK_H=block_h, BLOCK_N=block_n,
        HW_CAST=hw_cast, F32=f32,
    )


# the kernel's runtime argument types for an offline compile (the others are i32)
_OFFLINE_TYPES = dict(q_ptr="*bf16", cache_ptr="*u8", idx_ptr="*i32", bt_ptr="*i32",
                      len_ptr="*i32", out_ptr="*bf16", lse_ptr="*fp32", sm_scale="fp32")
# the kernel's loads of uint8 (codes, footers) and float32 (scales) read the cache only
_CACHE_LOAD = re.compile(r"= (tt\.load|ttg\.async_copy_global_to_local) .*"
                         r"tensor<[0-9x]+x!tt\.ptr<(i8|f32)>, (#[^>]*>?)")
_BLOCKED = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*?"
                      r"order = \[([\d, ]+)\]", re.M)
_BYTES = {"i8": 1, "f32": 4}


def cache_access_bytes(capability: int = 90) -> dict[str, list[int]]:
    """The decode kernel compiled offline for cuda:``capability`` (``offline_compile``; under
    the interpreter in a child; the default launch at 128 heads), per layout and path
    ("lab-dense", ...): the widths in bytes of its uint8 and float32 cache loads (one
    thread's vector each), with block_size and block_bytes declared multiples of 16, as a
    launch at block size 16 or 64 declares them."""
    if interpreted():
        return in_child("kvperf_kernels.latent.sparse_mla", "cache_access_bytes", capability)
    report, default = {}, MLALaunch()
    for layout in LAYOUTS.values():
        for dense in (False, True):
            asm = compile_offline(_mla_decode_kernel, _OFFLINE_TYPES,
                                  _constexprs(layout, dense, default.heads_per_program(128),
                                              True, False, default.keys_per_tile(128)),
                                  capability=capability, num_warps=NUM_WARPS,
                                  aligned=("block_size", "block_bytes"))
            path = "dense" if dense else "sparse"
            report[f"{layout.name}-{path}"] = _cache_load_widths(asm["ttgir"])
    return report


def sweep_instructions(capability: int = 90) -> dict[str, list[str]]:
    """The default launch and each SPEED_SWEEP variant (v32, sparse) compiled offline for
    cuda:``capability``: the tensor-core instructions of its PTX ("wgmma", "mma.sync"), so
    that a CPU run shows each variant compiles, and which dots it gets, before a GPU run."""
    if interpreted():
        return in_child("kvperf_kernels.latent.sparse_mla", "sweep_instructions", capability)
    report = {}
    for name, launch in {"default": MLALaunch(), **SPEED_SWEEP}.items():
        ptx = compile_offline(_mla_decode_kernel, _OFFLINE_TYPES,
                              _constexprs(LAYOUTS["v32"], False, launch.heads_per_program(128),
                                          True, False, launch.keys_per_tile(128)),
                              capability=capability, num_warps=launch.num_warps,
                              aligned=("block_size", "block_bytes"))["ptx"]
        report[name] = [op for op in ("wgmma", "mma.sync") if op in ptx]
    return report


def _cache_load_widths(ttgir: str) -> list[int]:
    """Bytes per thread of each cache load in TTGIR: an async copy's contiguity; a plain
    load's sizePerThread along its layout's fastest dim (of a slice: the largest of its
    parent's, an upper bound), times the element size."""
    blocked = {name: ([int(v) for v in spt.split(",")], int(order.split(",")[0]))
               for name, spt, order in _BLOCKED.findall(ttgir)}
    widths = []
    for line in ttgir.splitlines():
        m = _CACHE_LOAD.search(line)
        if m is None:
            continue
        kind, elem, layout = m.groups()
        if kind == "tt.load":
            name = re.findall(r"#\w+", layout)[-1]  # a slice's parent is its last name
            spt, fastest = blocked.get(name, ([1], 0))
            elems = max(spt) if layout.startswith("#ttg.slice") else spt[fastest]
        else:
            c = re.search(r"contiguity = (\d+)", line)
            elems = int(c.group(1)) if c else 1
        widths.append(elems * _BYTES[elem])
    return widths


def sparse_mla_decode(q, cache, indices, *, layout, block_size: int, sm_scale=None,
                      hw_cast: bool | None = None, checked: bool = True,
                      launch: MLALaunch = MLALaunch()):
    """(out bf16 [R, H, 512], lse float32 [R, H]) for q bf16 [R, H, d_qk] over the cache
    slots indices [R, K] (-1: padding). ``checked`` verifies the index range (one sync)."""
    layout = get_layout(layout)
    nb = check_cache(cache, layout, block_size)
    _check_q(q, layout)
    check_tensor(indices, "indices", INDEX_DTYPES, dim=2)
    if indices.shape[0] != q.shape[0] or indices.stride(1) != 1:
        raise ValueError(f"indices must be [R={q.shape[0]}, K] with a contiguous last dim, "
                         f"got {tuple(indices.shape)}")
    check_slots(indices.reshape(-1), "indices", indices.numel(), nb * block_size, cache,
                checked=checked)
    return _launch(q, cache, layout, block_size, sm_scale, hw_cast, launch, indices=indices)


def dense_mla_decode(q, cache, block_tables, seq_lens, *, layout, block_size: int,
                     sm_scale=None, hw_cast: bool | None = None,
                     launch: MLALaunch = MLALaunch()):
    """(out, lse) of q [R, H, d_qk] over each row's tokens 0..seq_lens[r]-1 through
    block_tables [R, max_blocks] (page ids checked against the cache)."""
    layout = get_layout(layout)
    nb = check_cache(cache, layout, block_size)
    _check_q(q, layout)
    check_tensor(block_tables, "block_tables", INDEX_DTYPES, dim=2)
    check_tensor(seq_lens, "seq_lens", INDEX_DTYPES, dim=1)
    if block_tables.shape[0] != q.shape[0] or seq_lens.shape[0] != q.shape[0]:
        raise ValueError("block_tables and seq_lens need one row per query row")
    if q.shape[0]:
        cap = block_tables.shape[1] * block_size
        if int(seq_lens.min()) < 0 or int(seq_lens.max()) > cap:
            raise ValueError(f"seq_lens must be in [0, {cap}] (block_tables' capacity)")
        ids = dense_indices(block_tables, seq_lens, block_size)
        check_slots(ids.reshape(-1), "block_tables (as slots)", ids.numel(), nb * block_size,
                    cache)
    return _launch(q, cache, layout, block_size, sm_scale, hw_cast, launch,
                   block_tables=block_tables, seq_lens=seq_lens)


