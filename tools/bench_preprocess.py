#!/usr/bin/env python
"""Preprocessing throughput: tools/preprocess_data.py's pipeline against a plain single-process loop.

The corpus is a text file repeated --repeat times (one document per blank-line-separated block). A
SentencePiece BPE tokenizer is trained on the file once; then, round-robin, best of --trials:
  loop          read the blocks and call tokenizer.tokenize on each, in this process, writing nothing
  loop x2       the same loop in 2 forked processes, each on half the blocks: what 2 cores of this machine
                give to perfectly split work with no pipeline at all (the ceiling for any pool)
  workers=N     preprocess() with N tokenising workers (1 runs inline), writing the .bin/.idx; its
                SentencePiece encode is batched per chunk (one thread), returning int32 arrays
  partitions=2  preprocess() with 2 workers as 2 partitions (one pipeline each), then the merge
Prints a markdown table (MB/s of text, tokens/s, speedup over the loop). Without an input file it prints
a notice and exits 0.
Example: python tools/bench_preprocess.py --input ../shared/data/tinyshakespeare.txt --repeat 8
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import tempfile
import time

from megatron_eslm.data.indexed_dataset import IndexedDataset
from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.tokenizer.train import train_sentencepiece


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="plain-text file to repeat into the corpus")
    parser.add_argument("--repeat", type=int, default=8, help="copies of the file in the corpus")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--trials", type=int, default=3, help="round-robin runs per configuration; best reported")
    return parser.parse_args()


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if not args.input or not os.path.isfile(args.input):
        print(f"skipped: no input file ({args.input!r}); pass --input PATH to a text file")
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(args.input, "rb") as src:
            text = src.read()
        with open(corpus, "wb") as dst:
            for _ in range(args.repeat):
                dst.write(text.rstrip(b"\n") + b"\n\n")
        megabytes = os.path.getsize(corpus) / 1e6
        model = train_sentencepiece([args.input], args.vocab_size, os.path.join(tmp, "tok"))
        tokenizer = build_tokenizer("SentencePieceTokenizer", model)

        def read_blocks() -> list[str]:
            with open(corpus, encoding="utf-8") as f:
                return re.split(r"\n[ \t\r\f\v]*\n", f.read())

        def tokenize_blocks(blocks: list[str]) -> int:
            return sum(len(tokenizer.tokenize(b.strip("\n"))) for b in blocks if b.strip())

        def loop() -> None:
            loop.tokens = tokenize_blocks(read_blocks())

        def loop_x2() -> None:
            blocks = read_blocks()
            halves = (blocks[: len(blocks) // 2], blocks[len(blocks) // 2 :])
            fork = multiprocessing.get_context("fork")  # the children inherit the tokenizer and the blocks
            processes = [fork.Process(target=tokenize_blocks, args=(half,)) for half in halves]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            loop_x2.tokens = loop.tokens

        def pipeline(workers: int, partitions: int = 1):
            def run() -> None:
                (prefix,) = preprocess(corpus, os.path.join(tmp, "out"), "SentencePieceTokenizer", model,
                                       workers=workers, partitions=partitions, log_interval=10**9)
                run.tokens = IndexedDataset(prefix).num_tokens
            return run

        loop()  # the token count, for loop x2 too
        rows = [("loop (1 process, no writing)", loop), ("loop x2 (2 processes, halves, no writing)", loop_x2)]
        rows += [(f"preprocess --workers {w}", pipeline(w)) for w in args.workers]
        rows.append(("preprocess --workers 2 --partitions 2", pipeline(2, 2)))
        # Round-robin trials, best of each: background load on a shared machine hits every run alike.
        load_before = os.getloadavg()[0]
        best = {name: timed(run) for name, run in rows}
        for _ in range(args.trials - 1):
            for name, run in rows:
                best[name] = min(best[name], timed(run))
        print(f"corpus: {megabytes:.1f} MB ({args.repeat} x {args.input}), SentencePiece BPE vocab {args.vocab_size}, "
              f"{os.cpu_count()} CPUs, best of {args.trials}, load average {load_before:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after")
        print("| run | seconds | MB/s | tokens/s | speedup |")
        print("| --- | ---: | ---: | ---: | ---: |")
        baseline = best[rows[0][0]]
        for name, run in rows:
            seconds = best[name]
            print(f"| {name} | {seconds:.2f} | {megabytes / seconds:.2f} | {run.tokens / seconds:,.0f} | "
                  f"{baseline / seconds:.2f}x |")


if __name__ == "__main__":
    main()
