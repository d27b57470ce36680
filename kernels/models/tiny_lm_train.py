"""Train the tiny gpt-oss-style LM of ``tiny_lm`` on in-context copying; save its weights.

Deterministic: seeded torch RNGs, CPU, float32, a fixed thread count (reduction order
depends on it), fixed steps. Rebuild the shipped weights with

    python -m kvperf_kernels.models.tiny_lm_train --out suites/sinks/tiny_lm_weights.pt

(about a minute on 2 CPU cores). The same torch version and thread count give the same
bytes; others give the same accuracy up to float rounding. The weights are stored in
BF16 (as gpt-oss ships its attention weights) and the held-out accuracy is measured
after that rounding, through the paged decode loop with BF16 KV.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time

import torch
import torch.nn.functional as F

from kvperf_kernels.models.tiny_lm import (
    TinyLM,
    TinyLMConfig,
    checkpoint_blob,
    greedy_decode,
    induction_prompts,
    induction_sequences,
    load_tiny_lm,
)

TRAIN_LENGTHS = (8, 26)  # L (distinct tokens per copy), inclusive; held-out prompts use 20-24
HELD_OUT_SEED = 1234  # the test draws its prompts from other seeds


def copy_loss(model: TinyLM, seqs: torch.Tensor, length: int) -> torch.Tensor:
    """Cross-entropy on the predictable tokens: the second copy from s_1 on."""
    logits = model(seqs[:, :-1])
    targets = seqs[:, 1:]
    # target index t predicts seqs[t + 1]; the second copy's s_j sits at 1 + L + j
    return F.cross_entropy(logits[:, length + 1 :].flatten(0, 1),
                           targets[:, length + 1 :].flatten())


def train(cfg: TinyLMConfig, *, seed: int, steps: int, batch: int, lr: float,
          log_every: int = 50) -> TinyLM:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyLM(cfg)
    for name, p in model.named_parameters():  # small init; residual outputs smaller still
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * cfg.num_layers) if name.endswith(("wo.weight",
                                                                         "w_down.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    start = time.time()
    for step in range(steps):
        length = int(torch.randint(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1, (1,), generator=gen))
        seqs = induction_sequences(batch, length, cfg.vocab_size, gen)
        loss = copy_loss(model, seqs, length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:.1f}s")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="suites/sinks/tiny_lm_weights.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TinyLMConfig()
    model = train(cfg, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr)
    meta = {k: getattr(args, k) for k in ("seed", "steps", "batch", "lr", "threads")}
    meta["torch"] = str(torch.__version__)
    torch.save(checkpoint_blob(model, meta), args.out)
    digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()

    # Held-out greedy accuracy of the saved (BF16-rounded) weights, paged BF16 KV.
    saved = load_tiny_lm(args.out)
    prompts = induction_prompts(64, 12, vocab_size=cfg.vocab_size, seed=HELD_OUT_SEED)
    res = greedy_decode(saved, prompts.prompts, 12, attention="reference")
    acc = (res.tokens == prompts.answers).double().mean().item()
    print(f"saved {args.out}  sha256 {digest}\nheld-out greedy accuracy (BF16 KV) {acc:.4f}")


if __name__ == "__main__":
    main()
