"""The interleaved 1F1B schedule (--num-layers-per-virtual-pipeline-stage): its timetable by construction,
its flags' refusals, and PP2 x VP2 (and with TP2 + sequence parallelism) on 4 gloo ranks against one
process, as tests/test_parallel_training.py compares layouts."""
from __future__ import annotations

import pytest

from test_parallel_training import (DTYPE, SELECTIONS, check_equivalence, flags, layout_flags, spawn, train)

INTERLEAVED = ["--num-layers", "4", "--global-batch-size", "16"]  # 4 micro-batches a step on PP2 x DP2
VP2 = ["--num-layers-per-virtual-pipeline-stage", "1"]
POLICIES = {**SELECTIONS, "ada-eslm": ["--selection", "ada-eslm", "--eslm-alpha", "0.1", "--ada-eslm-budget", "0.2",
                                       "--ada-eslm-momentum", "0.5"]}
LAYOUTS = {"pp2vp2": (1, 2, False), "tp2pp2vp2-sp": (2, 2, True)}  # 4 ranks: DP2 and DP1


@pytest.mark.slow
def test_interleaved_equals_one_process(tiny_corpus):
    cases = [("gpt2", layout, policy) for layout in LAYOUTS for policy in ("dense", "eslm-loss", "ada-eslm")]
    jobs = []
    for model, layout, policy in cases:
        tp, pp, sp = LAYOUTS[layout]
        micro = 4 // (4 // (tp * pp))
        jobs.append(((model, layout, policy), "train",
                     flags(tiny_corpus, micro, *POLICIES[policy], *INTERLEAVED, *VP2, *layout_flags(tp, pp, sp)), DTYPE))
    references = {("gpt2", policy): train(flags(tiny_corpus, 4, *POLICIES[policy], *INTERLEAVED), DTYPE)
                  for policy in ("dense", "eslm-loss", "ada-eslm")}
    check_equivalence(cases, spawn(4, jobs), references)
