#!/usr/bin/env python
"""Average the weights of several checkpoints of one run (checkpoint averaging / "model soup" over time):
late checkpoints of a run sit around a minimum, and their mean often evaluates better than any one.

    python tools/average_checkpoints.py --load ckpt --last 3 --save ckpt_avg
    python tools/average_checkpoints.py --load ckpt --iterations 800 900 1000 --save ckpt_avg --weights ema:0.5

Weights (normalized to sum 1):
  uniform   the plain mean.
  loss      proportional to exp(-loss), i.e. to each checkpoint's per-token likelihood (1/perplexity): a
            checkpoint worse by 0.1 nats counts e^-0.1 = 0.9 times as much, whatever the loss level, where
            1/loss would treat 2.0 vs 2.1 and 6.0 vs 6.1 differently. The loss is read from the run's
            --metrics-file (the saved config's): the validation record's `val_loss` at exactly the
            checkpoint's iteration when every checkpoint has one (an evaluation at the save), otherwise the
            last training record's `lm_loss` at or before it for all of them, never a mix of the two.
  ema:D     the exponential moving average in iteration order, avg <- D * avg + (1 - D) * checkpoint,
            started at the first: D = 0 keeps the last checkpoint.

The output holds the weights only (no optimizer moments, no RNG states) with the newest checkpoint's
iteration, data position, schedule and selection state, in the source's TP x PP layout unless told
otherwise; load it with `--load OUT --no-load-optim` (continue the run) or `--finetune`, or export it like
any other checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

from megatron_eslm.checkpoint.full_state import FullCheckpoint
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.checkpoint.writer import write_checkpoint
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.output_dir import check_checkpoint_save, mark

ITERATION_DIR = re.compile(r"^iter_(\d{7})$")

TOOL = "average_checkpoints"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory of the run (its --save)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--iterations", type=int, nargs="+", help="the iterations to average")
    which.add_argument("--last", type=int, help="average the newest K checkpoints under --load")
    parser.add_argument("--save", required=True,
                        help="directory to write the averaged checkpoint to: absent, empty or an earlier output of "
                             "this tool (not --load)")
    parser.add_argument("--force", action="store_true",
                        help="write into --save even though it holds files this tool did not write")
    parser.add_argument("--weights", default="uniform", help="uniform | loss | ema:DECAY (see above)")
    parser.add_argument("--tensor-model-parallel-size", type=int, help="layout to write; default: the source's")
    parser.add_argument("--pipeline-model-parallel-size", type=int, help="layout to write; default: the source's")
    return parser.parse_args(argv)


def saved_iterations(root: str) -> list[int]:
    """The iterations with a complete checkpoint directory under `root`, oldest first."""
    if not os.path.isdir(root):
        raise UserError(f"--load {root}: no such directory")
    return sorted(int(m.group(1)) for m in map(ITERATION_DIR.match, os.listdir(root)) if m)


def chosen_iterations(root: str, iterations: list[int] | None, last: int | None) -> list[int]:
    if iterations is not None:
        return sorted(set(iterations))
    if last < 1:
        raise UserError(f"--last {last}: must be at least 1")
    saved = saved_iterations(root)
    if len(saved) < last:
        raise UserError(f"--last {last}: {root} holds only {len(saved)} checkpoint(s)")
    return saved[-last:]


def check_same_run(checkpoints: list[FullCheckpoint], root: str) -> None:
    """Averaging is only meaningful between weights of one architecture (and one vocabulary)."""
    first = checkpoints[0]
    reference = dataclasses.asdict(first.config.model)
    for other in checkpoints[1:]:
        fields = dataclasses.asdict(other.config.model)
        differing = [key for key in reference if reference[key] != fields.get(key)]
        if other.vocab_size != first.vocab_size:
            differing.append("vocab_size")
        if differing or other.model.keys() != first.model.keys():
            what = differing[0] if differing else "parameter names"
            raise UserError(f"--load {root}: iterations {first.iteration} and {other.iteration} differ in {what}; "
                            "only checkpoints of one model can be averaged")


def logged_losses(checkpoints: list[FullCheckpoint]) -> list[float]:
    """Each checkpoint's loss from the run's metrics file (see the module docstring)."""
    path = checkpoints[-1].config.logging.metrics_file
    if not path or not os.path.exists(path):
        raise UserError(f"--weights loss: the run's --metrics-file {path} is missing")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    wanted = [c.iteration for c in checkpoints]
    valid = {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}
    if all(it in valid for it in wanted):
        return [valid[it] for it in wanted]
    train = [r for r in records if "lm_loss" in r]
    losses = []
    for it in wanted:
        last = None  # the newest iteration at or before `it`; in file order, so a resumed run's record wins
        for record in train:
            if record["iteration"] <= it and (last is None or record["iteration"] >= last["iteration"]):
                last = record
        if last is None:
            raise UserError(f"--weights loss: {path} has no training loss at or before iteration {it}")
        losses.append(last["lm_loss"])
    return losses


def averaging_weights(scheme: str, checkpoints: list[FullCheckpoint]) -> list[float]:
    """Normalized weights of the checkpoints (in iteration order) under `scheme`."""
    count = len(checkpoints)
    if scheme == "uniform":
        raw = [1.0] * count
    elif scheme == "loss":
        losses = logged_losses(checkpoints)
        best = min(losses)  # shifted so exp() cannot underflow; the normalization cancels it
        raw = [math.exp(best - loss) for loss in losses]
    elif scheme.startswith("ema:"):
        try:
            decay = float(scheme[4:])
        except ValueError:
            decay = -1.0
        if not 0.0 <= decay < 1.0:
            raise UserError(f"--weights {scheme}: the decay must be a number in [0, 1)")
        raw = [decay ** (count - 1)] + [(1 - decay) * decay ** (count - 1 - k) for k in range(1, count)]
    else:
        raise UserError(f"--weights {scheme}: expected uniform, loss or ema:DECAY")
    total = sum(raw)
    return [w / total for w in raw]


def average(checkpoints: list[FullCheckpoint], weights: list[float]) -> FullCheckpoint:
    """The weighted mean of the models, with the newest checkpoint's run state and no moments."""
    model = {name: sum(w * c.model[name] for w, c in zip(weights, checkpoints))
             for name in checkpoints[0].model}
    return dataclasses.replace(checkpoints[-1], model=model, moments=None, optimizer_step=None)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    ours = check_checkpoint_save(args.save, "--load", args.load, TOOL, args.force)
    iterations = chosen_iterations(args.load, args.iterations, args.last)
    checkpoints = [read_checkpoint(args.load, it, optimizer=False) for it in iterations]
    check_same_run(checkpoints, args.load)
    weights = averaging_weights(args.weights, checkpoints)
    parallel = checkpoints[-1].config.parallel
    tp = args.tensor_model_parallel_size or parallel.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size or parallel.pipeline_model_parallel_size
    path = write_checkpoint(average(checkpoints, weights), args.save, tp, pp, optimizer=False)
    if ours:
        mark(args.save, TOOL)
    shown = ", ".join(f"{it}: {w:.4f}" for it, w in zip(iterations, weights))
    print(f"wrote {path}: TP {tp} x PP {pp}, weights only ({args.weights}: {shown})")


if __name__ == "__main__":
    main()
