"""The selection family under data, tensor and pipeline parallelism, against one process on the same
global batch (the harness of test_parallel_training.py: one spawn runs every job, the references are
one-process runs with DP x the micro-batch):

  DP2       ada-eslm (grad-mass), lfr, rho1 and eslm-kd (rho1 and eslm-kd need a whole frozen model on
            every rank, so they take data and context parallelism only)
  TP2, PP2  ada-eslm and lfr
  CP2       rho1 and eslm-kd (the frozen model runs under context parallelism too); lfr is refused
            under CP (tests/test_context_parallel.py), ada-eslm is in that file's table

In float64, the logged numbers, the kept fraction and the parameters as test_parallel_training.py
compares them.
Random selection draws other tokens on each replica than one process would, so under DP2 and CP2 it is
checked for what it promises instead: ESLM's kept fraction on the same batch, finite losses, equal replicas.
"""
from __future__ import annotations

import math

import pytest
import torch

from test_parallel_training import (DTYPE, LOGGED_TOLERANCE, PARAMETER_TOLERANCE, REFERENCE_MICRO_BATCH, SELECTIONS,
                                    STEPS, assemble, flags, layout_flags, parameter_difference, record_difference,
                                    spawn, train, untimed)

WORLD = 2
LAYOUTS = {"dp2": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "cp2": (1, 1, 2)}  # (tp, pp, cp)
MODEL_PARALLEL = ("ada-eslm", "lfr")  # the policies that also run under TP and PP
CONTEXT_PARALLEL = ("rho1", "eslm-kd", "eslm-kd-teacher")  # run under CP here


def policies(checkpoint: str) -> dict[str, list[str]]:
    return {
        # alpha starts at 0.1 and moves toward the level every micro-batch. At budget 0.2 the group's
        # droppable count (25 of 128 tokens at the start) is not the sum of the replicas' (12 + 12 of 64)
        "ada-eslm": ["--selection", "ada-eslm", "--eslm-alpha", "0.1", "--ada-eslm-budget", "0.2",
                     "--ada-eslm-momentum", "0.5"],
        # step 1 learn, steps 2-3 focus over a window that holds the previous step's samples too. No warmup:
        # the first update runs at the initial rate (Megatron's timing), 0 under a warmup, and then a focus
        # step scored with the untrained model dropped nothing here
        "lfr": ["--selection", "lfr", "--lfr-mode", "mask", "--lfr-learn-iters", "1", "--lfr-focus-iters", "2",
                "--lfr-review-iters", "2", "--lfr-drop-fraction", "0.3", "--lr-warmup-iters", "0"],
        "rho1": ["--selection", "rho1", "--eslm-alpha", "0.5", "--reference-load", checkpoint],
        # KD scored by the student's loss, and by the teacher's entropy. Not by the student's entropy: after
        # step 1 the DP2 and one-process students differ by float32 round-off, and at alpha 0.5 one token's
        # entropy came out 1 ulp lower under DP2, tied with the threshold and was kept too (the tie rule),
        # one token more than one process keeps (float64 agrees). The teacher's scores do not drift.
        "eslm-kd": ["--selection", "eslm-kd", "--eslm-alpha", "0.5", "--eslm-score", "loss",
                    "--teacher-load", checkpoint, "--kd-alpha", "0.5", "--kd-temperature", "2"],
        "eslm-kd-teacher": ["--selection", "eslm-kd", "--eslm-alpha", "0.5", "--eslm-score", "entropy",
                            "--kd-score", "teacher", "--teacher-load", checkpoint, "--kd-alpha", "0.5"],
    }


def cases() -> list[tuple[str, str]]:
    return [(layout, policy) for layout in LAYOUTS for policy in policies("")
            if layout == "dp2" or policy in (CONTEXT_PARALLEL if layout == "cp2" else MODEL_PARALLEL)]


