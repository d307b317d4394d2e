"""Per-dataset evaluation (training/evaluation.py): a blend of validation datasets reports each dataset's
loss, perplexity and tokens, which average back (token-weighted) to the total, in the metrics file and in
TensorBoard; DP2 equals one process."""
from __future__ import annotations

import json

import pytest

from helpers import flags, pretrain_in_process, run
from rank_pool import run_on_ranks


def test_datasets_sum_back_to_the_total(tiny_corpus, two_corpora, tmp_path):
    (alpha, beta), _ = two_corpora
    metrics, tb = str(tmp_path / "m.jsonl"), str(tmp_path / "tb")
    run(flags(tiny_corpus, "--data-path", "0.3", alpha, "0.7", beta, "--eval-interval", "3", "--metrics-file",
              metrics, "--tensorboard-dir", tb))
    evals = [r for r in map(json.loads, open(metrics)) if r.get("split") == "valid"]
    assert [r["iteration"] for r in evals] == [3, 6]
    for record in evals:
        parts = record["datasets"]
        assert set(parts) == {"alpha", "beta"} and all(p["tokens"] > 0 for p in parts.values())
        tokens = sum(p["tokens"] for p in parts.values())
        total = sum(p["val_loss"] * p["tokens"] for p in parts.values()) / tokens
        assert total == pytest.approx(record["val_loss"], rel=1e-6)  # the total sums in float32 per micro-batch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(tb)
    events.Reload()
    assert {"valid/datasets/alpha/val_loss", "valid/datasets/beta/tokens"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_corpus, two_corpora, tmp_path):
    """pretrain's entry point in this process and on the session's two gloo ranks (tests/rank_pool.py)."""
    (alpha, beta), tokenizer = two_corpora
    records = []
    for ranks in (1, 2):
        metrics = str(tmp_path / f"m{ranks}.jsonl")
        argv = flags(tiny_corpus, "--data-path", "0.5", alpha, "0.5", beta, "--eval-interval", "3",
                     "--metrics-file", metrics, "--hidden-dropout", "0", "--attention-dropout", "0",
                     "--selection", "none", "--micro-batch-size", "2")
        if ranks == 1:
            pretrain_in_process(argv)
        else:
            run_on_ranks(2, pretrain_in_process, argv)
        records.append([r for r in map(json.loads, open(metrics)) if r.get("split") == "valid"])
    for one, two in zip(*records):
        for name in ("alpha", "beta"):
            assert one["datasets"][name]["tokens"] == two["datasets"][name]["tokens"]
            assert one["datasets"][name]["val_loss"] == pytest.approx(two["datasets"][name]["val_loss"], rel=1e-5)
        assert one["val_cvar90"] == pytest.approx(two["val_cvar90"], rel=1e-5)
