"""Executed-FLOPs accounting: count the matmul work that actually ran, and what dense training would run.

Per token (h hidden, f ffn, s sequence, V vocabulary, L layers), counting 2 FLOPs per multiply-add:
  transformer forward   L * (2 * (4h^2 + 2hf) + 4sh)    (QKV + output projection, MLP, QK^T and AV)
  transformer backward  2x forward                       (dense: attention spreads every kept token's
                                                          gradient over the whole sequence)
  LM head forward       2hV for every token              (scores are needed for all tokens)
  LM head backward      dense (fused, no recompute):      4hV per valid token
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
    h, f, s = cfg.hidden_size, cfg.ffn_hidden_size, cfg.seq_length
    return cfg.num_layers * (2.0 * (4 * h * h + 2 * h * f) + 4.0 * s * h)


def forward_flops(cfg: ModelConfig, vocab_size: int, num_tokens: int, head_rows: int) -> float:
    """A forward without backward (a teacher's or reference model's pass): the transformer over
    `num_tokens` tokens and the LM head over `head_rows` rows."""
    return transformer_forward_flops_per_token(cfg) * num_tokens + 2.0 * cfg.hidden_size * vocab_size * head_rows


def micro_batch_flops(cfg: ModelConfig, vocab_size: int, num_tokens: int, num_valid: int,
                      num_kept: int, selective: bool) -> StepFlops:
    """FLOPs of one forward+backward; `selective` is False for the fused dense head."""
    body = 3.0 * transformer_forward_flops_per_token(cfg) * num_tokens
    head_unit = 2.0 * cfg.hidden_size * vocab_size
    head_forward = head_unit * num_tokens
    dense_backward = 2.0 * head_unit * num_valid
    executed_backward = 3.0 * head_unit * num_kept if selective else dense_backward
    return StepFlops(executed=body + head_forward + executed_backward,
                     dense=body + head_forward + dense_backward)
