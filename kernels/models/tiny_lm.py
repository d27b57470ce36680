"""A tiny decoder-only LM with gpt-oss's attention features, decoded over a paged KV cache.

Built for the sinks lab's greedy-match test (BF16 KV vs FP8 E4M3 KV): a model whose greedy
tokens mean something, since random weights give near-uniform logits whose argmax flips
on noise. No hub model exists offline, so this one is trained here (``tiny_lm_train``) on
in-context copying (induction): a prompt ``BOS s_0..s_{L-1} s_0..s_{P-1}`` (L distinct
tokens, then the first P again) continues with ``s_P, s_{P+1}, ...``. Each next token sits
L-1 >= 17 positions back, beyond the sliding window, so the answer needs attention over
the whole context through the KV cache.

Architecture (gpt-oss's attention, scaled down): pre-norm RMSNorm blocks, GQA (8 query
heads, 2 KV heads, head_dim 64), RoPE (rotate-half, theta 10000), learned attention sinks
(one natural-log logit per query head joining the softmax denominator, FlashInfer's
definition, the same as ``paged_decode_attention``), SwiGLU MLP, untied LM head. Layers
alternate as in gpt-oss: even layers see a 16-token sliding window (the current token
included, i.e. ``window_left = 15``), odd layers the full context.

Decoding (``greedy_decode``): the prompt minus its last token is prefilled in float32 by
the plain torch forward, its K (after RoPE) and V are written into a paged cache (BF16, or
FP8 E4M3 with per-tensor or per-token scales from ``kvperf_kernels.quant.fp8``, through the
``paged_kv`` helpers); then every generated token, the first included, comes from a decode
step whose attention reads the paged cache, through our Triton ``paged_decode_attention``
(``attention="kernel"``) or the float64 torch reference on the same stored bytes
(``attention="reference"``). Queries and attention outputs are BF16 at that boundary
(gpt-oss's activation dtype); everything else runs in float32.

FP8 per-tensor scales are static after prefill (vLLM's ``calculate_kv_scales``): each
layer's K and V scale is amax/448 over the prefilled tokens, and later tokens are
quantised with that scale, saturating at +-448. Per-token scales are computed per token
vector as it is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.cache.paged_kv import (
    SCALE_GRANULARITIES,
    build_page_table,
    nan_fill,
    quantize_fp8_tokens,
    slot_mapping,
    write_paged,
    write_tokens,
)
from kvperf_kernels.formats.checks import check_int, check_tensor
from kvperf_kernels.formats.codecs import e4m3_encode_ref

BOS = 0  # the task's first token; content tokens are 1..vocab_size-1
ATTENTION_BACKENDS = ("kernel", "reference")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int = 64
    d_model: int = 128
    num_layers: int = 2
    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    d_ff: int = 256
    sliding_window: int = 16  # tokens a sliding layer's query sees, itself included
    # gpt-oss's pattern: sliding, full, sliding, full, ... (one entry per layer)
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention")
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # JSON/pickle lists
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(
                LAYER_TYPES):
            raise ValueError(f"layer_types must be {self.num_layers} of {LAYER_TYPES}, got "
                             f"{self.layer_types}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError("num_q_heads must be a multiple of num_kv_heads (GQA)")

    def window_left(self, layer: int) -> int:
        """FlashInfer's window_left of ``layer``: w-1 for a w-token sliding window, else -1."""
        return self.sliding_window - 1 if self.layer_types[layer] == "sliding_attention" else -1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x [..., T, H, D]; positions [..., T] (int), broadcast over heads."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[..., None, :]  # [..., T, 1, D]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[..., None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class TinyLM(torch.nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        d, hq, hkv, hd = cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        self.embed = torch.nn.Embedding(cfg.vocab_size, d)
        self.layers = torch.nn.ModuleList()
        for _ in range(cfg.num_layers):
            layer = torch.nn.Module()
            layer.attn_norm = torch.nn.Parameter(torch.ones(d))
            layer.wq = torch.nn.Linear(d, hq * hd, bias=False)
            layer.wk = torch.nn.Linear(d, hkv * hd, bias=False)
            layer.wv = torch.nn.Linear(d, hkv * hd, bias=False)
            layer.wo = torch.nn.Linear(hq * hd, d, bias=False)
            layer.sinks = torch.nn.Parameter(torch.zeros(hq))
            layer.mlp_norm = torch.nn.Parameter(torch.ones(d))
            layer.w_gate = torch.nn.Linear(d, cfg.d_ff, bias=False)
            layer.w_up = torch.nn.Linear(d, cfg.d_ff, bias=False)
            layer.w_down = torch.nn.Linear(cfg.d_ff, d, bias=False)
            self.layers.append(layer)
        self.final_norm = torch.nn.Parameter(torch.ones(d))
        self.lm_head = torch.nn.Linear(d, cfg.vocab_size, bias=False)

    # --- shared pieces ---------------------------------------------------------------------
    def _qkv(self, layer, h: torch.Tensor, positions: torch.Tensor):
        """q [..., Hq, D], k and v [..., Hkv, D] of hidden states h [..., d_model]."""
        cfg = self.cfg
        x = rms_norm(h, layer.attn_norm, cfg.norm_eps)
        q = layer.wq(x).unflatten(-1, (cfg.num_q_heads, cfg.head_dim))
        k = layer.wk(x).unflatten(-1, (cfg.num_kv_heads, cfg.head_dim))
        v = layer.wv(x).unflatten(-1, (cfg.num_kv_heads, cfg.head_dim))
        return (apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta),
                v)

    def _mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, layer.mlp_norm, self.cfg.norm_eps)
        return layer.w_down(F.silu(layer.w_gate(x)) * layer.w_up(x))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(h, self.final_norm, self.cfg.norm_eps))

    def check_tokens(self, tokens, what: str, dim: int) -> None:
        """Token ids: an integer tensor of ``dim`` dims on the model's device, every id in
        [0, vocab_size) (one sync: the embedding would raise IndexError, or a device assert)."""
        check_tensor(tokens, what, (torch.int32, torch.int64), dim=dim)
        device = self.embed.weight.device
        if tokens.device != device:
            raise ValueError(f"{what} is on {tokens.device}, the model on {device}")
        if tokens.numel():
            lo, hi = (int(t) for t in torch.aminmax(tokens))
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"{what}: token ids must be in [0, {self.cfg.vocab_size}), got "
                                 f"[{lo}, {hi}]")

    # --- full-sequence forward (training, prefill, no-cache reference) ---------------------
    def forward(self, tokens: torch.Tensor, *, return_kv: bool = False):
        """tokens [B, T] -> logits [B, T, V] float32 (and per layer (k, v) [B, T, Hkv, D]).

        Plain attention: causal (+ window) mask, the sink appended as one more score
        column with a zero value row, one softmax.
        """
        cfg = self.cfg
        self.check_tokens(tokens, "tokens", 2)
        batch, seq = tokens.shape
        pos = torch.arange(seq, device=tokens.device)
        h = self.embed(tokens)
        group = cfg.num_q_heads // cfg.num_kv_heads
        kvs = []
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, pos.expand(batch, seq))
            kvs.append((k, v))
            qh = q.transpose(1, 2)  # [B, Hq, T, D]
            kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
            vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(cfg.head_dim)
            dist = pos[:, None] - pos[None, :]  # query - key
            allowed = dist >= 0
            if cfg.window_left(i) >= 0:
                allowed = allowed & (dist <= cfg.window_left(i))
            scores = scores.masked_fill(~allowed, float("-inf"))
            sink = layer.sinks.to(scores.dtype)[None, :, None, None].expand(batch, -1, seq, 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :seq]
            attn = (probs @ vh).transpose(1, 2).flatten(-2)  # [B, T, Hq*D]
            h = h + layer.wo(attn)
            h = h + self._mlp(layer, h)
        logits = self._logits(h)
        return (logits, kvs) if return_kv else logits

    # --- one decode step over paged caches ---------------------------------------------------
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                    caches: list[PagedLayerCache], attention: str) -> torch.Tensor:
        """tokens, positions [B] -> logits [B, V]; appends each layer's K/V to its cache and
        attends through ``attention`` ("kernel" or "reference") with BF16 q and output."""
        self.check_tokens(tokens, "tokens", 1)
        check_tensor(positions, "positions", (torch.int32, torch.int64), dim=1)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions must be [B={tokens.shape[0]}], got "
                             f"{tuple(positions.shape)}")
        if not isinstance(caches, (list, tuple)) or len(caches) != self.cfg.num_layers or not all(
                isinstance(c, PagedLayerCache) for c in caches):
            raise TypeError(f"caches must be {self.cfg.num_layers} PagedLayerCache (one per "
                            "layer)")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h[:, None], positions[:, None])
            cache = caches[i]
            cache.append(k[:, 0], v[:, 0], positions)
            attn = cache.attend(q[:, 0].to(torch.bfloat16), layer.sinks.detach(),
                                self.cfg.window_left(i), attention)
            h = h + layer.wo(attn.float().flatten(-2))
            h = h + self._mlp(layer, h)
        return self._logits(h)


