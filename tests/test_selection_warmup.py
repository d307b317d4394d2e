"""--selection-warmup-iters N: dense training for N iterations, then the policy. The first N iterations
equal the dense run's (the feature's "switched off" twin), the policy takes over after them, and DP2
equals one process."""
from __future__ import annotations

import pytest

import test_parallel_training as tpt
from helpers import flags, run
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError

WARMUP = 3
COMPARED = ("lm_loss", "grad_norm", "kept_fraction", "threshold", "lr")


@pytest.fixture(scope="module")
def dense(tiny_corpus):
    return run(flags(tiny_corpus, "--selection", "none"))[1]


@pytest.mark.parametrize("policy", [["--selection", "eslm"], ["--selection", "random"],
                                    ["--selection", "ada-eslm", "--ada-eslm-rule", "linear"],
                                    ["--selection", "lfr", "--lfr-mode", "mask", "--lfr-learn-iters", "0",
                                     "--lfr-focus-iters", "5"]],
                         ids=["eslm", "random", "ada-eslm", "lfr"])
def test_warmup_is_dense_then_the_policy(tiny_corpus, dense, policy):
    records = run(flags(tiny_corpus, *policy, "--selection-warmup-iters", str(WARMUP)))[1]
    pick = lambda r: {key: r[key] for key in COMPARED}  # noqa: E731
    assert [pick(r) for r in records[:WARMUP]] == [pick(r) for r in dense[:WARMUP]]
    assert all(r["kept_fraction"] == 1.0 for r in records[:WARMUP])
    assert any(r["kept_fraction"] < 1.0 for r in records[WARMUP:])


@pytest.mark.slow
def test_warmup_on_two_ranks_equals_one_process(tiny_corpus):
    """DP2, TP2 and PP2 against one process (one threshold per micro-batch index over the replicas): logged
    numbers in float32, kept fractions exactly, parameters in float64; dense for the first iteration, ESLM
    for the other two."""
    records = tpt.equal_to_one_process(tiny_corpus, 2, tpt.TWO_RANK_BASICS,
                                       ["--selection", "eslm", "--eslm-threshold", "exact", "--selection-warmup-iters",
                                        "1"])
    assert records[0]["kept_fraction"] == 1.0 and all(r["kept_fraction"] < 1.0 for r in records[1:])


@pytest.mark.parametrize("argv, message", [
    (["--selection-warmup-iters", "-1"], "--selection-warmup-iters must be >= 0"),
    (["--selection", "none", "--selection-warmup-iters", "2"], "--selection-warmup-iters needs a --selection"),
])
def test_bad_values_in_one_line(tiny_corpus, argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags(tiny_corpus, *argv))
