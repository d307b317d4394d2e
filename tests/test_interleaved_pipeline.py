"""The interleaved 1F1B schedule (--num-layers-per-virtual-pipeline-stage): its timetable by construction
(Megatron's order, every op once, the bubble), its flags' one-line refusals, and on 4 gloo ranks PP2 x VP2
and TP2 x PP2 x VP2 with sequence parallelism against one process (as tests/test_parallel_training.py
compares layouts: float64 runs, logged numbers and parameters), with recompute and --overlap-grad-reduce
folded into one of them; a VP2 checkpoint resumes on VP1 (regrouped)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.errors import UserError
from megatron_eslm.pipeline_parallel.timetable import Op, idle_fraction, rank_order, timetable
from rank_pool import run_on_ranks
from test_parallel_training import (DTYPE, REFERENCE_MICRO_BATCH, SELECTIONS, check_equivalence, flags, layout_flags,
                                    relative, train, train_records)

INTERLEAVED = ["--num-layers", "4", "--global-batch-size", "16"]  # 4 micro-batches a step on PP2 x DP2
VP2 = ["--num-layers-per-virtual-pipeline-stage", "1"]  # 4 layers over PP2: 2 chunks of 1 layer a rank
POLICIES = {**SELECTIONS, "ada-eslm": ["--selection", "ada-eslm", "--eslm-alpha", "0.1", "--ada-eslm-budget", "0.2",
                                       "--ada-eslm-momentum", "0.5"]}
# layout -> (TP, PP, SP, extra flags, policies); 4 ranks: DP2 and DP1
LAYOUTS = {"pp2vp2": (1, 2, False, [], ("dense", "ada-eslm")),
           "pp2vp2-overlap-recompute": (1, 2, False, ["--overlap-grad-reduce", "--ddp-bucket-size", "3000",
                                                      "--recompute-granularity", "full", "--recompute-method",
                                                      "uniform", "--recompute-num-layers", "1"], ("eslm-loss",)),
           "tp2pp2vp2-sp": (2, 2, True, [], ("dense", "eslm-loss"))}
RESUME_TOLERANCE = 1e-5  # the regrouped state passes through the reader's float32


def test_timetable_is_megatrons_order():
    """Every rank runs each (chunk, micro-batch) forward and backward once, in Megatron's order: groups of
    PP micro-batches through chunk 0 then chunk 1, warmup (PP - rank - 1) x 2 + (VP - 1) x PP forwards."""
    pp, vp, m = 4, 2, 8
    for rank in range(pp):
        order = rank_order(pp, vp, m, rank, forward_only=False)
        assert [op for op in order if op.forward][:6] == [Op(True, 0, 0), Op(True, 0, 1), Op(True, 0, 2), Op(True, 0, 3), Op(True, 1, 0),
                             Op(True, 1, 1)]
        warmup = next(i for i, op in enumerate(order) if not op.forward)
        assert warmup == (pp - rank - 1) * 2 + (vp - 1) * pp + 1  # the warmup, then the first 1F1B forward
        ran = [op for step in timetable(pp, vp, m)[rank] if step is not None for op in step]
        assert ran == order and len(set(ran)) == 2 * vp * m
    assert [op.forward for op in rank_order(2, 2, 2, 0, False)][:4] == [True] * 4  # m = PP: all warmup


def test_bubble_by_construction():
    """The idle share of a rank's step (a backward two forwards long, an exchange waiting for both sides):
    plain 1F1B's (p-1)/(m+p-1), and interleaving's (p-1)/(vm+p-1), smaller, at PP4, m = 8
    (docs/parallelism.md); at PP2 x VP2 too, which one op a slot (a forward beside a backward in each
    exchange) had made 13/61, more than plain 1F1B's 1/9."""
    plain, interleaved = idle_fraction(4, 1, 8), idle_fraction(4, 2, 8)
    assert plain == pytest.approx(3 / 11) and interleaved == pytest.approx(3 / 19)
    assert interleaved < plain
    assert idle_fraction(2, 2, 8) == pytest.approx(1 / 17) and idle_fraction(2, 1, 8) == pytest.approx(1 / 9)


@pytest.mark.parametrize("extra,message", [
    (["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size",
      "12"], "the 3 micro-batches of a step"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--zero-stage", "1"],
     "does not run with --deepspeed"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
     "--recompute-num-layers 2 exceeds the 1 layers of a model chunk"),
    (["--num-layers-per-virtual-pipeline-stage", "0"], "--num-layers-per-virtual-pipeline-stage must be positive"),
])
def test_refusals(tiny_corpus, extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate_layout(parse_args([*flags(tiny_corpus, 2, *INTERLEAVED), *extra]), 4)


def resume_across(argv: list[str], save: str) -> tuple[list[dict], list[dict]]:
    """4 steps on VP2 saving at 2; steps 3-4 resumed from that checkpoint on VP1 (plain 1F1B)."""
    _, straight = train_records([*argv, *VP2, "--train-iters", "4", "--save", save, "--save-interval", "2"])
    if dist.get_rank() == 0:
        Path(save, "latest_checkpointed_iteration.txt").write_text("2\n")
    dist.barrier()
    _, vp1 = train_records([*argv, "--train-iters", "4", "--load", save])
    return straight, vp1


def run_jobs(jobs: list[tuple]) -> dict:
    """On every rank of the pool: each job's result under its name."""
    kinds = {"train": train, "resume": resume_across}
    return {name: kinds[kind](*args) for name, kind, *args in jobs}


@pytest.mark.slow
def test_interleaved_equals_one_process(tiny_corpus, tmp_path):
    cases, jobs = [], []
    for layout, (tp, pp, sp, extra, policies) in LAYOUTS.items():
        micro = REFERENCE_MICRO_BATCH * tp * pp // 4
        for policy in policies:
            cases.append(("gpt2", layout, policy))
            jobs.append((("gpt2", layout, policy), "train", flags(tiny_corpus, micro, *POLICIES[policy], *INTERLEAVED,
                                                                   *VP2, *extra, *layout_flags(tp, pp, sp)), DTYPE))
    resume = [*flags(tiny_corpus, 2, *POLICIES["eslm-loss"], *INTERLEAVED), *layout_flags(1, 2, False)]
    jobs.append(("resume", "resume", resume, str(tmp_path / "ckpt")))
    per_rank = run_on_ranks(4, run_jobs, jobs)
    references = {("gpt2", policy): train(flags(tiny_corpus, REFERENCE_MICRO_BATCH, *POLICIES[policy], *INTERLEAVED),
                                          DTYPE) for policy in {case[2] for case in cases}}
    check_equivalence(cases, per_rank, references)

    straight, vp1 = per_rank[0]["resume"]
    assert [r["iteration"] for r in vp1] == [3, 4]
    for got, want in zip(vp1, straight[2:]):
        assert got["kept_fraction"] == want["kept_fraction"]
        for key in ("lm_loss", "kept_loss", "threshold", "grad_norm"):
            assert relative(got[key], want[key]) <= RESUME_TOLERANCE, key
