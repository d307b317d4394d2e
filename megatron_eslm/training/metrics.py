"""Metrics sinks: JSON lines (--metrics-file) and TensorBoard scalars (--tensorboard-dir)."""
from __future__ import annotations

import json
import os


class MetricsWriter:
    """Appends one JSON object per record and mirrors numeric fields to TensorBoard as
    `<split>/<field>` at step `iteration` (nested ones as `<split>/<field>/<key>/...`, e.g. the per-dataset
    evaluation's `valid/datasets/<name>/val_loss`). Appending lets a resumed run continue the same file."""

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
                if key not in ("iteration", "split"):
                    for tag, number in _scalars(f"{split}/{key}", value):
                        self._tb.add_scalar(tag, number, record["iteration"])
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


def _scalars(tag: str, value) -> list[tuple[str, float]]:
    """The numbers of a record field, nested dicts flattened into tags (bools and None left out)."""
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _scalars(f"{tag}/{key}", sub)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(tag, value)]
    return []
