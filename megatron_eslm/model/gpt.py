"""GPT language model: embeddings, transformer blocks, final norm, and an LM head tied to the input
embedding whose loss goes through the selective head (only kept tokens get LM-head gradients).

Parallel layouts hold a part of this model (`parallel_state` says which):
  tensor     the word embedding / LM head split by vocabulary rows, attention by heads, the MLP by width;
  pipeline   stage p holds layers [p * L/pp, (p+1) * L/pp); the first stage also the embeddings, the last
             the final norm and the LM head, with its own copy of the tied word embedding (first and last
             stage sum their gradients of it, so the copies stay equal).
Every weight is drawn from a generator seeded by (seed, which embedding or layer it belongs to), whole,
and then sharded, so every layout holds exactly the weights of one process with the same seed.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.model.lm_head import LMHeadOutput, Selector, selective_lm_head_loss
from megatron_eslm.model.transformer import LayerNorm, TransformerBlock
from megatron_eslm.tensor_parallel import mappings
from megatron_eslm.tensor_parallel.layers import (ShardedDropout, VocabParallelEmbedding, activation_dtype,
                                                  mark_sequence_parallel, master_normal, to_activation_dtype)
from megatron_eslm.tensor_parallel.lm_head import vocab_parallel_lm_head_loss

T = TypeVar("T")


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron pads the vocabulary so the embedding's rows split evenly (and GEMMs stay aligned); with
    tensor parallelism pass make_vocab_size_divisible_by * TP."""
    return -(-vocab_size // divisible_by) * divisible_by


def init_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one part of the model (0: embeddings, 1 + i: layer i), independent of the layout."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, init_seed: int = 0, sequence_parallel: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.sequence_parallel = sequence_parallel
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        embedding_generator = init_generator(init_seed, 0)
        if self.pre_process or self.post_process:
            self.word_embeddings = VocabParallelEmbedding(vocab_size, cfg.hidden_size, cfg.init_method_std,
                                                          embedding_generator)
        if self.pre_process:
            self.position_embeddings = nn.Embedding.from_pretrained(
                master_normal((cfg.max_position_embeddings, cfg.hidden_size), cfg.init_method_std,
                              embedding_generator), freeze=False)
            self.embedding_dropout = (ShardedDropout if sequence_parallel else nn.Dropout)(cfg.hidden_dropout)
        elif self.post_process:
            # The last stage's copy of the tied embedding: its gradient is summed with the first stage's,
            # and it is left out of the gradient norm (counted once, on the first stage).
            self.word_embeddings.weight.tied_copy = True
            self.word_embeddings.weight.ds_pipe_replicated = True  # DeepSpeed's name for the same
        layers_per_stage = cfg.num_layers // parallel_state.pipeline_model_parallel_size()
        self.layer_offset = parallel_state.pipeline_model_parallel_rank() * layers_per_stage
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, init_generator(init_seed, 1 + self.layer_offset + i), sequence_parallel)
            for i in range(layers_per_stage))
        if self.post_process:
            self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
            if sequence_parallel:
                mark_sequence_parallel(self.final_layernorm.parameters())

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head is tied to the input embedding, as in GPT-2 and Megatron's default."""
        return self.word_embeddings.weight

    def activation_dtype(self) -> torch.dtype:
        """The dtype of the activations this stage receives and sends (the pipeline messages') under the
        current autocast state: ask inside the forward's autocast context. bf16 under --bf16."""
        return activation_dtype(next(self.parameters()))

    def forward(self, tokens: torch.Tensor | None, input_tensor: torch.Tensor | None = None,
                head: Callable[[torch.Tensor], T] | None = None) -> torch.Tensor | T:
        """First stage: tokens [b, s]; later stages: the previous stage's output. Returns the activation
        to send ([b, s / TP, h] under sequence parallelism), or on the last stage the final hidden states
        [b, s, h], or `head(hidden)` when given: the training step computes its loss (`loss`) there, inside
        the forward, where DeepSpeed ZeRO-3 has gathered the tied word embedding."""
        if self.pre_process:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.word_embeddings(tokens) + to_activation_dtype(self.position_embeddings(positions))
            if self.sequence_parallel:
                x = mappings.scatter_to_sequence_parallel_region(x)
            x = self.embedding_dropout(x)
        else:
            x = input_tensor
        for layer in self.layers:
            x = layer(x)
        if not self.post_process:
            return x
        x = self.final_layernorm(x)
        if self.sequence_parallel:
            # The vocab-parallel head returns the complete hidden gradient on every rank: split, not sum.
            x = mappings.gather_from_sequence_parallel_region(x, output_grad_is_partial=False)
        return x if head is None else head(x)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, select: Selector | None,
             impl: str = "torch", normalizer: torch.Tensor | float | None = None,
             accumulate_into_grad: bool = False) -> LMHeadOutput:
        """Per-token scores over every token, then the loss over the tokens `select` keeps (dense: every
        valid token, divided by `normalizer`, default their count here). `accumulate_into_grad`: the head
        adds the tied weight's gradient in place into its `.grad` (our data parallelism; never under
        DeepSpeed, whose ZeRO hooks the weight's autograd accumulation: see `model/lm_head.py`)."""
        weight = self.output_weight
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        if parallel_state.tensor_model_parallel_size() == 1:
            return selective_lm_head_loss(hidden, weight, labels, select, impl=impl, normalizer=normalizer,
                                          accumulate_into_grad=accumulate_into_grad)
        return vocab_parallel_lm_head_loss(hidden, weight, labels, select, self.word_embeddings.vocab_start,
                                           impl=impl, normalizer=normalizer, accumulate_into_grad=accumulate_into_grad)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits, only for generation of a few positions; training never builds them."""
        return mappings.gather_from_tensor_model_parallel_region(hidden @ self.output_weight.t())
