"""Quickstart: raw text to an ESLM-trained GPT on one machine, with no download.

The corpus is the Python standard library's own source files (always present wherever Python is).
Steps: write them as JSONL, train a SentencePiece BPE tokenizer, preprocess to Megatron .bin/.idx,
pretrain a small GPT with ESLM (validation before and after), save a checkpoint, sample some text.
The summary's kept fraction, FLOPs and tokens/s cover every training step, not only the logged ones.
The model and data flags below shrink the run (the smoke test runs it in seconds); the defaults are the
README's quickstart.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sysconfig
import time

import torch

from megatron_eslm.config import parse_args
from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.model.generation import generate
from megatron_eslm.output_dir import check_output_dir, mark
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.tokenizer.train import train_sentencepiece
from megatron_eslm.training.progress import format_duration
from megatron_eslm.training.step import StepStats
from megatron_eslm.training.trainer import Trainer

PROMPT = "def "


def write_stdlib_corpus(path: str, max_bytes: int) -> tuple[int, int]:
    """One JSON document per standard-library .py file, in sorted order, up to `max_bytes` of text."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and "test" not in os.path.relpath(f, root).split(os.sep)[0])
    docs = written = 0
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        for name in files:
            try:
                text = open(name, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            out.write(json.dumps({"text": text}) + "\n")
            docs += 1
            written += len(text.encode())
            if written >= max_bytes:
                break
    os.replace(tmp, path)
    return docs, written


class RunTotals:
    """Sums over every training step of a run, from the reduced sums of each log interval."""

    def __init__(self) -> None:
        self.steps = self.tokens = self.valid = self.kept = 0
        self.executed_flops = self.dense_flops = self.seconds = 0.0

    def add(self, stats: StepStats, seconds: float, tokens: int, flops) -> None:
        self.steps += stats.steps
        self.tokens += tokens
        self.valid += stats.valid
        self.kept += stats.kept
        self.executed_flops += flops.executed
        self.dense_flops += flops.dense
        self.seconds += seconds

    @property
    def kept_fraction(self) -> float:
        return self.kept / max(self.valid, 1)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class TotalsTrainer(Trainer):
    """The trainer, also summing every log interval (so every step) into `totals`, timed as its records."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.totals = RunTotals()

    def _train_record(self, stats: StepStats, elapsed: float) -> dict:
        self.totals.add(stats, elapsed, self.cfg.training.global_batch_size * self.cfg.model.seq_length * stats.steps,
                        stats.flops(self.cfg.model, self.vocab_size))
        return super()._train_record(stats, elapsed)


def pretrain_flags(out: str, data_prefix: str, tokenizer_model: str, args: argparse.Namespace) -> list[str]:
    """The pretraining run's flags. A re-run starts over, as it does for the corpus and tokenizer it rewrites:
    --overwrite-save replaces the checkpoints of the earlier run in its own (or --force'd) output directory."""
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads),
        "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
        "--micro-batch-size", str(args.batch_size), "--global-batch-size", str(args.batch_size),
        "--train-iters", str(args.train_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--adam-beta2", "0.95",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, args.train_iters // 10)),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
        "--data-path", data_prefix, "--split", "95,5,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--selection", "eslm", "--eslm-score", "loss", "--eslm-alpha", str(args.eslm_alpha),
        "--eval-interval", str(args.train_iters), "--eval-iters", str(args.eval_iters), "--log-interval", str(args.log_interval),
        "--num-workers", "0",
        "--tensorboard-dir", os.path.join(out, "tensorboard"), "--metrics-file", os.path.join(out, "metrics.jsonl"),
        "--save", os.path.join(out, "checkpoints"), "--overwrite-save", "--seed", "1234",
    ]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_eslm.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="quickstart_output",
                        help="where data, logs and checkpoints go: absent, empty or an earlier quickstart output "
                             "(a re-run starts over there, its checkpoints replaced)")
    parser.add_argument("--force", action="store_true", help="write into --output-dir although it holds other files")
    parser.add_argument("--train-iters", type=int, default=200, help="optimizer steps")
    parser.add_argument("--eslm-alpha", type=float, default=0.5, help="ESLM confidence level")
    parser.add_argument("--corpus-mb", type=float, default=3.0, help="MB of standard-library source to use")
    parser.add_argument("--vocab-size", type=int, default=2048, help="SentencePiece vocabulary size")
    parser.add_argument("--log-interval", type=int, default=10,
                        help="print a progress line (and write a metrics record) every N iterations; "
                             "the summary still covers every iteration")
    size = parser.add_argument_group("model and batch (smaller values make a faster, worse run)")
    size.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    size.add_argument("--hidden-size", type=int, default=256, help="hidden size")
    size.add_argument("--num-attention-heads", type=int, default=4, help="attention heads (divide --hidden-size)")
    size.add_argument("--seq-length", type=int, default=128, help="tokens per sample (also the max positions)")
    size.add_argument("--batch-size", type=int, default=16, help="samples per optimizer step")
    size.add_argument("--eval-iters", type=int, default=4, help="validation batches per evaluation")
    size.add_argument("--generate-tokens", type=int, default=80, help="tokens of sample text in the summary")
    args = parser.parse_args(argv)
    for name in ("train_iters", "log_interval", "batch_size", "eval_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = os.path.abspath(args.output_dir)
    ours = check_output_dir(out, "quickstart", "--output-dir", args.force)
    os.makedirs(out, exist_ok=True)
    if ours:
        mark(out, "quickstart")
    t0 = time.perf_counter()

    corpus = os.path.join(out, "stdlib.jsonl")
    docs, size = write_stdlib_corpus(corpus, int(args.corpus_mb * 1e6))
    print(f"[1/4] corpus: {docs} standard-library files, {size / 1e6:.1f} MB -> {corpus}")

    tok_prefix = os.path.join(out, "tokenizer")
    train_sentencepiece([corpus], args.vocab_size, tok_prefix)
    print(f"[2/4] tokenizer: SentencePiece BPE, vocab {args.vocab_size} -> {tok_prefix}.model")

    data_prefix = os.path.join(out, "stdlib")
    tokenizer = build_tokenizer("SentencePieceTokenizer", tok_prefix + ".model")
    preprocess(corpus, data_prefix, tokenizer_type="SentencePieceTokenizer",
               tokenizer_model=tok_prefix + ".model", append_eod=True, workers=2)
    data_prefix += "_text_document"
    print(f"[3/4] dataset: {data_prefix}.bin/.idx")

    flags = pretrain_flags(out, data_prefix, tok_prefix + ".model", args)
    print("[4/4] pretraining; the same run from the command line:\n  python -m megatron_eslm.pretrain "
          + " ".join(shlex.quote(f) for f in flags))
    trainer = TotalsTrainer(parse_args(flags))
    valid_samples = 0 if trainer.valid_ds is None else len(trainer.valid_ds)
    if valid_samples < args.batch_size:  # evaluation would see no batch: no perplexity to report
        trainer.close()
        raise UserError(f"--corpus-mb {args.corpus_mb}: the validation split holds {valid_samples} samples of "
                        f"{args.seq_length} tokens, fewer than one batch of {args.batch_size}; raise --corpus-mb "
                        f"or lower --batch-size/--seq-length")
    before = trainer.evaluate()
    train_start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - train_start
    after = trainer.evaluate()
    trainer.close()

    totals = trainer.totals
    executed, dense = totals.executed_flops, totals.dense_flops
    sample = generate(trainer.model, tokenizer.tokenize(PROMPT), max_new_tokens=args.generate_tokens,
                      vocab_limit=tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    text = PROMPT + tokenizer.detokenize(sample)
    print("\n==== summary ====")
    print(f"validation perplexity: {before['val_ppl']:.1f} before -> {after['val_ppl']:.1f} after "
          f"{args.train_iters} iterations")
    print(f"ESLM alpha {args.eslm_alpha}: mean kept fraction {totals.kept_fraction:.3f} of tokens")
    print(f"executed FLOPs {executed:.3e} vs dense {dense:.3e} ({executed / max(dense, 1.0):.3f}x, "
          f"all {totals.steps} iterations)")
    print(f"throughput: {totals.tokens_per_sec:.0f} tokens/s (all iterations); training {format_duration(train_time)}, "
          f"total {format_duration(time.perf_counter() - t0)}")
    print(f"metrics: {os.path.join(out, 'metrics.jsonl')}  tensorboard: {os.path.join(out, 'tensorboard')}")
    print(f"checkpoint: {os.path.join(out, 'checkpoints')}")
    print("generated text:\n" + "\n".join("  | " + line for line in text.splitlines()[:8]))


if __name__ == "__main__":
    main()
