"""Fault-tolerance flags: when a run stops by itself and saves (Megatron-LM's exit flags), what happens to
a non-finite step or a loss spike (skip, in-memory snapshots, rollback), and the error injection that
rehearses it."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

from megatron_eslm.config.checks import positive
from megatron_eslm.errors import UserError

TITLE = "fault tolerance"


@dataclass
class FaultsConfig:
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    exit_signal: str = "SIGTERM"
    snapshot_interval: int | None = None
    snapshot_replicas: int = 0
    max_consecutive_skips: int = 3
    rollback_on_spike: float | None = None
    inject_nan_at_iterations: list[int] = field(default_factory=list)


HELP = {
    "exit_interval": "stop at the first iteration divisible by N: save a checkpoint (with --save) and exit 0",
    "exit_duration_in_mins": "stop after the first iteration that ends this many minutes after the start "
                             "(agreed by every rank), saving a checkpoint (with --save), exit 0",
    "exit_signal_handler": "on --exit-signal every rank finishes its iteration, saves a checkpoint (with "
                           "--save) and exits 0 (SLURM: ask for it before the time limit, `--signal=TERM@120`)",
    "exit_signal": "the signal --exit-signal-handler catches, by name",
    "snapshot_interval": "keep a copy of the model, optimizer and selection state in CPU memory every N "
                         "iterations (a multiple of --log-interval), the target of rollbacks "
                         "(docs/fault_tolerance.md)",
    "snapshot_replicas": "1: mirror each vetted snapshot to the rank one node ahead (LOCAL_WORLD_SIZE ranks "
                         "per node), so that when ranks die the survivors write it under --save as a "
                         "checkpoint to resume from (docs/fault_tolerance.md)",
    "max_consecutive_skips": "a step whose gradient norm is NaN/inf is skipped on every rank; when the last N "
                             "steps at a log interval were all skipped, roll back to the last snapshot (or the "
                             "last checkpoint under --save) and go on past their batches (0: never roll back)",
    "rollback_on_spike": "roll back to the last snapshot when a log interval's training loss exceeds FACTOR x "
                         "its running average, going on past the batches since the snapshot",
    "inject_nan_at_iterations": "testing aid (Megatron-style error injection): make these iterations' "
                                "gradients NaN, to rehearse the skip and the rollback",
}


def validate_faults(f: FaultsConfig, log_interval: int) -> None:
    if f.exit_interval is not None:
        positive(f.exit_interval, "--exit-interval")
    if f.exit_duration_in_mins is not None:
        positive(f.exit_duration_in_mins, "--exit-duration-in-mins")
    if f.exit_signal not in signal.Signals.__members__:
        raise UserError(f"--exit-signal {f.exit_signal}: not a signal name (e.g. SIGTERM, SIGUSR1)")
    if f.snapshot_interval is not None:
        positive(f.snapshot_interval, "--snapshot-interval")
        if f.snapshot_interval % log_interval:
            raise UserError(f"--snapshot-interval {f.snapshot_interval} is not a multiple of --log-interval "
                            f"{log_interval} (a snapshot is taken where the loss is checked)")
    if f.snapshot_replicas not in (0, 1):
        raise UserError(f"--snapshot-replicas must be 0 or 1, got {f.snapshot_replicas}")
    if f.snapshot_replicas and f.snapshot_interval is None:
        raise UserError("--snapshot-replicas needs --snapshot-interval (the snapshots it mirrors)")
    if f.max_consecutive_skips < 0:
        raise UserError(f"--max-consecutive-skips must be >= 0, got {f.max_consecutive_skips}")
    if f.rollback_on_spike is not None and f.rollback_on_spike <= 1.0:
        raise UserError(f"--rollback-on-spike must be above 1 (a factor over the running loss), got "
                        f"{f.rollback_on_spike}")
    if f.rollback_on_spike is not None and f.snapshot_interval is None:
        raise UserError("--rollback-on-spike needs --snapshot-interval (the state it rolls back to)")
    bad = [i for i in f.inject_nan_at_iterations if i <= 0]
    if bad:
        raise UserError(f"--inject-nan-at-iterations: iterations start at 1, got {bad[0]}")


def refuse_under_deepspeed(f: FaultsConfig, async_save: bool) -> None:
    """DeepSpeed's engine steps whatever gradients it has (its bf16/fp32 optimizers do not skip), and its
    ZeRO partitions and files are not ours to copy: the skip-and-rollback flags and --async-save are ours
    only."""
    for used, flag in ((async_save, "--async-save"), (f.snapshot_interval is not None, "--snapshot-interval"),
                       (f.rollback_on_spike is not None, "--rollback-on-spike"),
                       (bool(f.inject_nan_at_iterations), "--inject-nan-at-iterations")):
        if used:
            raise UserError(f"{flag} is not available under --deepspeed (DeepSpeed steps its own optimizer)")
