"""One dataclass tree for a run, filled from Megatron-style flags (and an optional JSON file), validated
before any work starts so that a bad value fails in one line instead of deep inside a training step.

One module per flag group holds its dataclass, help texts and checks (model, data, optimizer, training,
parallel, selection, logging, checkpoint, deepspeed); `tree` assembles them into Config, `parser` reads
flags into it and `validation` holds the checks that span groups."""
from megatron_eslm.config.checkpoint import CheckpointConfig
from megatron_eslm.config.data import DataConfig
from megatron_eslm.config.deepspeed import ZERO_STAGES, DeepSpeedSection
from megatron_eslm.config.logging import LoggingConfig
from megatron_eslm.config.model import ModelConfig, finalize_model
from megatron_eslm.config.optimizer import LR_DECAY_STYLES, OptimizerConfig
from megatron_eslm.config.parallel import ParallelConfig
from megatron_eslm.config.parser import build_parser, parse_args
from megatron_eslm.config.selection import (ADA_ESLM_RULES, KD_SCORES, LM_HEAD_IMPLS, SCORES, SELECTIONS,
                                            THRESHOLD_MODES, THRESHOLD_SCOPES, SelectionConfig)
from megatron_eslm.config.training import TrainingConfig
from megatron_eslm.config.tree import Config
from megatron_eslm.config.validation import finalize, validate, validate_layout

__all__ = [
    "ADA_ESLM_RULES", "KD_SCORES", "LM_HEAD_IMPLS", "LR_DECAY_STYLES", "SCORES", "SELECTIONS", "THRESHOLD_MODES",
    "THRESHOLD_SCOPES", "ZERO_STAGES", "CheckpointConfig", "Config", "DataConfig", "DeepSpeedSection",
    "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "SelectionConfig", "TrainingConfig",
    "build_parser", "finalize", "finalize_model", "parse_args", "validate", "validate_layout",
]
