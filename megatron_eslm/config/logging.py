"""Console, TensorBoard and metrics-file flags."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import positive

TITLE = "logging"


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    metrics_file: str | None = None


HELP = {
    "log_interval": "log every N iterations",
    "tensorboard_dir": "write TensorBoard scalars here",
    "metrics_file": "append JSON lines of metrics here",
}


def validate_logging(lg: LoggingConfig) -> None:
    positive(lg.log_interval, "--log-interval")
