"""AdamW and learning-rate schedule flags."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import one_of, positive
from megatron_eslm.errors import UserError

TITLE = "optimizer and learning rate"
LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant | WSD
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_schedule_start_iter: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_wsd_decay_iters: int | None = None  # WSD: length of the final decay; None: 10% of decay iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    optimizer_impl: str = "auto"  # auto | fused | foreach | loop


HELP = {
    "lr": "peak learning rate",
    "min_lr": "learning rate floor after decay",
    "lr_decay_style": "one of " + ", ".join(LR_DECAY_STYLES),
    "lr_warmup_iters": "linear warmup iterations",
    "lr_warmup_init": "learning rate the warmup starts from (e.g. the loaded run's --min-lr when re-warming)",
    "lr_schedule_start_iter": "iteration the warmup starts after (re-warming a loaded run at its iteration; "
                              "decay still ends at --lr-decay-iters): docs/continual.md",
    "lr_decay_iters": "iterations over which to decay; unset means --train-iters",
    "lr_wsd_decay_iters": "WSD only: length of the final decay phase",
    "weight_decay": "AdamW weight decay (not applied to biases and norms)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "clip_grad": "global gradient-norm clip; 0 disables",
    "optimizer_impl": "torch AdamW kernels: one of " + ", ".join(OPTIMIZER_IMPLS) + "; auto is fused on CUDA, "
                      "foreach (multi-tensor ops) elsewhere",
}


def validate_optimizer(o: OptimizerConfig) -> None:
    """A finalized optimizer section (--lr-decay-iters filled)."""
    positive(o.lr_decay_iters, "--lr-decay-iters")
    one_of(o.lr_decay_style, LR_DECAY_STYLES, "--lr-decay-style")
    one_of(o.optimizer_impl, OPTIMIZER_IMPLS, "--optimizer-impl")
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise UserError(f"--min-lr {o.min_lr} must be in [0, --lr {o.lr}]")
    if o.lr_warmup_init < 0 or o.lr_warmup_init > o.lr:
        raise UserError(f"--lr-warmup-init {o.lr_warmup_init} must be in [0, --lr {o.lr}]")
    if o.lr_schedule_start_iter < 0 or o.lr_schedule_start_iter >= o.lr_decay_iters:
        raise UserError(f"--lr-schedule-start-iter {o.lr_schedule_start_iter} must be in [0, --lr-decay-iters "
                        f"{o.lr_decay_iters})")
    span = o.lr_decay_iters - o.lr_schedule_start_iter  # the schedule's own length
    if o.lr_warmup_iters < 0 or o.lr_warmup_iters > span:
        raise UserError(f"--lr-warmup-iters {o.lr_warmup_iters} must be in [0, --lr-decay-iters {o.lr_decay_iters} "
                        f"- --lr-schedule-start-iter {o.lr_schedule_start_iter}]")
    if o.lr_wsd_decay_iters is not None and not 0 <= o.lr_wsd_decay_iters <= span - o.lr_warmup_iters:
        raise UserError(f"--lr-wsd-decay-iters {o.lr_wsd_decay_iters} must fit after warmup within "
                        f"--lr-decay-iters {o.lr_decay_iters}")
    if o.clip_grad < 0:
        raise UserError(f"--clip-grad must be >= 0, got {o.clip_grad}")
