#!/usr/bin/env python
"""How far the micro-batch and previous-step VaR thresholds are from the exact threshold of the WHOLE
global batch, along a short ESLM training run of a tiny GPT.

    python tools/threshold_scope_study.py --text ../shared/data/tinyshakespeare.txt --work-dir /tmp/scope

(without --text, or when the file is absent, the corpus is generated from a tiny grammar). One process,
so the selection group is this process and a step's micro-batches are the whole global batch. The run
trains with the default per-micro-batch threshold (exact mode); every micro-batch's loss scores are
recorded, and after training, for every micro-batch of every step and each alpha, three thresholds are
compared:
  micro-batch    the alpha-quantile of the micro-batch's scores (what the run trained with)
  previous-step  `ESLMPolicy(scope="previous-step")`: the quantile of the merged sketch of every
                 micro-batch of the previous step (default sketch size; step 1 has none and is left out)
  global         the exact alpha-quantile of all micro-batches of the step (the target)
For a threshold t, the rank error is |#{x < t} - k| / n over the step's n scores x, k = floor(alpha n)
(the exact rule's index), and the kept-fraction difference is (#{y >= t} - #{y >= global}) / n_mb over the
micro-batch's scores y; summed over the step's micro-batches it gives the step's kept-fraction difference
(tokens trained on). Prints a markdown table; --csv writes one row per (alpha, step, micro-batch).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import random
import statistics
import sys
import time

import torch

from megatron_eslm.config import parse_args
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, token_score
from megatron_eslm.eslm.threshold import var_index, var_threshold
from megatron_eslm.model.lm_head import Selection, TokenScores
from megatron_eslm.output_dir import check_output_dir, check_output_files, mark, write_file
from megatron_eslm.training.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from selection_study import Data, prepare_data  # noqa: E402  (the same text -> tokenizer -> dataset steps)

TOOL = "threshold_scope_study"
SCOPES = ("micro-batch", "previous-step")
WORDS = ("the king queen castle river stone bread wine sword horse night morning speaks rides walks sings "
         "holds sees loves fears and with under over near far old young red green").split()


class Recorder(Policy):
    """The training policy, plus a copy of every micro-batch's valid scores, grouped by step."""

    def __init__(self, inner: ESLMPolicy):
        self.inner = inner
        self.steps: list[list[torch.Tensor]] = []

    def start_step(self, iteration: int) -> None:
        self.inner.start_step(iteration)
        self.steps.append([])

    def __call__(self, scores: TokenScores) -> Selection:
        self.steps[-1].append(token_score(scores, self.inner.score)[scores.valid].float().clone())
        return self.inner(scores)


def generated_text(path: str, paragraphs: int = 3000, seed: int = 0) -> str:
    """Paragraphs of sentences from a tiny grammar (learnable, so the loss falls as training goes)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(paragraphs):
            sentences = [f"the {rng.choice(WORDS[26:])} {rng.choice(WORDS[:8])} {rng.choice(WORDS[12:18])} the "
                         f"{rng.choice(WORDS[:12])} {rng.choice(WORDS[18:26])} the river." for _ in range(6)]
            fh.write(" ".join(sentences) + "\n\n")
    return path


def train_and_record(args: argparse.Namespace, data: Data) -> tuple[list[list[torch.Tensor]], float]:
    prefix, tokenizer = data.train[0], data.tokenizer  # the corpus but every tenth document
    argv = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", "4", "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(args.iters), "--lr", str(args.lr), "--lr-warmup-iters", str(args.iters // 10),
            "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--data-path", prefix, "--tokenizer-model", tokenizer, "--split", "98,2,0", "--eval-iters", "0",
            "--eval-interval", str(args.iters + 1), "--log-interval", str(args.iters), "--num-workers", "0",
            "--seed", str(args.seed), "--selection", "eslm", "--eslm-alpha", str(args.train_alpha),
            "--eslm-threshold", "exact"]
    trainer = Trainer(parse_args(argv), log=lambda *a: None)
    trainer.policy = recorder = Recorder(trainer.policy)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.close()
    return recorder.steps, seconds


def compare(steps: list[list[torch.Tensor]], alpha: float, sketch_size: int) -> list[dict]:
    """One row per (step, micro-batch): each scope's threshold, rank error and kept-fraction difference."""
    previous = ESLMPolicy(alpha, "loss", "exact", sketch_size, scope="previous-step")
    rows = []
    for step, micro_batches in enumerate(steps, start=1):
        previous.start_step(step)
        x = torch.cat(micro_batches)
        n, k = x.numel(), var_index(alpha, x.numel())
        target = float(var_threshold(x, torch.ones_like(x, dtype=torch.bool), alpha))
        for index, y in enumerate(micro_batches):
            ones = torch.ones_like(y, dtype=torch.bool)
            thresholds = {"micro-batch": float(var_threshold(y, ones, alpha)),
                          "previous-step": previous.select(y, ones).threshold}
            row = {"alpha": alpha, "step": step, "micro_batch": index, "tokens": y.numel(), "global": target}
            for scope, t in thresholds.items():
                row[scope] = t
                row[f"{scope} rank error"] = abs(int((x < t).sum()) - k) / n
                row[f"{scope} kept diff"] = (int((y >= t).sum()) - int((y >= target).sum())) / y.numel()
            rows.append(row)
    return rows


