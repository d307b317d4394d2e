"""A whole model's checkpoint in one process: the canonical form every checkpoint tool works on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

from megatron_eslm.config import Config
from megatron_eslm.config.model import model_config_from_dict
from megatron_eslm.config.tree import SECTIONS

VOCAB_ROWS = ("word_embeddings.weight", "output_layer.weight")  # the parameters with one row per token
MOMENTS = ("exp_avg", "exp_avg_sq")  # the AdamW state kept per parameter


@dataclass
class FullCheckpoint:
    """`model` holds the state_dict names of a GPTModel built at TP=1, PP=1 (global layer indices, one
    `word_embeddings.weight`, no tied copy), fp32, with the vocabulary rows of the layout it came from:
    the tokenizer's `vocab_size` rows plus Megatron's padding, which the LM head's softmax includes, so a
    reshape keeps them where the padded size allows (see `writer.py`). `moments` are AdamW's exp_avg and
    exp_avg_sq under the same names and shapes, None when not read or not saved."""
    config: Config
    iteration: int
    vocab_size: int
    model: dict[str, Tensor]
    moments: dict[str, dict[str, Tensor]] | None = None
    optimizer_step: int | None = None
    consumed_samples: int = 0
    scheduler: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)


def config_from_dict(values: dict) -> Config:
    """The Config tree a checkpoint stored with `Config.to_dict()`."""
    sections = {}
    for section in SECTIONS:
        stored = values.get(section.name, {})
        if section.name == "model":
            sections["model"] = model_config_from_dict(stored)
        else:
            known = {f.name for f in dataclasses.fields(section.fields)}
            sections[section.name] = section.fields(**{k: v for k, v in stored.items() if k in known})
    return Config(**sections)
