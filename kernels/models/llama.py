"""A Llama-architecture LM (SmolLM2-135M) in torch, run over a paged KV cache in every KV format.

The model (``Llama``): token embedding, ``num_layers`` pre-norm blocks (RMSNorm, GQA
attention with rotate-half RoPE, SwiGLU MLP), final RMSNorm, LM head tied to the embedding
when the file ties them. Weights come from ``gguf_weights.load`` (float32, Q/K rows already
un-permuted to Hugging Face's layout). ``dtype`` is the dtype of the blocks' matmuls:
float32 (default), or bfloat16 as a serving engine runs them (weights, inputs and outputs
BF16, float32 accumulation; on a CPU without oneDNN's bf16 GEMM as float32 GEMMs on those
values, ``bf16_gemm_is_generic``); norms, RoPE, softmax, the residual stream and the LM head
(float32 logits) are float32 either way.

Two ways to run it:

- ``forward(tokens)``: the plain full-sequence forward, causal attention in float32 with
  no cache and no 16-bit rounding: the reference the cross-checks (Hugging Face
  transformers, llama.cpp) compare with.
- ``forward_paged(...)``: every new token's K (after RoPE) and V are first written into a
  paged cache (``PagedKVCache``: one ``paged_formats.PagedStore`` per layer for K and one
  for V, in the cache configuration's formats), then every query attends to its sequence's
  tokens 0..pos *read back from the cache*, its own included: the decode semantics, also
  for a prefill or a teacher-forced chunk (a chunk's queries are a batch of decode queries
  that share one page table row, ``seq_len = pos + 1`` each). Queries and attention outputs
  are BF16 at that boundary (the decode kernel's contract).

Attention backends (``attention=``):

- ``"kernel"``: our Triton ``paged_decode_attention`` on the stored pages of every format
  (BF16; FP8 per-tensor, per-token, 1x64-block scales; MXFP8; NVFP4; K FP8 + V NVFP4),
  decoded in its registers, one launch per layer and chunk. (Before issue 17 MXFP8, NVFP4
  and the mixed cache were dequantise-then-attend: a BF16 copy of the pages, written by the
  quantisers' dequantise kernels, read by the same decode kernel.)
- ``"reference"``: each slot's stored bytes read back out of the pages and decoded by the
  torch references when written (float32 for BF16 and FP8, BF16 for MXFP8 and NVFP4: the
  rounding of the former unfused kernel path, kept so the recorded CPU figures hold), gathered per
  sequence through the page table, masked causal attention in float32 (torch SDPA),
  output rounded to BF16. This is the CPU path (the Triton interpreter would take hours for
  a 30-layer model).

``teacher_forced`` runs a text through ``forward_paged`` in chunks and returns the logits of
every position (perplexity, logit drift); ``greedy`` prefills prompts (all but their last
token) and decodes new tokens one step at a time, each step's attention reading the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.cache.paged_kv import build_page_table
from kvperf_kernels.models.gguf_weights import LlamaConfig, LoadedModel, permute_rows
from kvperf_kernels.models.paged_formats import BF16_READBACK, KERNEL_NATIVE, PagedStore

ATTENTION_BACKENDS = ("kernel", "reference")
# cache configuration -> (K format, V format)
KV_CONFIGS: dict[str, tuple[str, str]] = {
    "bf16": ("bf16", "bf16"),
    "fp8_per_tensor": ("fp8_per_tensor", "fp8_per_tensor"),
    "fp8_per_token": ("fp8_per_token", "fp8_per_token"),
    "fp8_per_block64": ("fp8_per_block64", "fp8_per_block64"),
    "mxfp8": ("mxfp8", "mxfp8"),
    "nvfp4": ("nvfp4", "nvfp4"),
    "k_fp8_per_token+v_nvfp4": ("fp8_per_token", "nvfp4"),
}
ROPE_STYLES = ("rotate_half", "interleaved")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(cfg: LlamaConfig, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, D/2] float32, Hugging Face's LlamaRotaryEmbedding arithmetic."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64,
                                                      device=device).float() / d))
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x [..., H, D]; cos/sin [..., D/2] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    if style == "rotate_half":  # pairs (i, i + D/2): Hugging Face's layout
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    # interleaved pairs (2i, 2i+1): ggml's layout (GGUF rows as stored)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)


def bf16_gemm_is_generic(device: torch.device) -> bool:
    """True on a CPU whose bf16 GEMM is torch's generic loop (no oneDNN bf16: x86 without
    avx512_bf16 or AMX, e.g. an AVX2-only AMD EPYC, where it ran 2.5x slower than float32).
    There the model's bf16 matmuls run as float32 GEMMs on the bf16-rounded operands, the
    result rounded to bf16: a bf16 GEMM's values up to the order of its float32
    accumulation, which differs between hosts anyway."""
    if device.type != "cpu":
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return True


class Llama:
    """SmolLM2 in plain torch (no nn.Module: inference only). Weights on ``device``."""

    def __init__(self, cfg: LlamaConfig, tensors: dict[str, torch.Tensor], *, device=None,
                 dtype: torch.dtype = torch.float32, rope_style: str = "rotate_half"):
        if rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        self.cfg, self.dtype, self.rope_style = cfg, dtype, rope_style
        self.device = torch.device(device or "cpu")
        self.bf16_as_fp32 = dtype == torch.bfloat16 and bf16_gemm_is_generic(self.device)

        def w(name, mm=True):
            t = tensors[name].to(self.device)
            if not mm:
                return t.float()
            # bf16 values; held as float32 where the bf16 GEMM is torch's generic one
            return t.to(dtype).float() if self.bf16_as_fp32 else t.to(dtype)

        self.embed = w("model.embed_tokens.weight", mm=False)
        # float32 logits whatever ``dtype``: BF16 logits (an ulp of 0.25-0.5 at the logits'
        # magnitude) would blur the perplexity and drift figures
        self.lm_head = self.embed if cfg.tie_embeddings else w("lm_head.weight", mm=False)
        self.final_norm = w("model.norm.weight", mm=False)
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "attn_norm": w(p + "input_layernorm.weight", mm=False),
                "wqkv": torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                "wo": w(p + "self_attn.o_proj.weight"),
                "mlp_norm": w(p + "post_attention_layernorm.weight", mm=False),
                "w_gate_up": torch.cat([w(p + "mlp.gate_proj.weight"),
                                        w(p + "mlp.up_proj.weight")]),
                "w_down": w(p + "mlp.down_proj.weight"),
            })
        self.cos, self.sin = rope_tables(cfg, cfg.context_length, self.device)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **kwargs) -> Llama:
        return cls(loaded.config, loaded.tensors, **kwargs)

    def truncated(self, num_layers: int) -> Llama:
        """The same weights with only the first ``num_layers`` blocks (cheap kernel checks)."""
        other = object.__new__(Llama)
        other.__dict__.update(self.__dict__)
        other.layers = self.layers[:num_layers]
        other.cfg = LlamaConfig(**{**self.cfg.__dict__, "num_layers": num_layers})
        return other

    def with_gguf_rope_layout(self) -> Llama:
        """The same model with Q/K rows permuted back to GGUF's layout and ggml's interleaved
        RoPE: mathematically identical (a per-head reordering of the q and k channels)."""
        other = object.__new__(Llama)
        other.__dict__.update(self.__dict__)
        other.rope_style = "interleaved"
        other.layers = [{**layer, "wqkv": self._repermuted(layer["wqkv"])}
                        for layer in self.layers]
        return other

    def without_unpermute(self) -> Llama:
        """A control: GGUF's permuted Q/K rows with rotate-half RoPE (the loader bug that
        forgets to un-permute). Wrong attention everywhere, the model still runs."""
        other = self.with_gguf_rope_layout()
        other.rope_style = "rotate_half"
        return other

    def _repermuted(self, wqkv: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        nq, nk = c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = wqkv.split([nq, nk, nk])
        return torch.cat([permute_rows(q, c.num_q_heads), permute_rows(k, c.num_kv_heads), v])

    # --- pieces ------------------------------------------------------------------------------
    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.bf16_as_fp32:  # bf16 operands, float32 accumulation, a bf16 result
            return F.linear(x.to(self.dtype).float(), w).to(self.dtype).float()
        return F.linear(x.to(self.dtype), w).float()

    def _qkv(self, layer, h: torch.Tensor, positions: torch.Tensor):
        c = self.cfg
        x = rms_norm(h, layer["attn_norm"], c.norm_eps)
        qkv = self._mm(x, layer["wqkv"])
        nq, nk = c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = qkv.split([nq, nk, nk], -1)
        q = q.unflatten(-1, (c.num_q_heads, c.head_dim))
        k = k.unflatten(-1, (c.num_kv_heads, c.head_dim))
        v = v.unflatten(-1, (c.num_kv_heads, c.head_dim))
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} beyond the context "
                             f"{self.cos.shape[0]}")
        cos, sin = self.cos[positions], self.sin[positions]
        return (apply_rope(q, cos, sin, self.rope_style), apply_rope(k, cos, sin, self.rope_style),
                v)

    def _mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, layer["mlp_norm"], self.cfg.norm_eps)
        gate, up = self._mm(x, layer["w_gate_up"]).chunk(2, -1)
        return self._mm(F.silu(gate) * up, layer["w_down"])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.final_norm, self.cfg.norm_eps), self.lm_head)

    # --- the reference forward -------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, *, return_kv: bool = False):
        """tokens [B, T] -> logits [B, T, V] float32 (and per layer (k, v) [B, T, Hkv, D]).
        Causal float32 attention, no cache."""
        tokens = tokens.to(self.device)
        pos = torch.arange(tokens.shape[1], device=self.device).expand(tokens.shape)
        h = self.embed[tokens]
        kvs = []
        for layer in self.layers:
            q, k, v = self._qkv(layer, h, pos)
            kvs.append((k, v))
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True,
                                                  enable_gqa=True)
            h = h + self._mm(attn.transpose(1, 2).flatten(-2), layer["wo"])
            h = h + self._mlp(layer, h)
        logits = self.logits(h)
        return (logits, kvs) if return_kv else logits

    # --- over the paged cache -----------------------------------------------------------------
    @torch.no_grad()
    def forward_paged(self, tokens: torch.Tensor, counts: list[int], cache: PagedKVCache,
                      attention: str, *, want: str = "all") -> torch.Tensor | None:
        """Append ``counts[b]`` tokens (``tokens[b, :counts[b]]``) to each sequence of
        ``cache`` and return their logits: ``want`` "all" [B, Q, V], "last" [B, V] (each
        row's last new token; rows with no token give garbage) or "none"."""
        if attention != cache.attention:
            raise ValueError(f"the cache was built for attention={cache.attention!r}, not "
                             f"{attention!r}")
        dev = self.device
        tokens = tokens.to(dev)
        bsz, width = tokens.shape
        if len(counts) != bsz or any(n < 0 or n > width for n in counts):
            raise ValueError(f"counts {counts} do not fit tokens of shape {tuple(tokens.shape)}")
        starts = torch.tensor(cache.lens, device=dev)
        cnt = torch.tensor(counts, device=dev)
        ar = torch.arange(width, device=dev)
        pos = starts[:, None] + ar[None, :]
        valid = ar[None, :] < cnt[:, None]
        pos = torch.where(valid, pos, 0)  # padding: any in-range position (never written)
        slots = cache.slots(pos)[valid]
        lens_after = [s + n for s, n in zip(cache.lens, counts, strict=True)]
        for n, cap in zip(lens_after, cache.capacity, strict=True):
            if n > cap:
                raise ValueError(f"sequence length {n} beyond the cache's {cap}")
        h = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, pos)
            k_store, v_store = cache.layers[i]
            k_store.write(slots, k[valid])
            v_store.write(slots, v[valid])
            attn = self._attend(i, q, pos, valid, lens_after, cache, attention)
            h = h + self._mm(attn.flatten(-2), layer["wo"])
            h = h + self._mlp(layer, h)
        cache.lens = lens_after
        if want == "none":
            return None
        if want == "last":
            rows = torch.arange(bsz, device=dev)
            return self.logits(h[rows, (cnt - 1).clamp(min=0)])
        return self.logits(h)

    def _attend(self, i: int, q: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                lens_after: list[int], cache: PagedKVCache, attention: str) -> torch.Tensor:
        """Layer i's attention of q [B, Q, Hq, D] over the cache: [B, Q, Hq, D] float32."""
        k_store, v_store = cache.layers[i]
        if attention == "kernel":
            return self._attend_kernel(q, pos, valid, cache, k_store, v_store)
        return self._attend_reference(q, pos, valid, lens_after, cache, k_store, v_store)

    def _attend_kernel(self, q, pos, valid, cache, k_store, v_store):
        b, j = valid.nonzero(as_tuple=True)
        qn = q[b, j].to(torch.bfloat16).contiguous()
        lens = (pos[b, j] + 1).to(torch.int32).contiguous()
        tables = cache.block_tables[b].contiguous()
        if cache.native:  # the stored codes and scales, decoded in the kernel
            kv = {**k_store.kernel_args("k"), **v_store.kernel_args("v")}
        else:  # dequantise-then-attend: the BF16 pages the dequantise kernels wrote
            kv = {"k_cache": k_store.readback, "v_cache": v_store.readback}
        kc, vc = kv.pop("k_cache"), kv.pop("v_cache")
        out_n = paged_decode_attention(qn, kc, vc, tables, lens, **kv,
                                       max_seq_len=int(pos.max()) + 1, checked=True)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        out[b, j] = out_n.float()
        return out

    def _attend_reference(self, q, pos, valid, lens_after, cache, k_store, v_store):
        dev = q.device
        total = max(lens_after)
        t = torch.arange(total, device=dev)
        lens = torch.tensor(lens_after, device=dev)
        slots = cache.slots(t[None, :].expand(len(lens_after), -1))  # [B, T]
        kvalid = t[None, :] < lens[:, None]  # [B, T]
        idx = torch.where(kvalid, slots, 0)

        def read(store):  # the stored values (read back when written) at the slots
            x = store.readback.view(-1, *store.readback.shape[2:])[idx].float()
            return torch.where(kvalid[..., None, None], x, 0.0).transpose(1, 2)  # [B, Hkv, T, D]

        k, v = read(k_store), read(v_store)
        mask = (t[None, None, :] <= pos[:, :, None]) & kvalid[:, None, :]  # [B, Q, T]
        mask = mask | ~valid[:, :, None] & (t == 0)[None, None, :]  # padding rows: any key
        qb = q.to(torch.bfloat16).float().transpose(1, 2)  # [B, Hq, Q, D]
        out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return out.transpose(1, 2).to(torch.bfloat16).float()


