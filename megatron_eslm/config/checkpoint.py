"""Checkpoint save/load flags."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.errors import UserError

TITLE = "checkpointing"


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None


HELP = {
    "save": "checkpoint directory to write",
    "load": "checkpoint directory to resume from",
    "save_interval": "save every N iterations (and at the end when --save is set)",
}


def validate_checkpoint(ck: CheckpointConfig) -> None:
    if ck.save_interval is not None and ck.save_interval <= 0:
        raise UserError(f"--save-interval must be positive, got {ck.save_interval}")
    if ck.save_interval is not None and ck.save is None:
        raise UserError("--save-interval needs --save")
