"""Continual pretraining flags (docs/continual.md): --finetune loads the weights only and restarts the
counters and the schedule; --no-load-optim keeps them but starts fresh moments; a changed schedule is
refused unless --override-opt_param-scheduler; a loaded run re-warms at its own iteration
(--lr-schedule-start-iter, --lr-warmup-init) exactly by the formula; a WSD decay branched off a stable-phase
checkpoint equals the uninterrupted WSD run."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import flags, run, without_timing
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.training.lr_schedule import learning_rate
from megatron_eslm.training.trainer import Trainer


@pytest.fixture(scope="module")
def stable(tiny_corpus, tmp_path_factory):
    """3 iterations saved at the end: the checkpoint every test loads."""
    save = str(tmp_path_factory.mktemp("continual") / "ckpt")
    trainer, _ = run(flags(tiny_corpus, "--train-iters", "3", "--save", save))
    return save, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def loaded(tiny_corpus, save: str, *extra: str) -> Trainer:
    return Trainer(parse_args(flags(tiny_corpus, "--load", save, *extra)), log=lambda *a: None)


def test_finetune_takes_the_weights_and_restarts_the_schedule(tiny_corpus, stable):
    save, weights = stable
    trainer = loaded(tiny_corpus, save, "--finetune", "--train-iters", "2", "--lr", "1e-3", "--lr-warmup-iters", "2")
    assert trainer.iteration == 0 and trainer.consumed_samples == 0 and not trainer.optimizer.state
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())
    records = [r for r in trainer.train() if "lm_loss" in r]
    trainer.close()
    assert [r["iteration"] for r in records] == [1, 2]
    # Megatron's schedule: update k runs at the rate after k - 1 updates
    assert [r["lr"] for r in records] == [learning_rate(trainer.cfg.optimizer, step) for step in (0, 1)] == [0.0, 5e-4]


def test_no_load_optim_keeps_the_counters_with_fresh_moments(tiny_corpus, stable):
    save, weights = stable
    trainer = loaded(tiny_corpus, save, "--no-load-optim", "--train-iters", "6", "--override-opt_param-scheduler")
    assert trainer.iteration == 3 and trainer.consumed_samples == 24 and not trainer.optimizer.state
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())
    trainer.close()


def test_changed_schedule_needs_override(tiny_corpus, stable):
    save, _ = stable
    with pytest.raises(UserError, match="--lr 0.003, this run 0.001; pass --override-opt_param-scheduler"):
        loaded(tiny_corpus, save, "--train-iters", "6", "--lr", "1e-3")
    trainer = loaded(tiny_corpus, save, "--train-iters", "6", "--lr", "1e-3", "--override-opt_param-scheduler")
    records = [r for r in trainer.train() if "lm_loss" in r]
    trainer.close()
    assert [r["lr"] for r in records] == [learning_rate(trainer.cfg.optimizer, step) for step in (3, 4, 5)]


def test_rewarm_at_the_loaded_iteration_follows_the_formula(tiny_corpus, stable):
    """Loaded at iteration 3 with its moments: warm up from 3e-4 to 1e-3 over two steps, then cosine to 1e-4
    at step 7; updates 4-7 run at the rates after steps 3-6 (Megatron's), written out by hand."""
    save, _ = stable
    rewarm = ["--train-iters", "7", "--override-opt_param-scheduler", "--lr-schedule-start-iter", "3",
              "--lr-warmup-init", "3e-4", "--lr-warmup-iters", "2", "--lr", "1e-3", "--min-lr", "1e-4"]
    trainer = loaded(tiny_corpus, save, *rewarm)
    assert trainer.optimizer.state  # the moments are the checkpoint's
    lrs = [r["lr"] for r in trainer.train() if "lm_loss" in r]
    trainer.close()
    cosine = 1e-4 + 9e-4 * 0.5 * (math.cos(math.pi * 0.5) + 1.0)
    assert lrs == pytest.approx([3e-4, 3e-4 + 7e-4 / 2, 1e-3, cosine], rel=1e-12, abs=0)
    assert lrs == [learning_rate(trainer.cfg.optimizer, step) for step in (3, 4, 5, 6)]
    with pytest.raises(UserError, match="--lr-schedule-start-iter 4 is after the iteration this run starts from, 3"):
        loaded(tiny_corpus, save, "--train-iters", "7", "--override-opt_param-scheduler",
               "--lr-schedule-start-iter", "4")


def test_wsd_decay_branch_equals_the_uninterrupted_run(tiny_corpus, tmp_path):
    """A stable phase planned to decay at iteration 17 (of --lr-decay-iters 20), its checkpoint of
    iteration 4 branched into a decay over iterations 6-8: the same records and weights as one WSD run
    whose decay is its last 3 iterations. Both keep --train-iters 8, the data plan: the samples are served
    in a permutation of exactly the planned number (`data/gpt_dataset.py`; docs/continual.md)."""
    wsd = ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3", "--min-lr", "3e-4", "--train-iters", "8"]
    straight, records = run(flags(tiny_corpus, *wsd))
    save = str(tmp_path / "stable")
    run(flags(tiny_corpus, *wsd, "--lr-decay-iters", "20", "--save", save, "--save-interval", "4"))
    (tmp_path / "stable" / "latest_checkpointed_iteration.txt").write_text("4\n")  # branch off iteration 4
    branch, branched = run(flags(tiny_corpus, *wsd, "--load", save, "--override-opt_param-scheduler"))
    assert without_timing(branched) == without_timing([r for r in records if r["iteration"] > 4])
    # the last update runs at the rate after 7 updates: a third of the way above --min-lr (Megatron's)
    assert [r["lr"] for r in branched if "lm_loss" in r][-1] == pytest.approx(3e-4 + (3e-3 - 3e-4) / 3)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(branch.model.state_dict()[k], v), k


@pytest.mark.parametrize("bad, message", [
    (["--finetune"], "--finetune needs --load"),
    (["--lr-warmup-init", "1"], r"--lr-warmup-init 1.0 must be in \[0, --lr 0.003\]"),
    (["--lr-schedule-start-iter", "6"], r"--lr-schedule-start-iter 6 must be in \[0, --lr-decay-iters 6\)"),
    (["--lr-schedule-start-iter", "5"], "--lr-warmup-iters 2 must be in"),
])
def test_bad_flags_are_refused_in_one_line(tiny_corpus, bad, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags(tiny_corpus, *bad))
