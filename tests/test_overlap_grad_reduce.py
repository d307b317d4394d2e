"""--overlap-grad-reduce against the data-parallel reduction after the backward, on gloo process groups (the
runs, spawns and comparisons of tests/test_parallel_training.py): DP2 and TP2xDP2 with sequence parallelism,
the GPT-2 shape (tied embedding) and the Llama flags (untied output layer), dense and ESLM, and PP2xDP2
(GPT-2, ESLM), and DP2 under full recompute (Llama, ESLM); three micro-batches per rank and several buckets;
one float64 run a case (as test_parallel_training.py's):

  per step lm_loss, kept_loss, threshold and grad_norm to 1e-6 relative, the kept fraction exactly;
  every parameter to 1e-12 relative; replicas bitwise equal (`assemble` checks).
DP2 is bitwise equal (the same sums of the same buckets); with TP or PP the sequence-parallel and
tied-embedding sums come after the data-parallel ones, which changes the rounding only.

Every run with the flag also records its asynchronous all-reduces: each bucket is launched exactly once per
step, in bucket order (so every data-parallel rank issues the same sequence), every one of them inside the
backward of the step's last micro-batch (after the one before it has
ended, before it ends): the LM head's weight included, whose gradient the head adds in place.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from torch.autograd import Variable

from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.distributed import deepspeed_config
from megatron_eslm.errors import UserError
from megatron_eslm.training.trainer import Trainer
from test_parallel_training import (COMPARED, DTYPE, GLOBAL_BATCH, REFERENCE_MICRO_BATCH, STEPS, assemble,
                                    flags, layout_flags, micro_batch, model_flags, relative, run_jobs)
from rank_pool import run_on_ranks

ALL = [(model, selection) for model in ("gpt2", "llama") for selection in ("dense", "eslm-loss")]
# layout -> (TP, PP, sequence parallel), (model, selection) cases; PP2: the last stage's copy of the tied
# embedding, which only the head uses, and the first stage's backwards run by the pipeline schedule
LAYOUTS = {2: {"dp2": ((1, 1, False), ALL), "dp2-recompute": ((1, 1, False), [("llama", "eslm-loss")])},
           4: {"tp2dp2-sp": ((2, 1, True), ALL), "pp2dp2": ((1, 2, False), [("gpt2", "eslm-loss")])}}
BUCKET = ["--ddp-bucket-size", "3000"]  # several buckets: the embedding alone, layers grouped
# "-recompute" layouts: the layers' forward runs again inside the backward that launches the sums
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
EVENTS: list[tuple] = []  # in a rank process: what `run_recorded` saw, in order


class _RecordingEngine:
    """Autograd's engine, recording the end of each backward (torch.autograd.backward and the pipeline's
    direct calls both run it)."""

    def __init__(self, engine):
        self.engine = engine

    def run_backward(self, *args, **kwargs):
        result = self.engine.run_backward(*args, **kwargs)
        EVENTS.append(("backward end",))
        return result

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def run_recorded(jobs: list[tuple]) -> dict:
    """test_parallel_training's jobs on a pool rank, recording each trainer (with its buckets' sizes when it
    overlaps), each step, the end of each backward and each asynchronous all-reduce's launch; the
    recording hooks are removed afterwards (the rank serves other tests)."""
    all_reduce, train_step, init = dist.all_reduce, Trainer.train_step, Trainer.__init__
    engine = Variable._execution_engine

    def recorded_all_reduce(tensor, *args, **kwargs):
        if kwargs.get("async_op"):
            EVENTS.append(("launch", tensor.numel()))
        return all_reduce(tensor, *args, **kwargs)

    def recorded_step(self, *args, **kwargs):
        EVENTS.append(("step",))
        return train_step(self, *args, **kwargs)

    def recorded_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        reducer = self.grad_reducer
        EVENTS.append(("trainer", reducer and [sum(p.numel() for p in bucket) for bucket in reducer.buckets]))

    dist.all_reduce, Trainer.train_step, Trainer.__init__ = recorded_all_reduce, recorded_step, recorded_init
    Variable._execution_engine = _RecordingEngine(engine)
    EVENTS.clear()
    try:
        return {"results": run_jobs(jobs), "events": list(EVENTS)}
    finally:
        dist.all_reduce, Trainer.train_step, Trainer.__init__ = all_reduce, train_step, init
        Variable._execution_engine = engine


def jobs(world: int, corpus) -> list[tuple]:
    out = []
    for layout, ((tp, pp, sp), cases) in LAYOUTS[world].items():
        for model, selection in cases:
            for overlap in (False, True):
                argv = model_flags(corpus, micro_batch(world, tp, pp), model, selection, *layout_flags(tp, pp, sp),
                                   *BUCKET, *(RECOMPUTE if layout.endswith("-recompute") else []),
                                   *(["--overlap-grad-reduce"] if overlap else []))
                out.append(((layout, model, selection, overlap), "train", argv, DTYPE))
    return out


def check_launches(events: list[tuple]) -> int:
    """Every overlapping trainer's launches (see the module docstring); returns how many trainers."""
    trainers = 0
    for trainer in _split(events, "trainer"):
        buckets = trainer[0][1]
        if buckets is None:
            assert not any(e[0] == "launch" for e in trainer), "launched without --overlap-grad-reduce"
            continue
        trainers += 1
        assert len(buckets) > 2
        steps = _split(trainer[1:], "step")
        assert len(steps) == STEPS
        for step in steps:
            step = step[1:]
            ends = [i for i, e in enumerate(step) if e[0] == "backward end"]
            launches = [i for i, e in enumerate(step) if e[0] == "launch"]
            assert len(ends) == GLOBAL_BATCH // REFERENCE_MICRO_BATCH, step  # micro-batches per rank
            # each bucket once, in index order: the same sequence on every data-parallel rank (NCCL's need)
            assert [step[i][1] for i in launches] == buckets, step
            assert all(ends[-2] < i < ends[-1] for i in launches), step  # in the last backward
    return trainers


