"""Decode-step workloads for the CUDA-graph lab: a page table with room for the steps to come,
a cache filled with random K/V for the context already there, and the greedy loop that
feeds each step's tokens to the next."""

from __future__ import annotations

import torch

from kvperf_kernels.cache.paged_kv import cdiv
from kvperf_kernels.models.decode_step import DecodeStepModel


def pages_needed(context_lens, steps: int, page_size: int) -> int:
    """Pages for every sequence's context + steps tokens, plus the scratch page."""
    return sum(cdiv(n + steps, page_size) for n in context_lens) + 1


def step_workload(model: DecodeStepModel, context_lens, steps: int, *, seed: int = 0):
    """(tokens int64 [B], positions int64 [B], block_tables int32 [B, max_pages]) and the model's
    cache filled with seeded random K/V (unused slots too: nothing may read them). Pages are
    handed out shuffled; unused table entries point at the scratch page."""
    ps, dev = model.page_size, model.device
    gen = torch.Generator().manual_seed(seed)
    num_pages = model.cache.shape[2]
    per_seq = [cdiv(n + steps, ps) for n in context_lens]
    if sum(per_seq) > num_pages - 1:
        raise ValueError(f"the model's cache has {num_pages - 1} pages besides the scratch "
                         f"page; the workload needs {sum(per_seq)}")
    order = torch.randperm(num_pages - 1, generator=gen)[: sum(per_seq)]
    table = torch.full((len(context_lens), max(per_seq)), model.scratch_page, dtype=torch.int32)
    start = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = order[start:start + n].to(torch.int32)
        start += n
    dev_gen = torch.Generator(device=dev).manual_seed(seed)  # the cache: GBs at 24 layers
    model.cache.copy_(torch.randn(model.cache.shape, generator=dev_gen, device=dev))
    tokens = torch.randint(0, model.cfg.vocab, (len(context_lens),), generator=gen)
    positions = torch.tensor(context_lens, dtype=torch.int64)
    return tokens.to(dev), positions.to(dev), table.to(dev)


def greedy_steps(run, tokens, positions, block_tables, steps: int, forced=None):
    """``steps`` decode steps of run(tokens, positions, block_tables) -> (logits, next): each
    step's argmax is the next input, or ``forced[s]`` (another run's tokens [steps, B]: a
    comparison then sees the same inputs at every step, so one flip at a near-tie cannot
    make the rest of the run diverge). Returns logits [steps, B, vocab], tokens [steps, B]."""
    all_logits, all_tokens = [], []
    for s in range(steps):
        logits, nxt = run(tokens, positions, block_tables)
        all_logits.append(logits.clone())
        all_tokens.append(nxt.clone())
        tokens = (nxt if forced is None else forced[s]).clone()
        positions = positions + 1
    return torch.stack(all_logits), torch.stack(all_tokens)
