"""Evaluate a checkpoint (any layout, ours or DeepSpeed's) without training, on one device: the record an
in-training evaluation writes (`training/evaluation.py`: val_loss, val_ppl, per-dataset numbers for a blend,
val_cvar50/90), over the run's own validation data unless flags name other data.

    python -m megatron_eslm.evaluate --load ckpt
    python -m megatron_eslm.evaluate --load ckpt --valid-data-path 0.5 wiki_text_document 0.5 code_text_document \\
        --eval-iters 50 --metrics-file eval.jsonl

The run's flags (model, tokenizer, seed, --eval-iters, batch sizes, --data-path and --split) come from the
checkpoint; the flags below replace them. With the run's data and flags the numbers equal the run's own
evaluation at that iteration (tests/test_evaluate.py). `val_above_threshold` needs --train-threshold (the
training threshold is not in the checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import torch
from torch.utils.data import DataLoader

from megatron_eslm.checkpoint.paths import recorded_path
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.data.builder import build_train_valid_test_datasets
from megatron_eslm.data.samplers import ResumableBatchSampler
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.generate import load_model
from megatron_eslm.model.lm_head import resolve_impl
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.training import evaluation
from megatron_eslm.training.metrics import MetricsWriter


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory (its --save)")
    parser.add_argument("--iteration", type=int, help="iteration to load; default: the latest")
    parser.add_argument("--valid-data-path", nargs="+", help="PREFIX or W1 PREFIX1 W2 PREFIX2 ...: evaluate on these")
    parser.add_argument("--data-path", nargs="+", help="a --data-path blend whose --split validation part to use")
    parser.add_argument("--split", help="with --data-path: train,valid,test weights")
    parser.add_argument("--tokenizer-model", help="the run's tokenizer model file; default: the one it names")
    parser.add_argument("--data-cache-path", help="where the dataset index cache lives")
    parser.add_argument("--eval-iters", type=int, help="global batches to evaluate (each sample once)")
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--train-threshold", type=float, help="a training threshold, for val_above_threshold")
    parser.add_argument("--metrics-file", help="append the record to this JSON-lines file")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as a --bf16 run evaluates")
    parser.add_argument("--lm-head-impl", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for flag in ("eval_iters", "micro_batch_size", "global_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def validation_data(args: argparse.Namespace, data):
    """The run's data flags with the command line's in their place."""
    replace = {key: getattr(args, key) for key in ("tokenizer_model", "data_cache_path", "split")
               if getattr(args, key) is not None}
    if args.valid_data_path:
        replace.update(valid_data_path=args.valid_data_path, data_path=[], train_data_path=[], test_data_path=[])
    elif args.data_path:
        replace.update(data_path=args.data_path)
    return dataclasses.replace(data, **replace)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    model, full = load_model(args.load, args.iteration, args.device)
    cfg = full.config
    data = validation_data(args, cfg.data)
    t = dataclasses.replace(cfg.training, **{key: getattr(args, key) for key in
                                             ("eval_iters", "micro_batch_size", "global_batch_size")
                                             if getattr(args, key) is not None})
    if args.tokenizer_model is None:
        recorded_path(data.tokenizer_model, args.load, "--tokenizer-model")
    tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_size)
    _, valid, _ = build_train_valid_test_datasets(data, cfg.model.seq_length, t.seed,
                                                  (0, t.eval_iters * t.global_batch_size, 0), tokenizer.vocab_size)
    if valid is None:
        raise UserError(f"--load {args.load}: no validation data (give --valid-data-path, or a --data-path and "
                        "--split with a validation part)")
    device = torch.device(args.device)
    sampler = ResumableBatchSampler(min(len(valid), t.eval_iters * t.global_batch_size), 0, t.micro_batch_size)
    loader = DataLoader(valid, batch_sampler=sampler, num_workers=0)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    record = evaluation.evaluate(model, valid, loader, device, resolve_impl(args.lm_head_impl, device), autocast,
                                 cfg.selection, args.train_threshold, len(loader) * t.micro_batch_size)
    record = {"iteration": full.iteration, **record}
    if args.metrics_file:
        writer = MetricsWriter(args.metrics_file, None)
        writer.write(record)
        writer.close()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