def _split(events: list[tuple], kind: str) -> list[list[tuple]]:
    """`events` cut before each event of `kind` (what precedes the first is dropped)."""
    starts = [i for i, e in enumerate(events) if e[0] == kind]
    return [events[a:b] for a, b in zip(starts, starts[1:] + [len(events)])]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_overlap_equals_reduction_after_backward(tiny_corpus, world):
    recorded = run_on_ranks(world, run_recorded, jobs(world, tiny_corpus))
    per_rank = [r["results"] for r in recorded]
    table = {}
    for layout, (_, cases) in LAYOUTS[world].items():
        for model, selection in cases:
            after, overlapped = ([r[(layout, model, selection, overlap)] for r in per_rank]
                                 for overlap in (False, True))
            assert [r["kept_fraction"] for r in overlapped[0]["records"]] == \
                [r["kept_fraction"] for r in after[0]["records"]]
            logged = max(relative(got[key], want[key]) for got, want in
                         zip(overlapped[0]["records"], after[0]["records"], strict=True) for key in COMPARED)
            after, overlapped = assemble(after), assemble(overlapped)
            params = max(float((overlapped[name] - want).abs().max() / want.abs().max())
                         for name, want in after.items())
            table[f"{layout} {model} {selection}"] = (logged, params)
    print("\n".join(f"| {label} | {logged:.1e} | {params:.1e} |" for label, (logged, params) in table.items()))
    assert all(logged <= 1e-6 for logged, _ in table.values()), table
    assert all(params <= 1e-12 for _, params in table.values()), table
    for rank in range(world):
        launching = check_launches(recorded[rank]["events"])
        assert launching == sum(len(cases) for _, cases in LAYOUTS[world].values())


def test_deepspeed_maps_the_flag_to_overlap_comm(tiny_corpus, tmp_path):
    def resolve(*extra: str) -> dict:
        cfg = parse_args(flags(tiny_corpus, 2, *extra))
        return deepspeed_config.resolve(cfg, validate_layout(cfg, 2))

    assert resolve("--zero-stage", "2", "--overlap-grad-reduce")["zero_optimization"]["overlap_comm"] is True
    with pytest.raises(UserError, match="--overlap-grad-reduce cannot run with ZeRO stage 1"):
        resolve("--zero-stage", "1", "--overlap-grad-reduce")
    path = Path(tmp_path, "ds.json")
    path.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": false}}')
    with pytest.raises(UserError, match="overlap_comm is False but --overlap-grad-reduce asks for it"):
        resolve("--deepspeed", "--deepspeed_config", str(path), "--overlap-grad-reduce")
