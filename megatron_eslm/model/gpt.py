"""GPT language model: embeddings, transformer blocks, final norm, and an LM head tied to the input
embedding whose loss goes through the selective head (only kept tokens get LM-head gradients)."""
from __future__ import annotations

import torch
from torch import nn

from megatron_eslm.config import ModelConfig
from megatron_eslm.model.lm_head import LMHeadOutput, Selector, selective_lm_head_loss
from megatron_eslm.model.transformer import TransformerBlock


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron pads the vocabulary so the embedding's rows split evenly (and GEMMs stay aligned)."""
    return -(-vocab_size // divisible_by) * divisible_by


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.word_embeddings = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        nn.init.normal_(self.word_embeddings.weight, std=cfg.init_method_std)
        nn.init.normal_(self.position_embeddings.weight, std=cfg.init_method_std)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head is tied to the input embedding, as in GPT-2 and Megatron's default."""
        return self.word_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> final hidden states [b, s, h] (the LM head is applied by `loss`)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding_dropout(self.word_embeddings(tokens) + self.position_embeddings(positions))
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, select: Selector | None,
             impl: str = "torch") -> LMHeadOutput:
        """Per-token scores over every token, then the loss over the tokens `select` keeps."""
        weight = self.output_weight
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        return selective_lm_head_loss(hidden, weight, labels, select, impl=impl)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits, only for generation of a few positions; training never builds them."""
        return hidden @ self.output_weight.t()
