"""Batch, step count, precision, seed and evaluation flags."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import one_of, positive
from megatron_eslm.errors import UserError

TITLE = "training"
FP8_FORMATS = ("hybrid", "e4m3")  # Megatron's names (tensor_parallel/fp8.py)


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro_batch_size (no accumulation)
    train_iters: int = 1000
    bf16: bool = False
    fp8_format: str | None = None  # None: no FP8
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 10


HELP = {
    "micro_batch_size": "samples per forward/backward",
    "global_batch_size": "samples per optimizer step (accumulates micro-batches)",
    "train_iters": "optimizer steps",
    "bf16": "bfloat16 autocast for the model (fp32 master weights)",
    "fp8_format": f"{' or '.join(FP8_FORMATS)}: the transformer layers' linear matmuls in FP8 through torchao's "
                  "float8 training (dynamic per-tensor scales; hybrid: e4m3 forward, e5m2 gradients; e4m3: e4m3 "
                  "throughout); the LM head, embeddings, norms and attention stay bf16, the master weights "
                  "fp32. Needs --bf16, torchao and a GPU of compute capability 8.9 or more (docs/performance.md)",
    "seed": "seed for init, dropout, data order and random selection",
    "eval_interval": "evaluate every N iterations (and at the end)",
    "eval_iters": "validation batches per evaluation",
}


def validate_training(t: TrainingConfig) -> None:
    """A finalized training section (--global-batch-size filled)."""
    for value, flag in ((t.micro_batch_size, "--micro-batch-size"), (t.global_batch_size, "--global-batch-size"),
                        (t.train_iters, "--train-iters"), (t.eval_interval, "--eval-interval")):
        positive(value, flag)
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(f"--global-batch-size {t.global_batch_size} is not divisible by "
                        f"--micro-batch-size {t.micro_batch_size}")
    if t.eval_iters < 0:
        raise UserError(f"--eval-iters must be >= 0, got {t.eval_iters}")
    if t.fp8_format is not None:
        one_of(t.fp8_format, FP8_FORMATS, "--fp8-format")
        if not t.bf16:
            raise UserError(f"--fp8-format {t.fp8_format} needs --bf16 (the activations around the FP8 matmuls "
                            "and the LM head run in bf16)")