def layout_argv(corpus, layout: str, *extra: str) -> list[str]:
    """A run of `layout` on WORLD ranks whose data-parallel replicas together take the reference's micro-batch."""
    tp, pp, cp = LAYOUTS[layout]
    return flags(corpus, REFERENCE_MICRO_BATCH // (WORLD // (tp * pp * cp)), *extra, *layout_flags(tp, pp, False),
                 "--context-parallel-size", str(cp))


RANDOM = ["--selection", "random", *SELECTIONS["eslm-loss"][2:]]  # eslm-loss's alpha and score


@pytest.fixture(scope="module")
def frozen_checkpoint(tiny_corpus, tmp_path_factory):
    """A dense model of another size trained briefly: the rho1 reference and the eslm-kd teacher."""
    save = str(tmp_path_factory.mktemp("frozen") / "ckpt")
    torch.set_num_threads(1)
    train(flags(tiny_corpus, REFERENCE_MICRO_BATCH, "--selection", "none", "--num-layers", "1",
                "--hidden-size", "48", "--train-iters", "4", "--save", save), torch.float32)
    return save


@pytest.mark.slow
def test_policies_on_two_ranks(tiny_corpus, frozen_checkpoint, tmp_path):
    argv = policies(frozen_checkpoint)
    torch.set_num_threads(1)
    references = {policy: train(flags(tiny_corpus, REFERENCE_MICRO_BATCH, *argv[policy]), DTYPE) for policy in argv}
    eslm = train(flags(tiny_corpus, REFERENCE_MICRO_BATCH, *SELECTIONS["eslm-loss"]), torch.float32)

    jobs = [((layout, policy), "train", layout_argv(tiny_corpus, layout, *argv[policy]), DTYPE)
            for layout, policy in cases()]
    jobs += [((layout, "random"), "train", layout_argv(tiny_corpus, layout, *RANDOM), torch.float32)
             for layout in ("dp2", "cp2")]
    per_rank = spawn(WORLD, jobs)

    table, failures = {}, []
    for layout, policy in cases():
        label = f"{layout} {policy}"
        results = [r[(layout, policy)] for r in per_rank]
        try:
            logged = record_difference(results[0], references[policy])
            params = parameter_difference(results, references[policy])
        except AssertionError as err:  # e.g. a kept fraction that differs: report every case, then fail
            failures.append(f"{label}: {err}")
            continue
        table[label] = (logged, params)
        if logged > LOGGED_TOLERANCE:
            failures.append(f"{label}: logged numbers differ by {logged:.2e}")
        if params > PARAMETER_TOLERANCE:
            failures.append(f"{label}: parameters differ by {params:.2e}")
    print("\n| case | logged | params |\n|---|---|---|")
    print("\n".join(f"| {k} | {a:.1e} | {b:.1e} |" for k, (a, b) in table.items()))
    assert not failures, "\n".join(failures)

    # The cases exercise what they are meant to: alpha moved, focus steps dropped samples, selection kept
    # part of the batch.
    kept = {policy: [r["kept_fraction"] for r in references[policy]["records"]] for policy in argv}
    assert len(set(kept["ada-eslm"])) == STEPS
    assert kept["lfr"][0] == 1.0 and all(f < 1.0 for f in kept["lfr"][1:])
    assert all(0.0 < f < 1.0 for policy in ("rho1", "eslm-kd", "eslm-kd-teacher") for f in kept[policy])

    # random: ESLM's kept count on the same batch, trained on, the replicas kept equal
    for layout in ("dp2", "cp2"):
        random = [r[(layout, "random")] for r in per_rank]
        assert [r["kept_fraction"] for r in random[0]["records"]] == [r["kept_fraction"] for r in eslm["records"]]
        assert all(math.isfinite(r[key]) for r in random[0]["records"] for key in ("lm_loss", "kept_loss", "grad_norm"))
        assert math.isfinite(random[0]["val_loss"])
        assert random[0]["records"][-1]["lm_loss"] < random[0]["records"][0]["lm_loss"]
        assert untimed(random[0]["records"]) == untimed(random[1]["records"])
        assemble(random)  # replicas bitwise equal
