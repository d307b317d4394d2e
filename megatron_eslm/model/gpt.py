"""GPT language model: embeddings, transformer blocks, final norm, and an LM head whose loss goes through
the selective head (only kept tokens get LM-head gradients). The head is tied to the input embedding (GPT-2,
Megatron's default) or, with --untie-embeddings-and-output-weights, a separate output layer (Llama).
Positions are a learned table added to the embeddings, or rotary embeddings inside attention (rope); both
use the tokens' global positions.

Parallel layouts hold a part of this model (`parallel_state` says which):
  tensor     the word embedding and output layer split by vocabulary rows, attention by key/value groups,
             the MLP by width;
  context    every rank holds all of its stage's weights and two chunks of each sequence
             (`context_parallel/`): positions are those chunks' global positions, attention gathers
             the whole sequence's keys and values;
  pipeline   stage p holds layers [p * L/pp, (p+1) * L/pp); the first stage also the embeddings, the last
             the final norm and the LM head: the output layer, or its own copy of the tied word embedding
             (first and last stage sum their gradients of it, so the copies stay equal). Interleaved
             (--num-layers-per-virtual-pipeline-stage N): stage p holds vp = L / (pp N) model chunks, chunk
             c the N layers of virtual stage c * pp + p (Megatron's round-robin); the embeddings sit on
             rank 0's chunk 0, the head on the last rank's last chunk. One module holds a rank's chunks,
             its `layers` in chunk order, and `forward` runs the chunk the schedule entered
             (`parallel_state.model_chunk`); `layer_numbers` are their global indices.
Every weight is drawn from a generator seeded by (seed, which part it belongs to: 0 the embeddings, 1 + i
layer i, 1 + L the output layer), in blocks of rows of which each rank keeps its shard
(`tensor_parallel/initialization.py`), so every layout holds exactly the weights of one process with the
same seed. The trainer builds the model on its device (`training/trainer.py: build_model`).
Activation recompute (--recompute-granularity) is applied here, from the config, so that every model
built gets it (`training/recompute.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig, finalize_model
from megatron_eslm.context_parallel.sharding import positions as sequence_positions
from megatron_eslm.model.keyed_dropout import build_hidden_dropout
from megatron_eslm.model.lm_head import LMHeadOutput, Selector, selective_lm_head_loss
from megatron_eslm.model.norms import build_norm
from megatron_eslm.model.rotary import rotary_tables
from megatron_eslm.model.transformer import TransformerBlock
from megatron_eslm.tensor_parallel import mappings
from megatron_eslm.tensor_parallel.layers import (VocabParallelEmbedding, activation_dtype, mark_sequence_parallel,
                                                  master_normal, to_activation_dtype)
from megatron_eslm.tensor_parallel.lm_head import vocab_parallel_lm_head_loss
from megatron_eslm.training import recompute

T = TypeVar("T")


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron pads the vocabulary so the embedding's rows split evenly (and GEMMs stay aligned); with
    tensor parallelism pass make_vocab_size_divisible_by * TP."""
    return -(-vocab_size // divisible_by) * divisible_by


def init_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one part of the model (0: embeddings, 1 + i: layer i, 1 + num_layers: the untied
    output layer), independent of the layout."""
    return torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, init_seed: int = 0, sequence_parallel: bool = False):
        super().__init__()
        self.cfg = cfg = finalize_model(dataclasses.replace(cfg))  # derived sizes, also for configs built by hand
        self.vocab_size = vocab_size
        self.sequence_parallel = sequence_parallel
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.tied = not cfg.untie_embeddings_and_output_weights
        embedding_generator = init_generator(init_seed, 0)
        if self.pre_process or (self.post_process and self.tied):
            self.word_embeddings = VocabParallelEmbedding(vocab_size, cfg.hidden_size, cfg.init_method_std,
                                                          embedding_generator)
        if self.pre_process:
            self.position_embeddings = None  # rope: rotary positions inside attention, no table
            if cfg.position_embedding_type == "learned_absolute":
                self.position_embeddings = nn.Embedding.from_pretrained(
                    master_normal((cfg.max_position_embeddings, cfg.hidden_size), cfg.init_method_std,
                                  embedding_generator), freeze=False)
            self.embedding_dropout = build_hidden_dropout(cfg.hidden_dropout, cfg.keyed_dropout, sequence_parallel)
        elif self.post_process and self.tied:
            # The last stage's copy of the tied embedding: its gradient is summed with the first stage's,
            # and it is left out of the gradient norm (counted once, on the first stage).
            self.word_embeddings.weight.tied_copy = True
            self.word_embeddings.weight.ds_pipe_replicated = True  # DeepSpeed's name for the same
        pp, chunks = parallel_state.pipeline_model_parallel_size(), parallel_state.virtual_pipeline_model_parallel_size()
        self.chunk_size = cfg.num_layers // (pp * chunks)  # layers of a model chunk (of the stage without VP)
        stage = parallel_state.pipeline_model_parallel_rank()
        self.layer_numbers = tuple((chunk * pp + stage) * self.chunk_size + i
                                   for chunk in range(chunks) for i in range(self.chunk_size))
        self.layers = nn.ModuleList(TransformerBlock(cfg, init_generator(init_seed, 1 + number), sequence_parallel)
                                    for number in self.layer_numbers)
        self.layer_groups = recompute.configure(self.layers, cfg, chunks)
        if self.post_process:
            self.final_layernorm = build_norm(cfg)
            if sequence_parallel:
                mark_sequence_parallel(self.final_layernorm.parameters())
            if not self.tied:  # Megatron's output_layer: [V, h] by vocabulary rows, like the embedding
                self.output_layer = VocabParallelEmbedding(vocab_size, cfg.hidden_size, cfg.init_method_std,
                                                           init_generator(init_seed, 1 + cfg.num_layers))

    def parameter_chunks(self) -> dict[nn.Parameter, int]:
        """The model chunk each parameter belongs to: a layer's, its chunk's; the embeddings, chunk 0's; the
        final norm and the head, the last chunk's (all 0 without interleaving)."""
        chunks = {param: parallel_state.virtual_pipeline_model_parallel_size() - 1 for param in self.parameters()}
        for index, layer in enumerate(self.layers):
            chunks.update((param, index // self.chunk_size) for param in layer.parameters())
        if self.pre_process:
            chunks[self.word_embeddings.weight] = 0
            if self.position_embeddings is not None:
                chunks[self.position_embeddings.weight] = 0
        return chunks

    @property
    def _head(self) -> VocabParallelEmbedding:
        return self.word_embeddings if self.tied else self.output_layer

    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's vocabulary rows of the LM head: the input embedding's, or the untied output layer's."""
        return self._head.weight

    def activation_dtype(self) -> torch.dtype:
        """The dtype of the activations this stage receives and sends (the pipeline messages') under the
        current autocast state: ask inside the forward's autocast context. bf16 under --bf16."""
        return activation_dtype(next(self.parameters()))

    def forward(self, tokens: torch.Tensor | None, input_tensor: torch.Tensor | None = None,
                head: Callable[[torch.Tensor], T] | None = None) -> torch.Tensor | T:
        """First stage: tokens [b, s]; later stages: the previous stage's output. Returns the activation
        to send ([b, s / TP, h] under sequence parallelism), or on the last stage the final hidden states
        [b, s, h], or `head(hidden)` when given: the training step computes its loss (`loss`) there, inside
        the forward, where DeepSpeed ZeRO-3 has gathered the head's weight. Interleaved, each of these is
        the chunk's (`parallel_state.model_chunk`): the embedding on the first virtual stage only, the head
        on the last."""
        chunk = parallel_state.virtual_pipeline_model_parallel_rank() or 0
        last = self.post_process and parallel_state.is_pipeline_last_stage()
        if self.pre_process and parallel_state.is_pipeline_first_stage():
            x = self.word_embeddings(tokens)
            if self.position_embeddings is not None:
                x = x + to_activation_dtype(self.position_embeddings(sequence_positions(tokens.shape[1], x.device)))
            if self.sequence_parallel:
                x = mappings.scatter_to_sequence_parallel_region(x)
            x = self.embedding_dropout(x)
        else:
            x = input_tensor
        rotary = None
        if self.cfg.position_embedding_type == "rope":  # global positions: attention's tokens, not this SP shard
            seq_length = x.shape[1] * (parallel_state.tensor_model_parallel_size() if self.sequence_parallel else 1)
            rotary = rotary_tables(sequence_positions(seq_length, x.device), self.cfg.kv_channels,
                                   self.cfg.rotary_base)
        layers = self.layers  # a chunk's slice only when interleaved (a slice builds a ModuleList per call)
        if parallel_state.virtual_pipeline_model_parallel_size() > 1:
            layers = layers[chunk * self.chunk_size:(chunk + 1) * self.chunk_size]
        x = recompute.forward_layers(layers, self.layer_groups, x, rotary)
        if not last:
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
        adds the head weight's gradient in place into its `.grad` (our data parallelism; never under
        DeepSpeed, whose ZeRO hooks the weight's autograd accumulation: see `model/lm_head.py`)."""
        weight = self.output_weight
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        if parallel_state.tensor_model_parallel_size() == 1:
            return selective_lm_head_loss(hidden, weight, labels, select, impl=impl, normalizer=normalizer,
                                          accumulate_into_grad=accumulate_into_grad)
        return vocab_parallel_lm_head_loss(hidden, weight, labels, select, self._head.vocab_start,
                                           impl=impl, normalizer=normalizer, accumulate_into_grad=accumulate_into_grad)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits, only for generation of a few positions; training never builds them."""
        return mappings.gather_from_tensor_model_parallel_region(hidden @ self.output_weight.t())
