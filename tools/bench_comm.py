#!/usr/bin/env python
"""Communication volume per training step per rank, by collective, for a parallel layout and model size.

The table comes from a model of the collectives the training step issues (`predict`, one term per code
path). `--check` verifies that model against the code itself: it trains a tiny GPT for a few steps on a
gloo process group with the same layout and compares, rank by rank and kind by kind, the bytes counted
by `megatron_eslm.distributed.collectives` (every collective of the step goes through its wrappers) with
the prediction, for dense training and for ESLM (alpha 0, so the kept rows are known in advance).

Bytes are payload: what a rank hands to the collective (its shard for an all-gather, the whole input
for a reduce-scatter or all-reduce, the message for a send or receive), for a float32 model. Ring
algorithms put about 2 (n-1)/n of an all-reduce's payload on each rank's link, (n-1)/n of a
reduce-scatter's and (n-1) times an all-gather's.

    python tools/bench_comm.py --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --data-parallel-size 2 --num-layers 24 --hidden-size 2048 --seq-length 2048 --vocab-size 50304
    python tools/bench_comm.py --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --data-parallel-size 2 --sequence-parallel --check
    python tools/bench_comm.py --context-parallel-size 4 --data-parallel-size 2 --tensor-model-parallel-size 1 \\
        --pipeline-model-parallel-size 1 --seq-length 32768 --micro-batch-size 1 --global-batch-size 64

Not modelled: activation recompute, which repeats each recomputed layer's forward collectives in the
backward (tensor-parallel ones and context parallelism's key/value all-gather).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_eslm.distributed import collectives as c
from megatron_eslm.training.step import SUMMED

FLOAT = 4  # bytes of a float32 activation, gradient or score
INDEX = 8  # bytes of an int64 count or a float64 scalar


@dataclass(frozen=True)
class Setup:
    tp: int = 2
    pp: int = 2
    dp: int = 2
    sp: bool = False
    layers: int = 24
    hidden: int = 2048
    ffn: int = 8192
    seq: int = 2048
    vocab: int = 50304  # padded: divisible by TP
    micro_batch: int = 4
    global_batch: int = 512
    selection: str = "eslm"  # none | eslm
    alpha: float = 0.5
    threshold_mode: str = "sketch-exact"
    sketch_size: int = 2048
    cp: int = 1
    heads: int = 16
    query_groups: int = 16  # key/value heads (= heads without grouped-query attention), of hidden / heads each

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def tokens(self) -> int:
        """Tokens (LM-head rows) of one micro-batch on one rank: its 2 of the 2C chunks of every sequence."""
        return self.micro_batch * self.seq // self.cp

    @property
    def selection_ranks(self) -> int:
        """The selection group and the gradients' data-parallel sum: data x context ranks."""
        return self.dp * self.cp

    @property
    def kept_rows(self) -> int:
        """Rows whose LM-head gradient is computed: every valid one (dense), else about (1 - alpha) of
        them (the group's kept count is at least n - floor(alpha n); one rank's varies around it)."""
        return self.tokens - math.floor(self.alpha * self.tokens) if self.selection == "eslm" else self.tokens

    def local_parameters(self, stage: int) -> int:
        h, f, tp = self.hidden, self.ffn, self.tp
        layer = (3 * h * h + 3 * h + h * h + f * h + f + h * f) // tp + 2 * h + 4 * h  # shards, biases, norms
        count = self.layers // self.pp * layer
        if stage == 0 or stage == self.pp - 1:
            count += self.vocab // tp * h  # the tied word embedding (the last stage holds a copy)
        if stage == 0:
            count += self.seq * h  # positions
        if stage == self.pp - 1:
            count += 2 * h  # final norm
        return count


def threshold_bytes(s: Setup) -> int:
    """One threshold call's payload (`eslm/distributed_threshold.py`), without sketch-exact's third round,
    which only runs when a rank holds more scores than the sketch and moves fewer than 2n/m scores."""
    if s.threshold_mode == "exact":
        return (257 + 3 * 256) * INDEX  # radix histograms (the first carries the non-finite count)
    sketch = (s.sketch_size + 2) * 4  # int32 header + block minima
    return sketch + (INDEX if s.threshold_mode == "sketch" else 3 * INDEX)  # kept count | bracket counts


