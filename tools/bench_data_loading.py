#!/usr/bin/env python
"""Data-loading speed against megatron-core on the same synthetic data: index building and random reads.

1. Index build time vs document count (documents of 1..199 tokens, mean 100; one epoch of samples of
   --seq-length): ours (``build_gpt_indices``) against megatron-core's own three steps (its
   ``_build_document_index``, the C++ ``helpers.build_sample_idx``, ``_build_shuffle_index``), and the
   blending index for 2 to 8 datasets, some with skewed weights, against its C++
   ``build_blending_indices`` (best of 5 round-robin trials). No files are needed for this part.
2. Random-access reads per second on one .bin/.idx written by megatron-core's builder: whole sequences
   through each reader's ``get``, and GPT samples (our ``GPTDataset[i]``, with tensors, against
   megatron-core's ``GPTDataset._query_document_sample_shuffle_indices`` on its own indices).
Without megatron-core installed, only our columns are printed.
Example: python tools/bench_data_loading.py --max-documents 10000000   (--only blending: that table alone)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import types
import warnings
from fractions import Fraction

import numpy as np
import torch

from megatron_eslm.data.blended_dataset import blending_indices
from megatron_eslm.data.gpt_dataset import GPTDataset, build_gpt_indices
from megatron_eslm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import gpt_dataset as mcore_gpt
        from megatron.core.datasets import helpers as mcore_helpers
        from megatron.core.datasets import indexed_dataset as mcore_indexed
except ImportError:
    mcore_gpt = mcore_helpers = mcore_indexed = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-documents", type=int, default=10_000_000, help="largest document count to index")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--read-documents", type=int, default=200_000, help="documents in the read benchmark's file")
    parser.add_argument("--reads", type=int, default=20_000, help="random reads per measurement")
    parser.add_argument("--only", choices=("reads", "blending", "index"), help="run one table only")
    return parser.parse_args()


def timed(run, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def mcore_indices(lengths: np.ndarray, seq_length: int, seed: int) -> tuple:
    """megatron-core's document, sample and shuffle indices for one epoch, exactly as its GPTDataset builds them."""
    rng = np.random.RandomState(seed)
    document_index = mcore_gpt._build_document_index(np.arange(len(lengths), dtype=np.int32), 1, rng, False)
    sample_index = mcore_helpers.build_sample_idx(lengths, document_index, seq_length, 1, int(lengths.sum()), True, True)
    shuffle_index = mcore_gpt._build_shuffle_index(len(sample_index) - 1, len(sample_index) - 1, rng)
    return document_index, sample_index, shuffle_index


