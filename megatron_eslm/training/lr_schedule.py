"""Learning-rate schedules (Megatron's OptimizerParamScheduler), as a pure function of the steps taken.

As in Megatron, optimizer update k (1-based) runs at the rate of `learning_rate(cfg, k - 1)`: the scheduler
is stepped after the update, so the first update runs at the initial rate (--lr-warmup-init, 0 by default,
when warming up) and the last one just above --min-lr (tests/test_config.py checks the first rates
against Megatron's get_lr written out).

Linear warmup from --lr-warmup-init (default 0) to --lr over --lr-warmup-iters, then up to iteration
--lr-decay-iters: cosine or linear decay to --min-lr, constant, or warmup-stable-decay (WSD: hold --lr,
then decay linearly to --min-lr over the last --lr-wsd-decay-iters). After --lr-decay-iters the rate is
--min-lr. The warmup starts after iteration --lr-schedule-start-iter (default 0): a loaded run re-warms at
its own iteration and decays over its new budget (docs/continual.md); with the defaults the rates are the
ones this module always gave.
"""
from __future__ import annotations

import math

from megatron_eslm.config import OptimizerConfig
from megatron_eslm.errors import UserError


def learning_rate(cfg: OptimizerConfig, step: int) -> float:
    """Megatron's rate after `step` optimizer updates: the rate update `step` + 1 runs at."""
    max_lr, min_lr, warmup, decay = cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, cfg.lr_decay_iters
    origin, init = cfg.lr_schedule_start_iter, cfg.lr_warmup_init
    if warmup > 0 and step - origin <= warmup:
        return init + (max_lr - init) * (step - origin) / warmup
    if cfg.lr_decay_style == "constant":
        return max_lr
    if step > decay:
        return min_lr
    if cfg.lr_decay_style == "WSD":
        wsd = cfg.lr_wsd_decay_iters
        if wsd is None:
            wsd = max(1, (decay - origin - warmup) // 10)
        start = decay - wsd
        if step <= start:
            return max_lr
        return min_lr + (max_lr - min_lr) * (decay - step) / max(wsd, 1)
    ratio = (step - origin - warmup) / max(decay - origin - warmup, 1)
    if cfg.lr_decay_style == "linear":
        return min_lr + (max_lr - min_lr) * (1.0 - ratio)
    return min_lr + (max_lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


SCHEDULE_FLAGS = {"lr": "--lr", "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style",
                  "lr_warmup_iters": "--lr-warmup-iters", "lr_decay_iters": "--lr-decay-iters",
                  "lr_wsd_decay_iters": "--lr-wsd-decay-iters", "lr_warmup_init": "--lr-warmup-init",
                  "lr_schedule_start_iter": "--lr-schedule-start-iter"}


def schedule_flags(cfg: OptimizerConfig) -> dict:
    """What a checkpoint records of the schedule (Megatron's OptimizerParamScheduler state)."""
    return {key: getattr(cfg, key) for key in SCHEDULE_FLAGS}


def check_schedule(root: str, saved: dict, cfg: OptimizerConfig) -> None:
    """Megatron's rule: a resumed run keeps the checkpoint's schedule; a different one is refused unless
    --override-opt_param-scheduler (checkpoints from before the schedule was recorded pass)."""
    for key, flag in SCHEDULE_FLAGS.items():
        if key in saved and saved[key] != getattr(cfg, key):
            raise UserError(f"--load {root}: the checkpoint's schedule has {flag} {saved[key]}, this run "
                            f"{getattr(cfg, key)}; pass --override-opt_param-scheduler to use this run's schedule")