def step_kept_diff(rows: list[dict], scope: str, step: int) -> float:
    """(tokens the scope keeps over the step's micro-batches - tokens the global threshold keeps) / n."""
    mine = [r for r in rows if r["step"] == step]
    return sum(r[f"{scope} kept diff"] * r["tokens"] for r in mine) / sum(r["tokens"] for r in mine)


def summary(rows: list[dict], first_step: int) -> list[str]:
    lines = []
    chosen = [r for r in rows if r["step"] >= first_step]
    steps = sorted({r["step"] for r in chosen})
    for scope in SCOPES:
        errors = [r[f"{scope} rank error"] for r in chosen]
        diffs = [r[f"{scope} kept diff"] for r in chosen]
        per_step = [step_kept_diff(chosen, scope, step) for step in steps]
        lines.append(f"| {chosen[0]['alpha']} | {steps[0]}-{steps[-1]} | {scope} | {statistics.mean(errors):.2%} | "
                     f"{max(errors):.2%} | {statistics.mean(map(abs, diffs)):.2%} | "
                     f"{statistics.mean(map(abs, per_step)):.2%} | {statistics.mean(per_step):+.2%} |")
    return lines


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="plain-text corpus (e.g. ../shared/data/tinyshakespeare.txt); absent: generated")
    p.add_argument("--work-dir", required=True, help="tokenizer and dataset go here (reused when present)")
    p.add_argument("--csv", help="write every (alpha, step, micro-batch) row here (a new file, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="use a --work-dir holding other files, and replace an existing --csv")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--train-alpha", type=float, default=0.5, help="alpha the run trains with")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8], help="alphas compared")
    p.add_argument("--sketch-size", type=int, default=2048, help="previous-step sketch size")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    ours = check_output_dir(args.work_dir, TOOL, "--work-dir", args.force)
    if args.csv:
        check_output_files([args.csv], "--csv", args.csv, args.force)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    if ours:
        mark(args.work_dir, TOOL)
    text = args.text
    if text is None or not os.path.exists(text):
        if text is not None:
            print(f"{text} not found: using generated text")
        text = generated_text(os.path.join(args.work_dir, "generated.txt"))
    data = prepare_data([text], [], args.work_dir, args.vocab_size, stdlib_bytes=0)
    steps, seconds = train_and_record(args, data)
    rows = [row for alpha in args.alphas for row in compare(steps, alpha, args.sketch_size)]
    micro = len(steps[0])
    print(f"{datetime.date.today()}, {platform.machine()} CPU, {args.threads} thread(s); corpus {text}; "
          f"{args.iters} steps of {micro} micro-batches x {args.micro_batch_size} x {args.seq_length} tokens "
          f"(trained at alpha {args.train_alpha}, per-micro-batch exact threshold) in {seconds:.0f} s\n")
    print("| alpha | steps | threshold | mean rank error | max rank error | mean abs kept-fraction diff, "
          "micro-batch | mean abs kept-fraction diff, step | mean kept-fraction diff, step |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for alpha in args.alphas:
        mine = [r for r in rows if r["alpha"] == alpha]
        print("\n".join(summary(mine, 2) + summary(mine, args.iters // 2 + 1)))
    if args.csv:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_file(args.csv, table.getvalue())


if __name__ == "__main__":
    main()
