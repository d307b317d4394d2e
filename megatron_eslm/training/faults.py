"""When a run stops by itself (Megatron-LM's exit flags): at an iteration divisible by --exit-interval,
after --exit-duration-in-mins, or on --exit-signal under --exit-signal-handler. The trainer then saves a
checkpoint of the iteration it finished and returns, so the process exits 0 and `--load` resumes exactly.

The duration and the signal are local facts (clocks drift, a scheduler may signal ranks at different
moments), so every rank stops only when any rank wants to: one all-reduce (max) of two flags on the host's
gloo group (`launch.host_group`), no device work and no GPU sync, at each log interval rather than each
iteration (over a thousand ranks a host all-reduce is tens of milliseconds and a barrier). So a signal or
the duration stops the run at the end of the log interval it falls in. Without these two flags nothing is
communicated.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from megatron_eslm.config.faults import FaultsConfig
from megatron_eslm.distributed import launch


class ExitConditions:
    def __init__(self, cfg: FaultsConfig):
        self.cfg = cfg
        self.start = time.monotonic()
        self.signalled = False
        self.previous_handler = None
        if cfg.exit_signal_handler:
            self.signal = signal.Signals[cfg.exit_signal]
            self.previous_handler = signal.signal(self.signal, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the end of the iteration, on every rank

    def reason(self, iteration: int, agree: bool) -> str | None:
        """Why the run stops after `iteration`, or None. With `agree` (every rank alike: at a log interval)
        the duration and the signal count too, and the call is collective when either is watched."""
        cfg = self.cfg
        if cfg.exit_interval and iteration % cfg.exit_interval == 0:
            return f"--exit-interval {cfg.exit_interval}"
        if not agree or (cfg.exit_duration_in_mins is None and not cfg.exit_signal_handler):
            return None
        late = cfg.exit_duration_in_mins is not None and time.monotonic() - self.start > 60 * cfg.exit_duration_in_mins
        wanted = torch.tensor([float(late), float(self.signalled)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(wanted, op=dist.ReduceOp.MAX, group=launch.host_group())
        if wanted[1]:
            return f"{cfg.exit_signal} (--exit-signal-handler)"
        if wanted[0]:
            return f"--exit-duration-in-mins {cfg.exit_duration_in_mins}"
        return None

    def close(self) -> None:
        """Give the signal back to the handler it had before this run."""
        if self.previous_handler is not None:
            signal.signal(self.signal, self.previous_handler)
            self.previous_handler = None