def load_tiny_lm(path, device=None, **config_overrides) -> TinyLM:
    """The trained model from a ``tiny_lm_train`` checkpoint, float32, eval mode.
    ``config_overrides`` replace config fields (e.g. ``layer_types`` for an ablation)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyLM(TinyLMConfig(**{**blob["config"], **config_overrides}))
    model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return model.to(device or "cpu").eval().requires_grad_(False)


def checkpoint_blob(model: TinyLM, meta: dict) -> dict:
    """What ``tiny_lm_train`` saves: config, BF16 weights (sinks and norms too), metadata."""
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    return {"config": asdict(model.cfg), "state_dict": state, "meta": meta}


# --- the synthetic task ---------------------------------------------------------------------

def induction_sequences(num: int, length: int, vocab_size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """[num, 1 + 2*length]: BOS, then ``length`` distinct random content tokens, twice."""
    content = torch.rand(num, vocab_size - 1, generator=generator).argsort(-1)[:, :length] + 1
    bos = torch.full((num, 1), BOS, dtype=torch.long)
    return torch.cat([bos, content, content], 1)


@dataclass
class InductionPrompts:
    prompts: list[list[int]]  # BOS s_0..s_{L-1} s_0..s_{P-1}, ragged
    answers: torch.Tensor  # [num, new_tokens] long: s_P .. s_{P+new_tokens-1}


def induction_prompts(num: int, new_tokens: int, *, vocab_size: int, seed: int,
                      lengths=(20, 24), shown=(2, 5)) -> InductionPrompts:
    """Held-out prompts (seeded): L in ``lengths``, P (copied tokens already shown) in
    ``shown``, both inclusive ranges; ragged prompt lengths 1 + L + P."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    for _ in range(num):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        p = int(torch.randint(shown[0], shown[1] + 1, (1,), generator=gen))
        if p + new_tokens > length:
            raise ValueError(f"new_tokens {new_tokens} + shown {p} exceed the sequence {length}")
        seq = induction_sequences(1, length, vocab_size, gen)[0].tolist()
        prompts.append(seq[: 1 + length + p])
        answers.append(seq[1 + length + p : 1 + length + p + new_tokens])
    return InductionPrompts(prompts, torch.tensor(answers, dtype=torch.long))


