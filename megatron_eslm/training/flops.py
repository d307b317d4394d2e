"""Executed-FLOPs accounting: count the matmul work that actually ran, and what dense training would run.

Per token (h hidden, f ffn, s sequence, V vocabulary, L layers, n query heads, g key/value groups, d head
dimension, m = 3 MLP matrices with SwiGLU else 2), counting 2 FLOPs per multiply-add:
  transformer forward   L * (2 * (h(n + 2g)d + ndh + mhf) + 4snd)
                        (QKV, output projection, MLP, QK^T and AV over the whole causal square, as
                        Megatron counts it; GPT-2 shapes, nd = h and g = n: L * (2 * (4h^2 + 2hf) + 4sh))
  transformer backward  2x forward                       (dense: attention spreads every kept token's
                                                          gradient over the whole sequence)
  recompute             full: one more forward of each recomputed layer: every layer (uniform), the
                        first --recompute-num-layers of each pipeline stage (block); without hidden
                        dropout less 2hf per recomputed group (its last MLP down-projection, which torch
                        does not rerun: nothing the backward reads comes after it);
                        selective: L * 4snd (QK^T and AV again; softmax and dropout are not counted)
  LM head forward       2hV for every token              (scores are needed for all tokens; tied or
                                                          untied, the same GEMMs)
  LM head backward      dense (fused, no recompute):      4hV per token (ignored ones too), the baseline:
                                                          4hV per valid token
                        dense, unfused (Triton, TP > 1): 6hV per token (recompute + 2 GEMMs)
                        selective (recompute + 2 GEMMs): 6hV per KEPT token
Embedding lookups, norms and elementwise work are not counted (Megatron's convention).

The paper count (`paper`, ESLM's): with F = transformer forward + 2hV a token, F for every token and 2F
for every kept token (dense: every valid token), so (1 + 2k)/3 of dense at a kept fraction k. It leaves
out recompute, the head's recomputed logits and the policies' extra passes; samples a sampler skips
(--selection lfr --lfr-mode skip) never reach the model and count in neither. --eslm-granularity sequence
(`StepStats.flops`): the student's no-autograd scoring forward over the G candidates is a policy pass in
the executed count (F a token), the dense baseline is a dense step on all G, and the paper count charges F to
every candidate the student's forward saw and 2F to the kept ones' tokens.
Recompute and the extra passes of selection policies (a teacher's or reference model's forward,
distillation logits) count in the executed FLOPs only: the dense baseline is dense training without
recompute and without those models.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.training.recompute import layer_groups


@dataclass
class StepFlops:
    executed: float = 0.0
    dense: float = 0.0
    paper: float = 0.0

    def __iadd__(self, other: "StepFlops") -> "StepFlops":
        self.executed += other.executed
        self.dense += other.dense
        self.paper += other.paper
        return self


def _attention_core_flops_per_token(cfg: ModelConfig) -> float:
    """QK^T and AV of one layer over the whole causal square (Megatron's count)."""
    return 4.0 * cfg.seq_length * cfg.num_attention_heads * cfg.kv_channels


def _layer_forward_flops_per_token(cfg: ModelConfig) -> float:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    queries, keys_values = cfg.num_attention_heads * cfg.kv_channels, 2 * cfg.num_query_groups * cfg.kv_channels
    mlp_matrices = 3 if cfg.swiglu else 2
    projections = h * (queries + keys_values) + queries * h + mlp_matrices * h * f
    return 2.0 * projections + _attention_core_flops_per_token(cfg)


def transformer_forward_flops_per_token(cfg: ModelConfig) -> float:
    """A finalized config's (head dimension and key/value groups filled)."""
    return cfg.num_layers * _layer_forward_flops_per_token(cfg)


def recompute_flops_per_token(cfg: ModelConfig, pipeline_stages: int) -> float:
    """The forward work recompute runs again, over the whole model of `pipeline_stages` stages (model chunks
    under the interleaved schedule: recompute's groups are a chunk's)."""
    if cfg.recompute_granularity == "selective":
        return cfg.num_layers * _attention_core_flops_per_token(cfg)
    groups = [g for g in layer_groups(cfg, cfg.num_layers // pipeline_stages) if g.recomputed]
    flops = sum(len(g.layers) for g in groups) * _layer_forward_flops_per_token(cfg)
    if cfg.hidden_dropout == 0.0:
        # torch's checkpoint stops the recompute once every tensor the backward needs is back: a group's
        # last MLP down-projection saves nothing the backward reads, nor do the bias and residual additions
        # after it, unless the hidden dropout in between saves its mask.
        flops -= len(groups) * 2.0 * cfg.hidden_size * cfg.ffn_hidden_size
    return flops * pipeline_stages


def forward_flops(cfg: ModelConfig, vocab_size: int, num_tokens: int, head_rows: int) -> float:
    """A forward without backward (a teacher's or reference model's pass): the transformer over
    `num_tokens` tokens and the LM head over `head_rows` rows."""
    return transformer_forward_flops_per_token(cfg) * num_tokens + 2.0 * cfg.hidden_size * vocab_size * head_rows


def micro_batch_flops(cfg: ModelConfig, vocab_size: int, num_tokens: int, num_valid: int,
                      num_kept: int, selective: bool, fused_dense: bool = True) -> StepFlops:
    """FLOPs of one forward+backward. `selective` False is dense training, whose head backward runs over
    every row, ignored ones included (their gradient is zeroed, not skipped): fused into the scoring pass
    (`fused_dense`, either head on one tensor-parallel rank: 4hV a row) or as pass 2 recomputing the
    logits (the vocab-parallel head: 6hV a row). The dense baseline is the fused head over the
    valid tokens, without recompute (which `cfg` may ask for, on this run's pipeline stages); `paper` is
    ESLM's count (module docstring)."""
    body = 3.0 * transformer_forward_flops_per_token(cfg) * num_tokens
    chunks = parallel_state.pipeline_model_parallel_size() * parallel_state.virtual_pipeline_model_parallel_size()
    recomputed = recompute_flops_per_token(cfg, chunks) * num_tokens
    head_unit = 2.0 * cfg.hidden_size * vocab_size
    head_forward = head_unit * num_tokens
    dense_backward = 2.0 * head_unit * num_valid
    if selective:
        executed_backward = 3.0 * head_unit * num_kept
    else:
        executed_backward = (2.0 if fused_dense else 3.0) * head_unit * num_tokens
    forward_per_token = transformer_forward_flops_per_token(cfg) + head_unit
    paper = forward_per_token * (num_tokens + 2.0 * (num_kept if selective else num_valid))
    return StepFlops(executed=body + recomputed + head_forward + executed_backward,
                     dense=body + head_forward + dense_backward, paper=paper)
