"""--selection-warmup-iters N: dense training for N iterations, then the policy. The first N iterations
equal the dense run's (the feature's "switched off" twin), the policy takes over after them, and DP2
equals one process."""
from __future__ import annotations

import pytest

from helpers import flags, launch_pretrain, run
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError

WARMUP = 3
COMPARED = ("lm_loss", "grad_norm", "kept_fraction", "threshold", "lr")


@pytest.fixture(scope="module")
def dense(tiny_corpus):
    return run(flags(tiny_corpus, "--selection", "none"))[1]


@pytest.mark.parametrize("policy", [["--selection", "eslm"], ["--selection", "random"],
                                    ["--selection", "ada-eslm", "--ada-eslm-rule", "linear"],
                                    ["--selection", "lfr", "--lfr-learn-iters", "0", "--lfr-focus-iters", "5"]],
                         ids=["eslm", "random", "ada-eslm", "lfr"])
def test_warmup_is_dense_then_the_policy(tiny_corpus, dense, policy):
    records = run(flags(tiny_corpus, *policy, "--selection-warmup-iters", str(WARMUP)))[1]
    pick = lambda r: {key: r[key] for key in COMPARED}  # noqa: E731
    assert [pick(r) for r in records[:WARMUP]] == [pick(r) for r in dense[:WARMUP]]
    assert all(r["kept_fraction"] == 1.0 for r in records[:WARMUP])
    assert any(r["kept_fraction"] < 1.0 for r in records[WARMUP:])


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["dp2", "tp2", "pp2"])
def test_warmup_on_two_ranks_equals_one_process(tiny_corpus, tmp_path, layout):
    extra = ("--selection", "eslm", "--eslm-threshold", "exact", "--selection-warmup-iters", "2",
             "--train-iters", "4")
    # one threshold per micro-batch index over the replicas: one process sees DP x the micro-batch
    micro = ["--micro-batch-size", "4"] if layout == (1, 1) else []
    one = launch_pretrain(tiny_corpus, str(tmp_path), 1, (1, 1), "gpt2", *extra, *micro)
    two = launch_pretrain(tiny_corpus, str(tmp_path), 2, layout, "gpt2", *extra)
    assert [r["kept"] for r in one] == [r["kept"] for r in two]
    assert [r["kept_fraction"] for r in one][:2] == [1.0, 1.0]
    for a, b in zip(one, two):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--selection-warmup-iters", "-1"], "--selection-warmup-iters must be >= 0"),
    (["--selection", "none", "--selection-warmup-iters", "2"], "--selection-warmup-iters needs a --selection"),
])
def test_bad_values_in_one_line(tiny_corpus, argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags(tiny_corpus, *argv))
