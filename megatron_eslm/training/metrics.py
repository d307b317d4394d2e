"""Metrics sinks: JSON lines (--metrics-file) and TensorBoard scalars (--tensorboard-dir)."""
from __future__ import annotations

import json
import os


class MetricsWriter:
    """Appends one JSON object per record and mirrors numeric fields to TensorBoard as
    `<split>/<field>` at step `iteration`. Appending lets a resumed run continue the same file."""

    def __init__(self, metrics_file: str | None, tensorboard_dir: str | None):
        self._file = None
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            _drop_torn_line(metrics_file)
            self._file = open(metrics_file, "a")
        self._tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("iteration", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, record["iteration"])
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _drop_torn_line(path: str) -> None:
    """Cut a last line without its newline (a run killed while writing it), so the resumed run's first record
    does not glue onto it."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
