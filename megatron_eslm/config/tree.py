"""The Config tree: one section per flag group, in the order `--help` lists them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

from megatron_eslm.config import (checkpoint, data, deepspeed, faults, logging, model, optimizer, parallel, selection,
                                  training)
from megatron_eslm.config.checkpoint import CheckpointConfig
from megatron_eslm.config.data import DataConfig
from megatron_eslm.config.deepspeed import DeepSpeedSection
from megatron_eslm.config.faults import FaultsConfig
from megatron_eslm.config.logging import LoggingConfig
from megatron_eslm.config.model import ModelConfig
from megatron_eslm.config.optimizer import OptimizerConfig
from megatron_eslm.config.parallel import ParallelConfig
from megatron_eslm.config.selection import SelectionConfig
from megatron_eslm.config.training import TrainingConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Section(NamedTuple):
    """One flag group: its attribute on Config, its `--help` title, its dataclass and its help texts."""
    name: str
    title: str
    fields: type
    helps: dict[str, str]


SECTIONS = tuple(Section(name, module.TITLE, cls, module.HELP) for name, module, cls in (
    ("model", model, ModelConfig),
    ("data", data, DataConfig),
    ("optimizer", optimizer, OptimizerConfig),
    ("training", training, TrainingConfig),
    ("parallel", parallel, ParallelConfig),
    ("selection", selection, SelectionConfig),
    ("logging", logging, LoggingConfig),
    ("checkpoint", checkpoint, CheckpointConfig),
    ("faults", faults, FaultsConfig),
    ("deepspeed", deepspeed, DeepSpeedSection),
))
