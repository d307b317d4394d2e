"""Quickstart: raw text to an ESLM-trained GPT on one machine, with no download.

The corpus is the Python standard library's own source files (always present wherever Python is).
Steps: write them as JSONL, train a SentencePiece BPE tokenizer, preprocess to Megatron .bin/.idx,
pretrain a small GPT with ESLM (validation before and after), save a checkpoint, sample some text.
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
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.model.generation import generate
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.tokenizer.train import train_sentencepiece
from megatron_eslm.training.progress import format_duration
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


def pretrain_flags(out: str, data_prefix: str, tokenizer_model: str, args: argparse.Namespace) -> list[str]:
    return [
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128",
        "--micro-batch-size", "16", "--global-batch-size", "16",
        "--train-iters", str(args.train_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--adam-beta2", "0.95",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, args.train_iters // 10)),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
        "--data-path", data_prefix, "--split", "95,5,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--selection", "eslm", "--eslm-score", "loss", "--eslm-alpha", str(args.eslm_alpha),
        "--eval-interval", str(args.train_iters), "--eval-iters", "4", "--log-interval", str(args.log_interval),
        "--num-workers", "0",
        "--tensorboard-dir", os.path.join(out, "tensorboard"), "--metrics-file", os.path.join(out, "metrics.jsonl"),
        "--save", os.path.join(out, "checkpoints"), "--seed", "1234",
    ]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_eslm.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="quickstart_output", help="where data, logs and checkpoints go")
    parser.add_argument("--train-iters", type=int, default=200, help="optimizer steps")
    parser.add_argument("--eslm-alpha", type=float, default=0.5, help="ESLM confidence level")
    parser.add_argument("--corpus-mb", type=float, default=3.0, help="MB of standard-library source to use")
    parser.add_argument("--vocab-size", type=int, default=2048, help="SentencePiece vocabulary size")
    parser.add_argument("--log-interval", type=int, default=10, help="log every N iterations")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
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
    trainer = Trainer(parse_args(flags))
    print(f"model: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters on {trainer.device}")
    before = trainer.evaluate()
    train_start = time.perf_counter()
    records = trainer.train()
    train_time = time.perf_counter() - train_start
    after = trainer.evaluate()
    trainer.close()

    kept = sum(r["kept_fraction"] for r in records) / len(records)
    executed = sum(r["executed_flops"] for r in records)
    dense = sum(r["dense_flops"] for r in records)
    tok_s = sum(r["tokens_per_sec"] for r in records) / len(records)
    sample = generate(trainer.model, tokenizer.tokenize(PROMPT), max_new_tokens=80,
                      vocab_limit=tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    text = PROMPT + tokenizer.detokenize(sample)
    print("\n==== summary ====")
    print(f"validation perplexity: {before['val_ppl']:.1f} before -> {after['val_ppl']:.1f} after "
          f"{args.train_iters} iterations")
    print(f"ESLM alpha {args.eslm_alpha}: mean kept fraction {kept:.3f} of tokens")
    print(f"executed FLOPs {executed:.3e} vs dense {dense:.3e} ({executed / dense:.3f}x, logged iterations)")
    print(f"throughput: {tok_s:.0f} tokens/s (logged iterations); training {format_duration(train_time)}, "
          f"total {format_duration(time.perf_counter() - t0)}")
    print(f"metrics: {os.path.join(out, 'metrics.jsonl')}  tensorboard: {os.path.join(out, 'tensorboard')}")
    print(f"checkpoint: {os.path.join(out, 'checkpoints')}")
    print("generated text:\n" + "\n".join("  | " + line for line in text.splitlines()[:8]))


if __name__ == "__main__":
    main()
