"""Sampling text from a trained GPT (`python -m megatron_eslm.generate`, the quickstart's summary): greedy, or
temperature with top-k and top-p (nucleus) filtering. Each new token runs the whole window again (no
key/value cache): meant for checks and short samples, not for serving."""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm.model.gpt import GPTModel


def next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int | None, top_p: float,
               generator: torch.Generator | None) -> Tensor:
    """The next token id [1] from one position's logits."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the most likely tokens whose probability sums to top_p (the first always)
        ordered, order = torch.sort(logits, descending=True)
        before = torch.softmax(ordered, -1).cumsum(-1) - torch.softmax(ordered, -1)
        logits = logits.scatter(0, order, ordered.masked_fill(before >= top_p, float("-inf")))
    # Sampled on the host with a host generator: the same seed gives the same text on any device.
    return torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(model: GPTModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 40, top_p: float = 1.0, greedy: bool = False, vocab_limit: int | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """The `max_new_tokens` token ids after `prompt`; `vocab_limit` masks the padded vocabulary rows."""
    was_training = model.training
    model.eval()
    device = model.output_weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    window = model.cfg.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model.logits(model(ids[:, -window:])[:, -1]).float()[0]
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        nxt = next_token(logits, greedy, temperature, top_k, top_p, generator)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    model.train(was_training)
    return ids[0, len(prompt):].tolist()
