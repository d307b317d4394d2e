"""Executed-FLOPs accounting: count the matmul work that actually ran, and what dense training would run.

Per token (h hidden, f ffn, s sequence, V vocabulary, L layers, n query heads, g key/value groups, d head
dimension, m = 3 MLP matrices with SwiGLU else 2), counting 2 FLOPs per multiply-add:
  transformer forward   L * (2 * (h(n + 2g)d + ndh + mhf) + 4snd)
                        (QKV, output projection, MLP, QK^T and AV over the whole causal square, as
                        Megatron counts it; GPT-2 shapes, nd = h and g = n: L * (2 * (4h^2 + 2hf) + 4sh))
  transformer backward  2x forward                       (dense: attention spreads every kept token's
                                                          gradient over the whole sequence)
  LM head forward       2hV for every token              (scores are needed for all tokens; tied or
                                                          untied, the same GEMMs)
  LM head backward      dense (fused, no recompute):      4hV per token (ignored ones too), the baseline:
                                                          4hV per valid token
                        dense, unfused (Triton, TP > 1): 6hV per token (recompute + 2 GEMMs)
                        selective (recompute + 2 GEMMs): 6hV per KEPT token
Embedding lookups, norms and elementwise work are not counted (Megatron's convention).
Selection policies that run extra passes (a teacher's or reference model's forward, distillation logits)
add them to the executed FLOPs only: the dense baseline is dense training without those models.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config import ModelConfig


@dataclass
class StepFlops:
    executed: float = 0.0
    dense: float = 0.0

    def __iadd__(self, other: "StepFlops") -> "StepFlops":
        self.executed += other.executed
        self.dense += other.dense
        return self


def transformer_forward_flops_per_token(cfg: ModelConfig) -> float:
    """A finalized config's (head dimension and key/value groups filled)."""
    h, f, s = cfg.hidden_size, cfg.ffn_hidden_size, cfg.seq_length
    queries, keys_values = cfg.num_attention_heads * cfg.kv_channels, 2 * cfg.num_query_groups * cfg.kv_channels
    mlp_matrices = 3 if cfg.swiglu else 2
    projections = h * (queries + keys_values) + queries * h + mlp_matrices * h * f
    return cfg.num_layers * (2.0 * projections + 4.0 * s * queries)


def forward_flops(cfg: ModelConfig, vocab_size: int, num_tokens: int, head_rows: int) -> float:
    """A forward without backward (a teacher's or reference model's pass): the transformer over
    `num_tokens` tokens and the LM head over `head_rows` rows."""
    return transformer_forward_flops_per_token(cfg) * num_tokens + 2.0 * cfg.hidden_size * vocab_size * head_rows


def micro_batch_flops(cfg: ModelConfig, vocab_size: int, num_tokens: int, num_valid: int,
                      num_kept: int, selective: bool, fused_dense: bool = True) -> StepFlops:
    """FLOPs of one forward+backward. `selective` False is dense training, whose head backward runs over
    every row, ignored ones included (their gradient is zeroed, not skipped): fused into the scoring pass
    (`fused_dense`, the PyTorch head on one tensor-parallel rank: 4hV a row) or as pass 2 recomputing the
    logits (the Triton and vocab-parallel heads: 6hV a row). The dense baseline is the fused head over the
    valid tokens."""
    body = 3.0 * transformer_forward_flops_per_token(cfg) * num_tokens
    head_unit = 2.0 * cfg.hidden_size * vocab_size
    head_forward = head_unit * num_tokens
    dense_backward = 2.0 * head_unit * num_valid
    if selective:
        executed_backward = 3.0 * head_unit * num_kept
    else:
        executed_backward = (2.0 if fused_dense else 3.0) * head_unit * num_tokens
    return StepFlops(executed=body + head_forward + executed_backward,
                     dense=body + head_forward + dense_backward)
