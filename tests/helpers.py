"""Helpers shared by several test files (pytest puts tests/ on sys.path: `from helpers import ...`).

Fixtures live in conftest.py; these are plain functions the tests call with their own arguments.
"""
import json
import os
from typing import Iterable

import numpy as np
import torch

from megatron_eslm import pretrain
from megatron_eslm.config import parse_args
from megatron_eslm.data.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron_eslm.errors import UserError
from megatron_eslm.training import checkpointing
from megatron_eslm.training.timers import PHASES
from megatron_eslm.training.trainer import Trainer
from rank_pool import run_on_ranks

# wall-clock fields, which differ between any two runs (mfu is None on a CPU without --peak-tflops, the
# memory None off CUDA; the phase times come with --timing-log-level)
TIMING = {"tokens_per_sec", "iteration_time_ms", "tflops_per_gpu", "mfu", "max_memory_allocated",
          *(f"time_{name}_ms" for name in PHASES)}


def build_indexed(prefix, documents, dtype=np.int32):
    """Write documents (lists of sequences) to prefix.bin/.idx; returns the prefix."""
    with IndexedDatasetBuilder(get_bin_path(prefix), dtype) as builder:
        for document in documents:
            for sequence in document:
                builder.add_item(np.array(sequence))
            builder.end_document()
        builder.finalize(get_idx_path(prefix))
    return prefix


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (empty placeholders left out)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def flags(corpus, *extra):
    """A tiny 6-iteration pretraining command line on the (data_prefix, tokenizer_model) corpus."""
    prefix, model = corpus
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "6", "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--data-path", prefix, "--tokenizer-model", model, "--split", "90,10,0",
            "--eval-interval", "1000", "--eval-iters", "2", "--log-interval", "1", "--num-workers", "0",
            "--seed", "7", *extra]


def run(argv, log=lambda *a: None):
    """Train to --train-iters; returns (trainer, logged records)."""
    trainer = Trainer(parse_args(argv), log=log)
    records = trainer.train()
    trainer.close()
    return trainer, records


def straight_and_resumed(corpus, tmp_path, *common):
    """The 6 iterations of `flags(corpus, *common)` saved every 3, then a second run resumed from iteration
    3 (the tracker points at 6: it is rewritten to 3 to replay the second half).
    Returns (straight trainer, straight records, resumed trainer, resumed records)."""
    save = str(tmp_path / "ckpt")
    trainer, straight = run(flags(corpus, *common, "--save", save, "--save-interval", "3"))
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("3\n")
    resumed_trainer, resumed = run(flags(corpus, *common, "--load", save))
    return trainer, straight, resumed_trainer, resumed


def without_timing(records):
    """The records without their wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the model flags of the two shapes the checkpoint tools handle
MODELS = {
    "gpt2": [],
    "llama": ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--group-query-attention",
              "--num-query-groups", "2"],
}


def launch_pretrain(corpus, tmp, ranks: int, layout: tuple[int, int], model: str, *extra: str) -> list[dict]:
    """A tiny dense run without dropout (no randomness but the data order) through pretrain's entry point, in
    this process or on the session's `ranks` gloo ranks (tests/rank_pool.py); returns its training records."""
    prefix, tokenizer = corpus
    metrics = os.path.join(tmp, f"metrics-{len(os.listdir(tmp))}.jsonl")
    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--data-path", prefix, "--tokenizer-model", tokenizer, "--split", "90,10,0",
            "--eval-interval", "1000", "--eval-iters", "0", "--log-interval", "1", "--num-workers", "0",
            "--seed", "7", "--hidden-dropout", "0", "--attention-dropout", "0", "--selection", "none",
            "--make-vocab-size-divisible-by", "32",  # 320 tokens: 320 rows at TP1 and at TP2 alike
            "--tensor-model-parallel-size", str(layout[0]), "--pipeline-model-parallel-size", str(layout[1]),
            "--metrics-file", metrics, *MODELS[model], *extra]
    if ranks == 1:
        pretrain_in_process(argv)
    else:
        run_on_ranks(ranks, pretrain_in_process, argv)
    return [r for r in map(json.loads, open(metrics)) if "lm_loss" in r]


def save_refusal_on_rank(argv: list[str]) -> tuple[str, int]:
    """Build the trainer of ARGV (on every rank of a pool through `run_on_ranks`); returns the UserError it
    stopped with and how many times this rank listed a --save directory (`checkpointing.run_checkpoints`)."""
    listed, reads = checkpointing.run_checkpoints, []
    checkpointing.run_checkpoints = lambda root: reads.append(root) or listed(root)
    try:
        Trainer(parse_args(argv), log=lambda *a: None).close()
        return "no error", len(reads)
    except UserError as err:
        return str(err), len(reads)
    finally:
        checkpointing.run_checkpoints = listed


def pretrain_in_process(argv: list[str]) -> None:
    """`python -m megatron_eslm.pretrain ARGV` in this process (one thread, as a launched rank has), on
    every rank of a pool when called through `run_on_ranks`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain.main(argv)
    finally:
        torch.set_num_threads(threads)
