"""A frozen GPT from one of our checkpoints (the teacher of eslm-kd, the reference of rho1), and the
forward pass the policies run with it.

The model is built from the config stored in the checkpoint, so it may have any size; it must share the
student's (padded) vocabulary. The checkpoint is read directly rather than through
`checkpointing.load_checkpoint`, which would also overwrite the student's RNG state with the teacher's.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_eslm.config.model import finalize_model, model_config_from_dict
from megatron_eslm.errors import UserError
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import TokenScores
from megatron_eslm.training.checkpointing import checkpoint_file, latest_iteration
from megatron_eslm.training.flops import forward_flops


def load_frozen_model(root: str, flag: str, vocab_size: int, seq_length: int,
                      device: torch.device) -> GPTModel:
    """The latest checkpoint under `root` as an eval-mode GPT without gradients; errors name `flag`."""
    if not os.path.isdir(root):
        raise UserError(f"{flag} {root}: no such directory")
    iteration = latest_iteration(root)
    if iteration is None:
        raise UserError(f"{flag} {root}: no checkpoint (latest_checkpointed_iteration.txt missing)")
    path = checkpoint_file(root, iteration)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a missing, torn or foreign file: name it instead of a pickle traceback
        raise UserError(f"{flag} {root}: cannot read {path} ({type(err).__name__})") from None
    cfg = finalize_model(model_config_from_dict(state["config"]["model"]))
    rows = state["model"]["word_embeddings.weight"].shape[0]
    if rows != vocab_size:
        raise UserError(f"{flag} {root}: vocabulary of {rows} rows, this model has {vocab_size} "
                        "(same tokenizer and --make-vocab-size-divisible-by needed)")
    if cfg.max_position_embeddings < seq_length:
        raise UserError(f"{flag} {root}: model takes at most {cfg.max_position_embeddings} positions, "
                        f"--seq-length is {seq_length}")
    model = GPTModel(cfg, vocab_size)
    model.load_state_dict(state["model"])
    model.to(device).eval().requires_grad_(False)
    return model


@dataclass
class FrozenPass:
    """A frozen model's forward over one micro-batch."""

    hidden: Tensor  # [N, h] final hidden states, flattened like TokenScores
    scores: TokenScores | None  # per-token loss and entropy; None when the LM head was not run
    flops: float  # executed: the transformer over all tokens, plus the LM head over all rows if scored


@torch.no_grad()
def frozen_pass(model: GPTModel, tokens: Tensor, labels: Tensor, score: bool = True) -> FrozenPass:
    hidden = model(tokens)
    scores = model.loss(hidden, labels, None).scores if score else None
    cfg = dataclasses.replace(model.cfg, seq_length=tokens.shape[1])  # attention cost at this length
    flops = forward_flops(cfg, model.vocab_size, tokens.numel(), tokens.numel() if score else 0)
    return FrozenPass(hidden.reshape(-1, hidden.shape[-1]), scores, flops)