# --- paged KV cache of one layer -------------------------------------------------------------

class PagedLayerCache:
    """One layer's K/V in pages (``paged_kv`` layout), growing one token per decode step.

    The page table is built for the final lengths up front (shuffled pages, NaN-poisoned
    slots); ``seq_lens`` is the number of tokens written so far per sequence.
    """

    def __init__(self, block_tables: torch.Tensor, num_pages: int, page_size: int,
                 num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
                 granularity: str | None):
        check_tensor(block_tables, "block_tables", (torch.int32,), dim=2)
        for name, value in (("num_pages", num_pages), ("page_size", page_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check_int(value, name, 1)
        if kv_dtype == torch.float8_e4m3fn:
            if granularity not in SCALE_GRANULARITIES:
                raise ValueError(f"FP8 KV needs a granularity in {SCALE_GRANULARITIES}, "
                                 f"got {granularity!r}")
        elif kv_dtype == torch.bfloat16:
            if granularity is not None:
                raise ValueError(f"BF16 KV takes no scales, got granularity {granularity!r}")
        else:
            raise NotImplementedError(f"kv_dtype {kv_dtype}: use bfloat16 or float8_e4m3fn")
        device = block_tables.device
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.block_tables, self.page_size = block_tables, page_size
        self.kv_dtype, self.granularity = kv_dtype, granularity
        self.k_cache = nan_fill(shape, kv_dtype, device)
        self.v_cache = nan_fill(shape, kv_dtype, device)
        self.k_scale = self.v_scale = None
        if granularity == "per_token":
            self.k_scale = torch.full(shape[:3], float("nan"), device=device)
            self.v_scale = torch.full(shape[:3], float("nan"), device=device)
        self.seq_lens = torch.zeros(block_tables.shape[0], dtype=torch.int32, device=device)
        self.saturated = 0  # per-tensor FP8: elements clamped at +-448 after prefill

    def prefill(self, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> None:
        """Write the first ``lens[b]`` tokens of each sequence: k, v [sum(lens), Hkv, D]."""
        slots = slot_mapping(self.block_tables, lens, self.page_size,
                             num_pages=self.k_cache.shape[0])
        # Per-tensor FP8 scales are fixed here, from the prefilled tokens (static afterwards).
        self.k_scale = write_tokens(self.k_cache, slots, k, self.granularity, self.k_scale)
        self.v_scale = write_tokens(self.v_cache, slots, v, self.granularity, self.v_scale)
        self.seq_lens.copy_(lens)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Write one token per sequence (k, v [B, Hkv, D]) at ``positions`` [B]."""
        check_tensor(positions, "positions", (torch.int32, torch.int64), dim=1)
        if positions.shape != self.seq_lens.shape:
            raise ValueError(f"positions must be [B={self.seq_lens.shape[0]}], got "
                             f"{tuple(positions.shape)}")
        if not torch.equal(positions.to(self.seq_lens.device), self.seq_lens.long()):
            raise ValueError("append: positions must equal the current seq_lens")
        pages = self.block_tables.gather(1, (positions // self.page_size)[:, None].to(
            self.block_tables.device).long())[:, 0].long()
        slots = pages * self.page_size + positions % self.page_size
        if self.kv_dtype == torch.bfloat16:
            kq, vq = k.to(torch.bfloat16), v.to(torch.bfloat16)
        elif self.granularity == "per_token":
            kq, ks = quantize_fp8_tokens(k, "per_token")
            vq, vs = quantize_fp8_tokens(v, "per_token")
            write_paged(self.k_scale, slots, ks)
            write_paged(self.v_scale, slots, vs)
        else:  # per-tensor: the prefill's scale, saturating (fp8_quant's encode rule)
            kf, vf = k.float() / self.k_scale, v.float() / self.v_scale
            self.saturated += int((kf.abs() > 448).sum() + (vf.abs() > 448).sum())
            kq, vq = e4m3_encode_ref(kf), e4m3_encode_ref(vf)
        write_paged(self.k_cache, slots, kq)
        write_paged(self.v_cache, slots, vq)
        self.seq_lens += 1

    def attend(self, q: torch.Tensor, sinks: torch.Tensor, window_left: int,
               attention: str) -> torch.Tensor:
        """Decode attention of q [B, Hq, D] (bf16) over the cache: [B, Hq, D] bf16."""
        args = (q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens)
        kwargs = dict(k_scale=self.k_scale, v_scale=self.v_scale, sinks=sinks,
                      window_left=window_left)
        if attention == "kernel":
            return paged_decode_attention(*args, **kwargs)
        if attention == "reference":
            out = paged_decode_attention_ref(*args, **kwargs)
            return out.to(q.dtype)  # the kernel's output dtype: the same rounding point
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")


# --- greedy decoding ---------------------------------------------------------------------------

@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, N] long, the argmax of each step
    logits: torch.Tensor  # [B, N, V] float32
    caches: list[PagedLayerCache]


def _prompt_lengths(prompts, vocab_size: int, *, min_len: int) -> list[int]:
    """Lengths of ``prompts`` (a list of token-id lists, each id in [0, vocab_size), each
    prompt at least min_len long), else TypeError/ValueError naming prompts."""
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple))
                                                         for p in prompts):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for b, p in enumerate(prompts):
        if len(p) < min_len:
            raise ValueError(f"prompts[{b}] has {len(p)} tokens; every prompt needs >= {min_len}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                   for t in p):
            raise ValueError(f"prompts[{b}]: token ids must be ints in [0, {vocab_size})")
    return [len(p) for p in prompts]


def _no_sequences(new_tokens: int, vocab_size: int, device) -> DecodeResult:
    """An empty batch's result: no tokens, no logits, no caches."""
    return DecodeResult(torch.zeros(0, new_tokens, dtype=torch.long, device=device),
                        torch.zeros(0, new_tokens, vocab_size, device=device), [])


@torch.no_grad()
def greedy_decode(model: TinyLM, prompts: list[list[int]], new_tokens: int, *,
                  kv_dtype: torch.dtype = torch.bfloat16, granularity: str | None = None,
                  attention: str = "kernel", page_size: int = 16,
                  forced: torch.Tensor | None = None, seed: int = 0,
                  device=None) -> DecodeResult:
    """Greedy-decode ``new_tokens`` tokens after each prompt over a paged KV cache.

    Prefill (float32 torch forward) covers each prompt but its last token; decode step 0
    feeds that token, so every generated token's attention reads the paged cache.
    ``forced`` [B, N-1] feeds given tokens instead of the argmax (teacher forcing: two
    runs then see the same history and their logits compare step by step); the returned
    ``tokens`` are still each step's argmax. ``seed`` shuffles the page table.
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    check_int(new_tokens, "new_tokens", 1)
    check_int(page_size, "page_size", 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.cfg
    batch = len(prompts)
    lens = _prompt_lengths(prompts, cfg.vocab_size, min_len=2)  # prefill all but the last
    if forced is not None:
        check_tensor(forced, "forced")
        if tuple(forced.shape) != (batch, new_tokens - 1):
            raise ValueError(f"forced must be [B={batch}, N-1={new_tokens - 1}], "
                             f"got {tuple(forced.shape)}")
        model.check_tokens(forced.to(device), "forced", 2)
    if batch == 0:
        return _no_sequences(new_tokens, cfg.vocab_size, device)

    # Page table for the final lengths (last generated token is never written).
    final = [n + new_tokens - 1 for n in lens]
    block_tables, _, num_pages, _ = build_page_table(
        final, page_size, generator=torch.Generator().manual_seed(seed), device=device)
    caches = [PagedLayerCache(block_tables, num_pages, page_size, cfg.num_kv_heads,
                              cfg.head_dim, kv_dtype, granularity)
              for _ in range(cfg.num_layers)]

    # Prefill prompt[:-1] (right-padded; causal, so padding never reaches valid positions).
    width = max(lens) - 1
    padded = torch.full((batch, width), BOS, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p) - 1] = torch.tensor(p[:-1])
    _, kvs = model(padded.to(device), return_kv=True)
    pre_lens = torch.tensor([n - 1 for n in lens], dtype=torch.int32, device=device)
    valid = torch.arange(width, device=device)[None, :] < pre_lens[:, None]
    for cache, (k, v) in zip(caches, kvs, strict=True):
        cache.prefill(k[valid], v[valid], pre_lens)

    tokens = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
    positions = pre_lens.long()
    out_tokens, out_logits = [], []
    for step in range(new_tokens):
        logits = model.decode_step(tokens, positions, caches, attention)
        out_logits.append(logits)
        out_tokens.append(logits.argmax(-1))
        if step + 1 < new_tokens:
            tokens = out_tokens[-1] if forced is None else forced[:, step].to(device)
            positions = positions + 1
    return DecodeResult(torch.stack(out_tokens, 1), torch.stack(out_logits, 1), caches)


@torch.no_grad()
def greedy_decode_no_cache(model: TinyLM, prompts: list[list[int]], new_tokens: int,
                           device=None) -> DecodeResult:
    """The float32 reference: each step re-runs the full forward over prompt + generated
    tokens (no cache, no 16-bit rounding). Rows are right-padded: the mask is causal, so
    padding after a row's last token never reaches its logits."""
    check_int(new_tokens, "new_tokens", 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not _prompt_lengths(prompts, model.cfg.vocab_size, min_len=1):
        return _no_sequences(new_tokens, model.cfg.vocab_size, device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    seqs = torch.full((len(prompts), int(lens.max()) + new_tokens), BOS, dtype=torch.long,
                      device=device)
    for b, p in enumerate(prompts):
        seqs[b, : len(p)] = torch.tensor(p)
    rows = torch.arange(len(prompts), device=device)
    out_tokens, out_logits = [], []
    for _ in range(new_tokens):
        logits = model(seqs[:, : int(lens.max())])[rows, lens - 1]
        out_logits.append(logits)
        out_tokens.append(logits.argmax(-1))
        seqs[rows, lens] = out_tokens[-1]
        lens = lens + 1
    return DecodeResult(torch.stack(out_tokens, 1), torch.stack(out_logits, 1), [])