class PagedKVCache:
    """Every layer's K and V stores for a batch of sequences, on one shuffled page table
    sized for each sequence's final length (``capacity``); ``lens`` counts what is written."""

    def __init__(self, cfg: LlamaConfig, kv_config: str, capacity: list[int], *,
                 attention: str = "reference", page_size: int = 16, seed: int = 0,
                 device=None):
        if kv_config not in KV_CONFIGS:
            raise ValueError(f"unknown KV configuration {kv_config!r}; known: "
                             f"{tuple(KV_CONFIGS)}")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        self.kv_config, self.attention = kv_config, attention
        self.page_size = page_size
        self.capacity = list(capacity)
        gen = torch.Generator().manual_seed(seed)
        self.block_tables, _, self.num_pages, _ = build_page_table(
            self.capacity, page_size, generator=gen, device=device)
        k_fmt, v_fmt = KV_CONFIGS[kv_config]
        # the kernel reads the codes with their scales as stored (BF16 only beside BF16: a
        # 16-bit side and a quantised one share no tile type; no configuration mixes them);
        # any other cache would be dequantised to BF16 when written and attended from that
        # copy (the unfused path). The reference reads values: exact (float32), or BF16 for
        # the formats the unfused path once rounded so (BF16_READBACK).
        self.native = (k_fmt in KERNEL_NATIVE and v_fmt in KERNEL_NATIVE
                       and (k_fmt == v_fmt or "bf16" not in (k_fmt, v_fmt)))
        if attention == "kernel":
            readback = None if self.native else torch.bfloat16
        else:
            readback = (torch.bfloat16 if {k_fmt, v_fmt} & set(BF16_READBACK)
                        else torch.float32)
        self.layers = [
            tuple(PagedStore(fmt, self.num_pages, page_size, cfg.num_kv_heads, cfg.head_dim,
                             device, readback=readback) for fmt in (k_fmt, v_fmt))
            for _ in range(cfg.num_layers)
        ]
        self.lens = [0] * len(self.capacity)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat slots of positions [B, Q] (row b in sequence b's pages)."""
        s = self.page_size
        pages = self.block_tables.long().gather(1, positions // s)
        return pages * s + positions % s

    @property
    def saturated(self) -> int:
        return sum(st.saturated for pair in self.layers for st in pair)

    def bytes_per_token(self) -> float:
        """K + V bytes of one token over all layers (per-tensor scales excluded)."""
        return sum(st.bytes_per_token() for pair in self.layers for st in pair)


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------

@dataclass
class TeacherForced:
    logits: torch.Tensor  # [T, V] float32: position t predicts token t+1
    nll: torch.Tensor  # [T-1] float64: -log p(token t+1 | tokens 0..t)
    cache: PagedKVCache

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())


def nll_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL of logits [T, V] for tokens [T]: logsumexp - target
    logit, float32 per position (a float64 copy of the logits costs more than it buys),
    returned as float64."""
    x = logits[:-1].float()
    target = x.gather(1, tokens[1:].to(x.device)[:, None])[:, 0]
    return (torch.logsumexp(x, -1) - target).double()


@torch.no_grad()
def teacher_forced(model: Llama, tokens: list[int], kv_config: str, *, attention: str,
                   chunk: int = 512, page_size: int = 16, seed: int = 0) -> TeacherForced:
    """The text's logits with every K/V written to and read from a paged cache, ``chunk``
    tokens per forward (static per-tensor scales come from the first chunk)."""
    cache = PagedKVCache(model.cfg, kv_config, [len(tokens)], attention=attention,
                         page_size=page_size, seed=seed, device=model.device)
    ids = torch.tensor(tokens, dtype=torch.long)
    outs = []
    for start in range(0, len(tokens), chunk):
        part = ids[start:start + chunk]
        outs.append(model.forward_paged(part[None], [len(part)], cache, attention)[0])
    logits = torch.cat(outs)
    return TeacherForced(logits, nll_of(logits, ids), cache)


@dataclass
class GreedyResult:
    tokens: torch.Tensor  # [B, N] long: each step's argmax
    logits: torch.Tensor | None  # [B, N, V] float32 when kept
    cache: PagedKVCache


@torch.no_grad()
def greedy(model: Llama, prompts: list[list[int]], new_tokens: int, kv_config: str, *,
           attention: str, page_size: int = 16, seed: int = 0, prefill_chunk: int = 1024,
           keep_logits: bool = False, forced: torch.Tensor | None = None) -> GreedyResult:
    """Greedy-decode ``new_tokens`` after each prompt. Prefill: each prompt but its last token
    (in chunks of ``prefill_chunk``, all prompts together); decode step 0 feeds that token,
    so every generated token comes from a decode step. ``forced`` [B, N-1] feeds given
    tokens instead of the argmax (teacher forcing)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    lens = [len(p) for p in prompts]
    if min(lens) < 2:
        raise ValueError("every prompt needs >= 2 tokens (prefill all but the last)")
    cache = PagedKVCache(model.cfg, kv_config, [n + new_tokens - 1 for n in lens],
                         attention=attention, page_size=page_size, seed=seed,
                         device=model.device)
    width = max(lens) - 1
    for start in range(0, width, prefill_chunk):
        counts = [max(0, min(prefill_chunk, n - 1 - start)) for n in lens]
        block = torch.zeros((len(prompts), min(prefill_chunk, width - start)), dtype=torch.long)
        for b, p in enumerate(prompts):
            part = p[start:start + counts[b]]
            block[b, :len(part)] = torch.tensor(part, dtype=torch.long)
        model.forward_paged(block, counts, cache, attention, want="none")
    tok = torch.tensor([p[-1] for p in prompts], dtype=torch.long)
    out_tokens, out_logits = [], []
    for step in range(new_tokens):
        logits = model.forward_paged(tok[:, None], [1] * len(prompts), cache, attention,
                                     want="last")
        nxt = logits.argmax(-1).cpu()
        out_tokens.append(nxt)
        if keep_logits:
            out_logits.append(logits)
        if step + 1 < new_tokens:
            tok = nxt if forced is None else forced[:, step].cpu()
    return GreedyResult(torch.stack(out_tokens, 1),
                        torch.stack(out_logits, 1) if keep_logits else None, cache)


@torch.no_grad()
def greedy_no_cache(model: Llama, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """The float32 reference decode: the full forward over prompt + generated tokens at every
    step (no cache, no 16-bit rounding). [B, N] long."""
    seqs = [list(p) for p in prompts]
    for _ in range(new_tokens):
        width = max(map(len, seqs))
        batch = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            batch[b, :len(s)] = torch.tensor(s)
        logits = model.forward(batch)
        for b, s in enumerate(seqs):  # causal: right padding never reaches position len-1
            s.append(int(logits[b, len(s) - 1].argmax()))
    return torch.tensor([s[len(p):] for s, p in zip(seqs, prompts, strict=True)])
