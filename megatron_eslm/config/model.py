"""Model shape flags: sizes, dropout and init of the GPT."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import positive
from megatron_eslm.errors import UserError

TITLE = "model"


@dataclass
class ModelConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # None: seq_length
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5


HELP = {
    "num_layers": "transformer blocks",
    "hidden_size": "model width",
    "num_attention_heads": "attention heads (must divide --hidden-size)",
    "ffn_hidden_size": "MLP width; unset means 4x hidden",
    "seq_length": "tokens per training sample",
    "max_position_embeddings": "learned position table size; unset means --seq-length",
    "make_vocab_size_divisible_by": "pad the tokenizer vocabulary to a multiple of this",
    "hidden_dropout": "dropout after attention/MLP and on embeddings",
    "attention_dropout": "dropout on attention probabilities",
    "init_method_std": "std of the normal weight init",
    "layernorm_epsilon": "LayerNorm epsilon",
}


def finalize_model(m: ModelConfig) -> ModelConfig:
    """Fill the model's derived sizes (MLP width, position table)."""
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    return m


def validate_model(m: ModelConfig) -> None:
    """A finalized model section (derived sizes filled)."""
    for value, flag in ((m.num_layers, "--num-layers"), (m.hidden_size, "--hidden-size"),
                        (m.num_attention_heads, "--num-attention-heads"), (m.seq_length, "--seq-length"),
                        (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by")):
        positive(value, flag)
    if m.hidden_size % m.num_attention_heads:
        raise UserError(f"--hidden-size {m.hidden_size} is not divisible by "
                        f"--num-attention-heads {m.num_attention_heads}")
    if m.seq_length > m.max_position_embeddings:
        raise UserError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                        f"{m.max_position_embeddings}")
    for value, flag in ((m.hidden_dropout, "--hidden-dropout"), (m.attention_dropout, "--attention-dropout")):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
