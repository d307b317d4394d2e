"""The host-sync budget of a training step (megatron_eslm.host_syncs.py says what is counted).

On a GPU every scalar read, data-dependent shape and host-to-device scalar copy makes the host wait for the
queued kernels. The budget, per policy and threshold mode:
  dense micro-batch              0
  selective micro-batch          at most 2, both inherent (marked `host_syncs.inherent` in the code): the
                                 kept count that sizes the LM head's row backward, and in sketch-exact mode
                                 the width of the in-bracket window
  the rest of a step             0 (gradient sums, clipping, optimizer step with its skip of a non-finite
                                 step, metrics): the step's sums are read once per log interval, by
                                 `reduce_step_stats`. With the fused AdamW (CUDA's default); foreach and loop
                                 read the skip flag, 1 inherent per step
  anything not marked inherent   0
Counted over two optimizer steps of two micro-batches each, after a first step (which builds lazy state),
on one process and on 2-rank gloo layouts where the collectives are real.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from helpers import flags, run
from megatron_eslm.config import parse_args
from megatron_eslm.host_syncs import (DATA_DEPENDENT, DEVICE_TO_HOST, HOST_READ, INHERENT, SCALAR_READ,
                                      HostSyncCounter, inherent)
from megatron_eslm.training.step import optimizer_step
from megatron_eslm.training.trainer import Trainer
from test_parallel_training import LLAMA_FLAGS
from rank_pool import run_on_ranks

STEPS = 2
POLICIES = {
    "dense": ["--selection", "none"],
    "eslm-sketch": ["--selection", "eslm", "--eslm-threshold", "sketch"],
    "eslm-sketch-exact": ["--selection", "eslm", "--eslm-threshold", "sketch-exact"],
    "eslm-exact": ["--selection", "eslm", "--eslm-threshold", "exact"],
    "eslm-entropy": ["--selection", "eslm", "--eslm-score", "entropy"],
    "eslm-previous-step": ["--selection", "eslm", "--eslm-threshold-scope", "previous-step"],
    "random": ["--selection", "random"],
    # two row groups (weight 1, weight 1/p): two kept counts, with the exact threshold within the budget
    "eslm-is": ["--selection", "eslm-is", "--eslm-threshold", "exact"],
    "ada-eslm-grad-mass": ["--selection", "ada-eslm", "--ada-eslm-rule", "grad-mass"],
    "ada-eslm-linear": ["--selection", "ada-eslm", "--ada-eslm-rule", "linear"],
    "lfr-focus": ["--selection", "lfr", "--lfr-mode", "mask", "--lfr-learn-iters", "0", "--lfr-focus-iters", "5"],
    # a dense step that records, a focus phase's start that merges the table (inherent reads)
    "lfr-skip": ["--selection", "lfr", "--lfr-learn-iters", "1", "--lfr-focus-iters", "1", "--lfr-review-iters", "1"],
    # the scoring pass, the sequences' exact VaR, the kept ones gathered and trained: nothing read (micro-batches
    # of 2: the 4 kept are whole micro-batches of both DP2 replicas)
    "eslm-sequence": ["--selection", "eslm", "--eslm-granularity", "sequence", "--micro-batch-size", "2"],
    "random-sequence": ["--selection", "random", "--eslm-granularity", "sequence", "--micro-batch-size", "2"],
}


def count_step_syncs(argv: list[str]) -> tuple[HostSyncCounter, int]:
    """Syncs of STEPS optimizer steps after a first one, and the micro-batches they ran on this rank. With
    the fused AdamW (CUDA's default), which skips a non-finite step on the device, unless `argv` names
    another (`test_non_fused_optimizer_reads_the_skip_flag`)."""
    trainer = Trainer(parse_args(["--optimizer-impl", "fused", *argv]))
    loader = iter(trainer._loader(trainer.train_ds, len(trainer.train_ds), 0))
    batches = iter([next(loader) for _ in range((STEPS + 1) * trainer.num_micro_batches)])  # data: not counted
    stats = trainer.train_step(batches)
    with HostSyncCounter() as syncs:
        for _ in range(STEPS):
            stats = trainer.train_step(batches, stats)
    micro_batches = STEPS * trainer.num_micro_batches
    trainer.close()
    return syncs, micro_batches


def budget(name: str, micro_batches: int) -> int:
    return 0 if name == "dense" or name.endswith("-sequence") else 2 * micro_batches


def avoidable(syncs: HostSyncCounter) -> int:
    """Syncs outside the inherent ones. LFR reads its sample ids from the data loader's host tensor: host
    data, no device wait, so not counted."""
    lfr_ids = sum(n for place, n in syncs.by_place.items()
                  if place.startswith((f"{HOST_READ} at eslm/lfr.py", f"{HOST_READ} at eslm/lfr_skip.py")))
    return syncs.avoidable - lfr_ids


def assert_within_budget(name: str, syncs: HostSyncCounter, micro_batches: int) -> None:
    assert avoidable(syncs) == 0, f"{name}: {syncs.report()}"
    assert syncs.by_kind[INHERENT] <= budget(name, micro_batches), f"{name}: {syncs.report()}"


@pytest.mark.parametrize("name", POLICIES)
def test_one_process_step_within_budget(tiny_corpus, name):
    syncs, micro_batches = count_step_syncs(flags(tiny_corpus, "--log-interval", "100", *POLICIES[name]))
    assert_within_budget(name, syncs, micro_batches)
    if name in ("eslm-sketch", "eslm-exact"):  # only the kept-row count is read
        assert syncs.total == micro_batches, syncs.report()


def test_non_fused_optimizer_reads_the_skip_flag(tiny_corpus):
    """foreach (and loop) cannot skip a non-finite step on the device: exactly one inherent read per step."""
    syncs, _ = count_step_syncs(flags(tiny_corpus, "--log-interval", "100", "--optimizer-impl", "foreach",
                                      *POLICIES["dense"]))
    assert syncs.by_place == {f"{INHERENT} at training/step.py:{optimizer_step_read()}": STEPS}, syncs.report()


def optimizer_step_read() -> int:
    """The line of `optimizer_step` that reads the skip flag."""
    lines, first = inspect.getsourcelines(optimizer_step)
    return first + next(i for i, line in enumerate(lines) if "bool(found_inf)" in line)


@pytest.fixture(scope="module")
def frozen_checkpoint(tiny_corpus, tmp_path_factory):
    """A tiny trained checkpoint: the teacher of eslm-kd and the reference of rho1."""
    save = str(tmp_path_factory.mktemp("frozen") / "ckpt")
    run(flags(tiny_corpus, "--selection", "none", "--train-iters", "1", "--lr-warmup-iters", "0", "--save", save))
    return save


@pytest.mark.parametrize("policy", ["eslm-kd", "rho1"])
def test_frozen_model_policies_within_budget(tiny_corpus, frozen_checkpoint, policy):
    load_flag = "--teacher-load" if policy == "eslm-kd" else "--reference-load"
    syncs, micro_batches = count_step_syncs(flags(tiny_corpus, "--log-interval", "100", "--selection", policy,
                                                  load_flag, frozen_checkpoint))
    assert_within_budget(policy, syncs, micro_batches)


LAYOUTS = {"dp2": [], "dp2-overlap": ["--overlap-grad-reduce"], "tp2": ["--tensor-model-parallel-size", "2"],
           "pp2": ["--pipeline-model-parallel-size", "2"],
           # the Llama-shaped model: grouped-query attention, rotary tables, RMSNorm, the untied vocab-parallel head
           "llama-tp2-sp": [*LLAMA_FLAGS, "--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "llama-pp2": [*LLAMA_FLAGS, "--pipeline-model-parallel-size", "2"],
           # context parallelism: the keys' and values' all-gather and reduce-scatter, global positions, the
           # data x context sums launched from the backward, the attention core recomputed
           "llama-cp2": [*LLAMA_FLAGS, "--context-parallel-size", "2", "--hidden-dropout", "0", "--attention-dropout",
                         "0", "--overlap-grad-reduce", "--recompute-granularity", "selective"]}
MULTI = ["dense", "eslm-sketch-exact", "eslm-exact", "ada-eslm-grad-mass"]


def two_rank_syncs(corpus: tuple[str, str]) -> list[str]:
    """On every rank of a 2-rank pool (tests/rank_pool.py): one line per layout and policy, the syncs of a
    step."""
    lines = []
    for layout, layout_flags in LAYOUTS.items():
        for name in MULTI + (["eslm-sequence"] if "cp2" not in layout else []):  # refused with CP
            syncs, micro_batches = count_step_syncs(flags(corpus, "--log-interval", "100", *layout_flags,
                                                          *POLICIES[name]))
            lines.append(f"{layout} {name} {avoidable(syncs)} {syncs.by_kind[INHERENT]} {micro_batches} "
                         f"{syncs.report()}")
    return lines


@pytest.mark.slow
def test_two_ranks_within_budget(tiny_corpus):
    """Real collectives (the selection group's all-gathers and all-reduces, TP's vocab-parallel head, the
    pipeline's sends, the data-parallel sums launched from the backward) add no sync: the budget holds on
    every rank of DP2 (with and without --overlap-grad-reduce), TP2 and PP2, and for the
    Llama-shaped model on TP2 with sequence parallelism, PP2 and CP2."""
    for rank, lines in enumerate(run_on_ranks(2, two_rank_syncs, tiny_corpus)):
        for line in lines:
            layout, name, other, inherent, micro_batches, report = (line.split(" ", 5) + [""])[:6]
            label = f"rank {rank} {layout} {name}: {report}"
            assert int(other) == 0 and int(inherent) <= budget(name, int(micro_batches)), label


def test_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        float(x.sum())
        x[x > 2].sum()
        x.nonzero()
        x.tolist()
        torch.tensor(3.0)
        torch.where(x > 2, x, 0.0).sum()  # none: a device select with a Python scalar operand
    assert syncs.by_kind == {"scalar read": 1, "data-dependent shape": 2, "host read": 1, "host-to-device": 1}
    with HostSyncCounter() as marked:
        with inherent("a test"):
            float(x.sum())
    assert marked.by_kind == {INHERENT: 1} and marked.avoidable == 0
    x.tolist()  # the wrapper is gone after the block
    assert syncs.by_kind[HOST_READ] == 1


REPEATS = torch.tensor([1, 2, 0, 1, 1, 1])
SYNCS = {  # name -> (a call on the tensor x, the kind it counts as; None: not a sync)
    "equal": (lambda x: torch.equal(x, x), SCALAR_READ),
    "allclose": (lambda x: torch.allclose(x, x), SCALAR_READ),
    "cpu": (lambda x: x.cpu(), DEVICE_TO_HOST),
    "to-cpu": (lambda x: x.to("cpu"), DEVICE_TO_HOST),
    "to-device-cpu-dtype": (lambda x: x.to(device="cpu", dtype=torch.float64), DEVICE_TO_HOST),
    "repeat-interleave": (lambda x: torch.repeat_interleave(x, REPEATS), DATA_DEPENDENT),
    "repeat-interleave-output-size": (lambda x: torch.repeat_interleave(x, REPEATS, output_size=6), None),
    "repeat-interleave-int": (lambda x: torch.repeat_interleave(x, 2), None),
    "to-dtype": (lambda x: x.to(torch.float64), None),
    # the step's copy of host data to its compute device (on a GPU run host-to-device, asynchronous)
    "to-device-object": (lambda x: x.to(torch.device("cpu"), non_blocking=True), None),
}


@pytest.mark.parametrize("name", SYNCS)
def test_counter_sees_syncs_outside_the_scalar_reads(name):
    """torch.equal / torch.allclose return a bool, `.cpu()` / `.to("cpu")` copy to the host, and
    repeat_interleave with tensor repeats sizes its output from their sum; each is one sync."""
    call, kind = SYNCS[name]
    original_to = torch.Tensor.to
    with HostSyncCounter() as syncs:
        call(torch.arange(6.0))
    assert syncs.by_kind == ({kind: 1} if kind else {}), syncs.report()
    assert torch.Tensor.to is original_to


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize("name", ["dense", "eslm-sketch", "eslm-sketch-exact", "eslm-exact", "ada-eslm-grad-mass",
                                  "eslm-is", "eslm-sequence"])
@pytest.mark.parametrize("extra", [[], ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                        "--recompute-num-layers", "1", "--bf16"]],
                         ids=["plain", "recompute-bf16"])
def test_cuda_step_passes_sync_debug_mode(tiny_corpus, name, extra):
    """The same steps on a GPU under torch.cuda.set_sync_debug_mode("error"): any sync outside the
    `host_syncs.inherent` blocks raises (tools/device_check.sh runs this); also under full recompute in
    bf16 (the recompute's RNG replay must not read the device either)."""
    trainer = Trainer(parse_args(flags(tiny_corpus, "--log-interval", "100", *POLICIES[name], *extra)))
    loader = iter(trainer._loader(trainer.train_ds, len(trainer.train_ds), 0))
    batches = iter([next(loader) for _ in range((STEPS + 1) * trainer.num_micro_batches)])
    stats = trainer.train_step(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(STEPS):
            stats = trainer.train_step(batches, stats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.close()
