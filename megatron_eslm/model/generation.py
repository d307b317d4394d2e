"""Sampling text from a trained GPT (for the quickstart's summary and quick checks)."""
from __future__ import annotations

import torch

from megatron_eslm.model.gpt import GPTModel


@torch.no_grad()
def generate(model: GPTModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, vocab_limit: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Autoregressive top-k sampling; `vocab_limit` masks the padded vocabulary rows."""
    was_training = model.training
    model.eval()
    device = model.output_weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    window = model.cfg.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model.logits(model(ids[:, -window:])[:, -1]).float()[0]
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        logits = logits / max(temperature, 1e-5)
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
        # Sampled on the host with a host generator: the same seed gives the same text on any device.
        nxt = torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator).to(device)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    model.train(was_training)
    return ids[0, len(prompt):].tolist()