def predict(s: Setup, stage: int) -> Counter[str]:
    """Payload bytes per optimizer step of a rank on pipeline stage `stage` (0-based), by kind; the metrics
    sums go once per log interval, counted here as if every step were logged (`--log-interval 1`)."""
    first, last = stage == 0, stage == s.pp - 1
    per_micro, per_step = Counter(), Counter()
    t, h = s.tokens, s.hidden * FLOAT
    layers = s.layers // s.pp
    if s.tp > 1:
        if s.sp:  # column-parallel input all-gathered, row-parallel output reduce-scattered, twice per layer
            per_micro[c.TP_ALL_GATHER] += layers * 2 * 2 * (t // s.tp) * h  # forward gathers, backward of scatters
            per_micro[c.TP_REDUCE_SCATTER] += layers * 2 * 2 * t * h  # forward, backward of gathers
            per_step[c.TP_ALL_REDUCE] += (layers * 6 * s.hidden + (2 * s.hidden if last else 0)) * FLOAT  # norms, biases
        else:  # row-parallel output all-reduced (forward), column-parallel input grads (backward)
            per_micro[c.TP_ALL_REDUCE] += layers * 2 * 2 * t * h
        if first:
            per_micro[c.TP_ALL_REDUCE] += t * h  # vocab-parallel embedding
            if s.sp:
                per_micro[c.TP_ALL_GATHER] += (t // s.tp) * h  # backward of the scatter into the sequence shards
        if last:
            per_micro[c.TP_ALL_REDUCE] += 4 * t * FLOAT + s.kept_rows * h  # partials (max; 3 sums), kept rows
            if s.sp:
                per_micro[c.TP_ALL_GATHER] += (t // s.tp) * h  # final norm output to the head
    if s.cp > 1:  # per layer: keys and values all-gathered (forward), their gradients reduce-scattered
        kv = 2 * t * (s.hidden * s.query_groups // s.heads // s.tp) * FLOAT
        per_micro[c.CP_ALL_GATHER] += layers * kv
        per_micro[c.CP_REDUCE_SCATTER] += layers * s.cp * kv
    if s.pp > 1:
        activation = (t // s.tp if s.sp else t) * h
        for kind in (c.PP_SEND, c.PP_RECV):
            per_micro[kind] += activation * ((not first) + (not last))
        if first or last:
            per_step[c.EMBEDDING_ALL_REDUCE] += s.vocab // s.tp * h
        per_step[c.METRICS] += len(SUMMED) * INDEX  # sums from the last stage to the others, per log interval
    if s.selection_ranks > 1:
        per_step[c.DP_ALL_REDUCE] += s.local_parameters(stage) * FLOAT
        if last:
            per_micro[c.ESLM_THRESHOLD if s.selection == "eslm" else c.DENSE_NORMALIZER] += (
                threshold_bytes(s) if s.selection == "eslm" else INDEX)
            per_step[c.METRICS] += len(SUMMED) * INDEX  # sums over the selection group, per log interval
    if s.tp * s.pp > 1:
        per_step[c.GRAD_NORM] += INDEX
    total = Counter({kind: value * s.micro_batches for kind, value in per_micro.items()})
    total.update(per_step)
    return total


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def ring_factors(s: Setup) -> dict[str, float]:
    """Bytes a rank sends per payload byte under ring algorithms (n ranks): all-reduce 2 (n-1)/n,
    reduce-scatter (n-1)/n, all-gather n-1; a send is sent once and a receive sends nothing."""
    def all_reduce(n: int) -> float:
        return 2 * (n - 1) / n

    n = s.selection_ranks
    return {c.TP_ALL_REDUCE: all_reduce(s.tp), c.TP_ALL_GATHER: s.tp - 1, c.TP_REDUCE_SCATTER: (s.tp - 1) / s.tp,
            c.CP_ALL_GATHER: s.cp - 1, c.CP_REDUCE_SCATTER: (s.cp - 1) / s.cp, c.CP_SEND: 1.0, c.CP_RECV: 0.0,
            c.PP_SEND: 1.0, c.PP_RECV: 0.0,
            c.DP_ALL_REDUCE: all_reduce(n), c.EMBEDDING_ALL_REDUCE: all_reduce(2), c.ESLM_THRESHOLD: n - 1,
            c.DENSE_NORMALIZER: all_reduce(n), c.GRAD_NORM: all_reduce(s.tp * s.pp), c.METRICS: 1.0}


def print_table(s: Setup) -> None:
    stages = sorted({0, max(s.pp - 2, 0), s.pp - 1})  # first, a middle one, last
    names = ["every stage"] if s.pp == 1 else [("first" if i == 0 else "last" if i == s.pp - 1 else "middle")
                                               + " stage" for i in stages]
    volumes = [predict(s, stage) for stage in stages]
    print(f"TP {s.tp} x CP {s.cp} x PP {s.pp} x DP {s.dp}{' + SP' if s.sp else ''}; {s.layers} layers, hidden "
          f"{s.hidden}, {s.heads} heads ({s.query_groups} key/value), ffn {s.ffn}, seq {s.seq}, vocab {s.vocab}; "
          f"micro-batch {s.micro_batch}, global batch "
          f"{s.global_batch} ({s.micro_batches} micro-batches per rank); selection {s.selection}"
          + (f" alpha {s.alpha} ({s.threshold_mode})" if s.selection == "eslm" else "") + "\n")
    print("| bytes per step per rank | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for kind in c.KINDS:
        if any(v[kind] for v in volumes):
            print(f"| {kind} | " + " | ".join(human(v[kind]) for v in volumes) + " |")
    print("| **total payload** | " + " | ".join(f"**{human(sum(v.values()))}**" for v in volumes) + " |")
    factors = ring_factors(s)
    print("| sent on the wire (ring estimate) | "
          + " | ".join(human(sum(factors[k] * n for k, n in v.items())) for v in volumes) + " |")
    if s.selection == "eslm" and s.selection_ranks > 1 and s.threshold_mode == "sketch-exact":
        slack = s.selection_ranks * ((s.tokens - 1) // s.sketch_size)
        if slack:
            print(f"\nsketch-exact may add a third round per micro-batch of at most {human(max(2 * slack - 1, 0) * 4)} "
                  "(scores inside the sketch's bracket), not counted above.")


# ----------------------------------------------------------------------------------------- check

def write_dataset(prefix: str, vocab: int, documents: int = 200) -> None:
    """Random token documents (ids below `vocab`, then the NullTokenizer's end-of-document id `vocab`)."""
    from megatron_eslm.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for _ in range(documents):
            builder.add_item(np.append(rng.integers(0, vocab, rng.integers(20, 200)), vocab))
            builder.end_document()
        builder.finalize(prefix + ".idx")


def tiny(s: Setup) -> list[Setup]:
    """The layout of `s` on a tiny model, dense and ESLM (alpha 0: every row kept, known in advance)."""
    small = replace(s, layers=2 * s.pp, hidden=32, ffn=64, seq=8 * s.tp * s.cp, vocab=128, micro_batch=2,
                    global_batch=2 * s.dp * 3, alpha=0.0, sketch_size=64, heads=4, query_groups=4)
    return [replace(small, selection="none"), replace(small, selection="eslm")]


def check_flags(s: Setup, prefix: str) -> list[str]:
    return ["--num-layers", str(s.layers), "--hidden-size", str(s.hidden), "--ffn-hidden-size", str(s.ffn),
            "--num-attention-heads", str(s.heads), *(["--group-query-attention", "--num-query-groups",
                                                      str(s.query_groups)] if s.query_groups != s.heads else []),
            "--seq-length", str(s.seq), "--micro-batch-size", str(s.micro_batch),
            "--global-batch-size", str(s.global_batch), "--train-iters", "2", "--lr", "1e-3",
            "--data-path", prefix, "--split", "100,0,0", "--tokenizer-type", "NullTokenizer", "--vocab-size",
            str(s.vocab - 1), "--make-vocab-size-divisible-by", str(s.vocab // s.tp), "--eval-iters", "0",
            "--log-interval", "1", "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(s.pp),
            "--context-parallel-size", str(s.cp), *(["--sequence-parallel"] if s.sp else []),
            "--selection", s.selection,
            "--eslm-alpha", str(s.alpha), "--eslm-threshold", s.threshold_mode,
            "--eslm-sketch-size", str(s.sketch_size)]


def count_bytes(setups: list[Setup], prefix: str) -> list[tuple[int, Counter]]:
    """On every rank of an initialised process group: train each setup for 2 steps and return (pipeline
    stage, counted bytes per step by kind) per setup. `prefix` is a `write_dataset(prefix, vocab - 1)`."""
    from megatron_eslm import parallel_state
    from megatron_eslm.config import parse_args
    from megatron_eslm.training.trainer import Trainer

    counted = []
    for s in setups:
        trainer = Trainer(parse_args(check_flags(s, prefix)), log=lambda *a: None)
        c.reset()
        trainer.train()
        counted.append((parallel_state.pipeline_model_parallel_rank(),
                        Counter({k: v // 2 for k, v in c.bytes_by_kind.items()})))
        trainer.close()
    return counted


def mismatches(setups: list[Setup], per_rank: list[list[tuple[int, Counter]]]) -> list[str]:
    """Every (setup, rank, kind) whose counted bytes differ from `predict`."""
    out = []
    for i, setup in enumerate(setups):
        for rank, results in enumerate(per_rank):
            stage, counted = results[i]
            expected = predict(setup, stage)
            out += [f"{setup.selection} rank {rank} {kind}: counted {counted[kind]}, predicted {expected[kind]}"
                    for kind in c.KINDS if counted[kind] != expected[kind]]
    return out


def _check_rank(rank: int, world: int, tmp: str, setups: list[Setup]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.save(count_bytes(setups, os.path.join(tmp, "tokens")), f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def check(s: Setup) -> bool:
    """Train a tiny model with this layout on gloo; compare every rank's counted bytes with `predict`."""
    setups = tiny(s)
    world = s.tp * s.pp * s.dp * s.cp
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(os.path.join(tmp, "tokens"), setups[0].vocab - 1)
        mp.spawn(_check_rank, args=(world, tmp, setups), nprocs=world, join=True)
        per_rank = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
    problems = mismatches(setups, per_rank)
    print("\n".join(f"MISMATCH {line}" for line in problems))
    print(f"check on {world} gloo ranks (tiny model, dense and ESLM): "
          + ("every rank's counted bytes equal the prediction, kind by kind" if not problems else "FAILED"))
    return not problems


def parse() -> argparse.Namespace:
    d = Setup()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-model-parallel-size", type=int, default=d.tp)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=d.pp)
    p.add_argument("--data-parallel-size", type=int, default=d.dp)
    p.add_argument("--context-parallel-size", type=int, default=d.cp)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--num-layers", type=int, default=d.layers)
    p.add_argument("--hidden-size", type=int, default=d.hidden)
    p.add_argument("--num-attention-heads", type=int, default=d.heads)
    p.add_argument("--num-query-groups", type=int, default=None, help="key/value heads; default: the heads")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden")
    p.add_argument("--seq-length", type=int, default=d.seq)
    p.add_argument("--vocab-size", type=int, default=d.vocab, help="padded vocabulary")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch)
    p.add_argument("--global-batch-size", type=int, default=d.global_batch)
    p.add_argument("--selection", choices=["none", "eslm"], default=d.selection)
    p.add_argument("--eslm-alpha", type=float, default=d.alpha)
    p.add_argument("--eslm-threshold", choices=["sketch", "sketch-exact", "exact"], default=d.threshold_mode)
    p.add_argument("--eslm-sketch-size", type=int, default=d.sketch_size)
    p.add_argument("--check", action="store_true", help="verify the model on a tiny gloo run of this layout")
    return p.parse_args()


def main() -> None:
    args = parse()
    setup = Setup(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
                  args.sequence_parallel, args.num_layers, args.hidden_size,
                  args.ffn_hidden_size or 4 * args.hidden_size, args.seq_length, args.vocab_size,
                  args.micro_batch_size, args.global_batch_size, args.selection, args.eslm_alpha,
                  args.eslm_threshold, args.eslm_sketch_size, args.context_parallel_size, args.num_attention_heads,
                  args.num_query_groups or args.num_attention_heads)
    print_table(setup)
    if args.check:
        print()
        raise SystemExit(0 if check(setup) else 1)


if __name__ == "__main__":
    main()
