"""Console, TensorBoard, metrics-file and timing flags."""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_eslm.config.checks import positive
from megatron_eslm.errors import UserError

TITLE = "logging"
TIMING_LOG_LEVELS = (0, 1, 2)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    timing_log_level: int = 0
    peak_tflops: float | None = None


HELP = {
    "log_interval": "log every N iterations",
    "tensorboard_dir": "write TensorBoard scalars here",
    "metrics_file": "append JSON lines of metrics here",
    "timing_log_level": "0: no phase timers (no added device syncs); 1: time_<phase>_ms per iteration in the "
                        "training records (data, forward_backward, threshold, grads_reduce, optimizer, eval, "
                        "checkpoint, logging: they add up to iteration_time_ms), each phase boundary synchronising the GPU; 2: also threshold_comm",
    "peak_tflops": "peak TFLOP/s of one GPU for the mfu field; unset: the built-in dense bf16 table "
                   "(A100, H100, H200), none on other devices",
}


def validate_logging(lg: LoggingConfig) -> None:
    positive(lg.log_interval, "--log-interval")
    if lg.timing_log_level not in TIMING_LOG_LEVELS:
        raise UserError(f"--timing-log-level must be 0, 1 or 2, got {lg.timing_log_level}")
    if lg.peak_tflops is not None and not 0 < lg.peak_tflops < math.inf:  # NaN fails too
        raise UserError(f"--peak-tflops must be a positive finite number, got {lg.peak_tflops}")
