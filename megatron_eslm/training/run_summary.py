"""What a training run is about to do, said once before its first step: a newcomer sees the model, the
layout, the data and where the numbers go before waiting for the first iteration."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_eslm import parallel_state
from megatron_eslm.distributed import launch
from megatron_eslm.training.flops import micro_batch_flops
from megatron_eslm.training.memory import Layout, stage_parameters

if TYPE_CHECKING:
    from megatron_eslm.training.trainer import Trainer


def parameter_count(trainer: "Trainer") -> int:
    """The whole model's parameters (every TP and PP shard, the tied head once), by the estimator's count
    (`training/memory.py`), not this rank's shard."""
    return sum(p.numel for p in stage_parameters(trainer.cfg.model, trainer.vocab_size, Layout(), 0))


def _epochs(dataset: torch.utils.data.Dataset) -> str:
    """Passes over its split the dataset's index holds; a blend's per member."""
    members = getattr(dataset, "datasets", None)
    if members is None:
        return f"{dataset.num_epochs} epoch(s) of its split"
    return "epochs of each split: " + ", ".join(f"{name} {member.num_epochs}"
                                                for name, member in zip(dataset.names, members) if member is not None)


def start_block(trainer: "Trainer") -> list[str]:
    """The lines rank 0 prints before the first step (README.md, "What a run prints")."""
    cfg, t, m = trainer.cfg, trainer.cfg.training, trainer.cfg.model
    per_token = micro_batch_flops(m, trainer.vocab_size, 1, 1, 1, selective=False).dense
    layout = Layout(parallel_state.tensor_model_parallel_size(), parallel_state.pipeline_model_parallel_size(),
                    parallel_state.data_parallel_size(), cfg.parallel.sequence_parallel,
                    parallel_state.context_parallel_size(), parallel_state.virtual_pipeline_model_parallel_size())
    valid = "none" if trainer.valid_ds is None else f"{len(trainer.valid_ds)} samples"
    sinks = [f"metrics file {cfg.logging.metrics_file}"] if cfg.logging.metrics_file else []
    sinks += [f"TensorBoard {cfg.logging.tensorboard_dir}"] if cfg.logging.tensorboard_dir else []
    return [
        f"model:   {parameter_count(trainer) / 1e6:.2f}M parameters ({m.num_layers} layers, hidden "
        f"{m.hidden_size}, vocabulary {trainer.vocab_size} padded), {per_token:.3g} FLOPs per token "
        f"(forward + backward, dense)",
        f"layout:  {launch.world_size()} process(es) = {layout.describe()}; micro-batch {t.micro_batch_size} x "
        f"{m.seq_length} tokens, {trainer.num_micro_batches} micro-batches per step of {t.global_batch_size}",
        f"device:  {trainer.device}, {'bf16' if t.bf16 else 'fp32'}",
        f"data:    train {len(trainer.train_ds)} samples for {t.train_iters} iterations "
        f"({_epochs(trainer.train_ds)}); valid {valid}",
        f"start:   {trainer.start_point}",
        f"metrics: {'; '.join(sinks) or 'console only'}",
    ]
