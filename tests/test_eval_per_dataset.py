"""Per-dataset evaluation (training/evaluation.py): a blend of validation datasets reports each dataset's
loss, perplexity and tokens, which average back (token-weighted) to the total, in the metrics file and in
TensorBoard; DP2 equals one process."""
from __future__ import annotations

import json
import os

import pytest

from helpers import flags, run


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


def test_two_ranks_equal_one_process(tiny_corpus, two_corpora, tmp_path):
    from helpers import REPO
    import subprocess
    import sys
    (alpha, beta), tokenizer = two_corpora
    records = []
    for ranks in (1, 2):
        metrics = str(tmp_path / f"m{ranks}.jsonl")
        argv = flags(tiny_corpus, "--data-path", "0.5", alpha, "0.5", beta, "--eval-interval", "3",
                     "--metrics-file", metrics, "--hidden-dropout", "0", "--attention-dropout", "0",
                     "--selection", "none", "--micro-batch-size", "2")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"] \
            if ranks == 2 else [sys.executable]
        done = subprocess.run([*launcher, "-m", "megatron_eslm.pretrain", *argv], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        records.append([r for r in map(json.loads, open(metrics)) if r.get("split") == "valid"])
    for one, two in zip(*records):
        for name in ("alpha", "beta"):
            assert one["datasets"][name]["tokens"] == two["datasets"][name]["tokens"]
            assert one["datasets"][name]["val_loss"] == pytest.approx(two["datasets"][name]["val_loss"], rel=1e-5)
        assert one["val_cvar90"] == pytest.approx(two["val_cvar90"], rel=1e-5)