def index_build_table(max_documents: int, seq_length: int) -> None:
    print(f"\n### Index build (one epoch, seq_length {seq_length}, documents of mean 100 tokens)\n")
    print("| documents | tokens | samples | ours (s) | megatron-core (s) | ours / mcore |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    count = 10_000
    while count <= max_documents:
        lengths = np.random.default_rng(0).integers(1, 200, size=count).astype(np.int32)
        tokens = int(lengths.sum())
        samples = (tokens - 1) // seq_length
        repeats = 3 if count < 1_000_000 else 1
        ours = timed(lambda: build_gpt_indices(lengths, 0, seq_length, samples, 1234), repeats)
        theirs = timed(lambda: mcore_indices(lengths, seq_length, 1234), repeats) if mcore_gpt else float("nan")
        print(f"| {count:,} | {tokens:,} | {samples:,} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |", flush=True)
        count *= 10


def blending_table(samples: int, trials: int = 5) -> None:
    """Ours against megatron-core's C++ ``build_blending_indices``, best of ``trials`` round-robin runs."""
    blends = (("2: 0.3 / 0.7 (period 10)", [Fraction(3, 10), Fraction(7, 10)]),
              ("2: 1234567 / 7654321 tokens (period > samples)",
               [Fraction(1234567, 8888888), Fraction(7654321, 8888888)]),
              ("3: 1234567 / 7654321 / 4567890 tokens", [Fraction(t, 13456778) for t in (1234567, 7654321, 4567890)]),
              ("8: token counts 10^6 to 10^7", [Fraction(t, 44444444) for t in
                                                (1111111, 2222222, 3333333, 4444444, 5555555, 6666666, 9999999, 11111114)]),
              ("3: 97.6% / 1.3% / 1.0%", [Fraction(t, 425375877) for t in (415664778, 5652489, 4058610)]),
              ("7: one weight of 3e-8", [Fraction(t, 355555425) for t in
                                         (4086864, 335336404, 292224, 5382749, 10, 5677599, 4779575)]))
    runs = []
    for label, weights in blends:
        runs.append((label, "ours", lambda weights=weights: blending_indices(weights, samples)))
        if mcore_helpers:
            runs.append((label, "mcore", lambda weights=weights: mcore_helpers.build_blending_indices(
                np.zeros(samples, np.int16), np.zeros(samples, np.int64), np.array([float(w) for w in weights]),
                len(weights), samples, False)))
    load_before = os.getloadavg()[0]
    best = {(label, who): float("inf") for label, who, _ in runs}
    for _ in range(trials):  # round-robin: background load on a shared machine hits every row alike
        for label, who, run in runs:
            best[label, who] = min(best[label, who], timed(run))
    print(f"\n### Blending index, {samples:,} samples (best of {trials} round-robin trials; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after)\n")
    print("| datasets: weights | ours (s) | megatron-core (s) | ours / mcore |")
    print("| --- | ---: | ---: | ---: |")
    for label, _ in blends:
        ours, theirs = best[label, "ours"], best.get((label, "mcore"), float("nan"))
        print(f"| {label} | {ours:.4f} | {theirs:.4f} | {ours / theirs:.2f} |", flush=True)


def read_table(num_documents: int, reads: int, seq_length: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench")
        lengths = np.random.default_rng(1).integers(1, 200, size=num_documents)
        with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
            tokens = np.random.default_rng(2).integers(0, 50000, size=int(lengths.sum())).astype(np.uint16)
            builder.add_documents(tokens, lengths)
            builder.finalize(prefix + ".idx")
        ours = IndexedDataset(prefix)
        picks = np.random.default_rng(3).integers(0, num_documents, size=reads).tolist()
        rows = [("sequence reads (`get(i)`)", lambda: [ours.get(i) for i in picks], None)]
        samples = int(lengths.sum() - 1) // seq_length
        gpt = GPTDataset(ours, (0, num_documents), seq_length, samples, 1234, "bench")
        sample_picks = np.random.default_rng(4).integers(0, samples, size=min(reads, samples)).tolist()
        rows.append((f"GPT samples of {seq_length + 1} tokens", lambda: [gpt[i] for i in sample_picks], None))
        if mcore_indexed:
            theirs = mcore_indexed.IndexedDataset(prefix)
            rows[0] = rows[0][:2] + (lambda: [theirs.get(i) for i in picks],)
            document_index, sample_index, shuffle_index = mcore_indices(lengths.astype(np.int32), seq_length, 1234)
            reference = object.__new__(mcore_gpt.GPTDataset)
            reference.dataset, reference.document_index = theirs, document_index
            reference.sample_index, reference.shuffle_index = sample_index, shuffle_index
            reference.config = types.SimpleNamespace(add_extra_token_to_sequence=True, sequence_length=seq_length)
            reference._pad_token_id = -1
            rows[1] = rows[1][:2] + (lambda: [reference._query_document_sample_shuffle_indices(i)
                                              for i in sample_picks],)
        print(f"\n### Random reads ({num_documents:,} documents, {int(lengths.sum()):,} uint16 tokens, page cache warm)\n")
        print("| read | ours (reads/s) | megatron-core (reads/s) | ours / mcore |")
        print("| --- | ---: | ---: | ---: |")
        for label, run_ours, run_theirs in rows:
            count = len(picks) if "sequence" in label else len(sample_picks)
            mine = count / timed(run_ours, 3)
            other = count / timed(run_theirs, 3) if run_theirs else float("nan")
            print(f"| {label} | {mine:,.0f} | {other:,.0f} | {mine / other:.2f} |", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"megatron-core: {'installed' if mcore_gpt else 'not installed'}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.only in (None, "reads"):
        read_table(args.read_documents, args.reads, args.seq_length)
    if args.only in (None, "blending"):
        blending_table(1_000_000)
    if args.only in (None, "index"):
        index_build_table(args.max_documents, args.seq_length)


if __name__ == "__main__":
    main()
