"""Checkpoint save/load flags."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.errors import UserError

TITLE = "checkpointing"
# Megatron's spelling, underscore included
FLAG_NAMES = {"override_opt_param_scheduler": ("--override-opt_param-scheduler", "--override-opt-param-scheduler")}


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    override_opt_param_scheduler: bool = False
    async_save: bool = False
    ckpt_fallback: bool = False
    overwrite_save: bool = False


HELP = {
    "save": "checkpoint directory to write",
    "load": "checkpoint directory to resume from (--load and --save the same directory: resume after a "
            "stop, or start there when it holds no checkpoint yet)",
    "save_interval": "save every N iterations (and at the end when --save is set)",
    "finetune": "--load the model weights only: iteration, data position, optimizer, RNG and selection state "
                "start afresh, and the learning-rate schedule runs from step 1 (continual pretraining, "
                "re-warming: docs/continual.md)",
    "no_load_optim": "--load everything but the optimizer: fresh AdamW moments",
    "no_load_rng": "--load everything but the RNG states (seeded from --seed; any data-parallel size)",
    "override_opt_param_scheduler": "take the learning-rate schedule from this run's flags where the "
                                    "checkpoint's differ (otherwise a difference is an error), e.g. to branch "
                                    "a WSD decay off a stable-phase checkpoint",
    "async_save": "copy the state to CPU memory at the save point and write it in a background thread while "
                  "training goes on; the checkpoint is published once every rank's files are on disk",
    "ckpt_fallback": "when the --load checkpoint is damaged or partial (its files do not match their "
                     "checksums), load the newest older one that does",
    "overwrite_save": "start this run in a --save that holds checkpoints it does not resume (--load is "
                      "another directory, or none): their trackers and iter_* folders are removed before the "
                      "first step; without it such a --save is refused",
}


def validate_checkpoint(ck: CheckpointConfig) -> None:
    if ck.save_interval is not None and ck.save_interval <= 0:
        raise UserError(f"--save-interval must be positive, got {ck.save_interval}")
    if ck.save_interval is not None and ck.save is None:
        raise UserError("--save-interval needs --save")
    if ck.async_save and ck.save is None:
        raise UserError("--async-save needs --save")
    if ck.overwrite_save and ck.save is None:
        raise UserError("--overwrite-save needs --save")
    for used, flag in ((ck.ckpt_fallback, "--ckpt-fallback"), (ck.finetune, "--finetune"), (ck.no_load_optim, "--no-load-optim"),
                       (ck.no_load_rng, "--no-load-rng"),
                       (ck.override_opt_param_scheduler, "--override-opt_param-scheduler")):
        if used and ck.load is None:
            raise UserError(f"{flag} needs --load")
