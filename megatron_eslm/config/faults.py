"""Fault-tolerance flags: when a run stops by itself and saves (Megatron-LM's exit flags)."""
from __future__ import annotations

import signal
from dataclasses import dataclass

from megatron_eslm.config.checks import positive
from megatron_eslm.errors import UserError

TITLE = "fault tolerance"


@dataclass
class FaultsConfig:
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    exit_signal: str = "SIGTERM"


HELP = {
    "exit_interval": "stop at the first iteration divisible by N: save a checkpoint (with --save) and exit 0",
    "exit_duration_in_mins": "stop after the first iteration that ends this many minutes after the start "
                             "(agreed by every rank), saving a checkpoint (with --save), exit 0",
    "exit_signal_handler": "on --exit-signal every rank finishes its iteration, saves a checkpoint (with "
                           "--save) and exits 0 (SLURM: ask for it before the time limit, `--signal=TERM@120`)",
    "exit_signal": "the signal --exit-signal-handler catches, by name",
}


def validate_faults(f: FaultsConfig) -> None:
    if f.exit_interval is not None:
        positive(f.exit_interval, "--exit-interval")
    if f.exit_duration_in_mins is not None:
        positive(f.exit_duration_in_mins, "--exit-duration-in-mins")
    if f.exit_signal not in signal.Signals.__members__:
        raise UserError(f"--exit-signal {f.exit_signal}: not a signal name (e.g. SIGTERM, SIGUSR1)")
