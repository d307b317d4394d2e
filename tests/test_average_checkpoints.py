"""tools/average_checkpoints.py: identical checkpoints average to themselves, two to their mean, ema:0 to
the last; loss weights follow exp(-loss) of the logged records; the output holds weights only and
continues training with --no-load-optim (and refuses a plain resume); bad input is one line."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.checkpoint.writer import write_checkpoint
from megatron_eslm.errors import UserError

from helpers import REPO, flags, run

sys.path.insert(0, os.path.join(REPO, "tools"))
import average_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def saved_run(tiny_corpus, tmp_path_factory):
    """A tiny run saved at iterations 1 to 4, with its metrics file."""
    tmp = tmp_path_factory.mktemp("average")
    save = str(tmp / "ckpt")
    run(flags(tiny_corpus, "--train-iters", "4", "--save", save, "--save-interval", "1",
              "--metrics-file", str(tmp / "metrics.jsonl")))
    return save


def average(load: str, save: str, *extra: str) -> None:
    average_checkpoints.main(["--load", load, "--save", save, *extra])


def refusal(capsys, load: str, *extra: str) -> str:
    """The one line the tool prints before exiting with code 2."""
    with pytest.raises(SystemExit, match="2"):
        average(load, *extra)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def assert_models_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_identical_checkpoints_average_to_themselves(saved_run, tmp_path):
    one = read_checkpoint(saved_run, 2, optimizer=False)
    copies = str(tmp_path / "copies")
    for iteration in (5, 6, 7):
        write_checkpoint(dataclasses.replace(one, iteration=iteration), copies, optimizer=False)
    for weights in ("uniform", "ema:0.7"):
        out = str(tmp_path / weights.replace(":", ""))
        average(copies, out, "--last", "3", "--weights", weights)
        assert_models_close(read_checkpoint(out, optimizer=False).model, one.model)


def test_two_checkpoints_average_to_their_mean_and_ema0_keeps_the_last(saved_run, tmp_path):
    first, second = (read_checkpoint(saved_run, it, optimizer=False) for it in (1, 2))
    mean = str(tmp_path / "mean")
    average(saved_run, mean, "--iterations", "1", "2")
    got = read_checkpoint(mean)
    assert got.moments is None and got.iteration == 2
    assert_models_close(got.model, {name: (first.model[name] + second.model[name]) / 2 for name in first.model})
    last = str(tmp_path / "ema0")
    average(saved_run, last, "--last", "3", "--weights", "ema:0")
    assert_models_close(read_checkpoint(last).model, read_checkpoint(saved_run, 4, optimizer=False).model)


def test_weights_follow_the_logged_losses(saved_run, tmp_path):
    checkpoints = [read_checkpoint(saved_run, it, optimizer=False) for it in (1, 2, 3)]
    records = [json.loads(line) for line in open(checkpoints[0].config.logging.metrics_file)]
    losses = [next(r["lm_loss"] for r in records if r.get("iteration") == it and "lm_loss" in r) for it in (1, 2, 3)]
    expected = [math.exp(-loss) / sum(math.exp(-x) for x in losses) for loss in losses]
    assert average_checkpoints.averaging_weights("loss", checkpoints) == pytest.approx(expected)
    # an evaluation at every checkpoint's iteration takes precedence over the training loss
    metrics = tmp_path / "with-eval.jsonl"
    evaluations = [{"iteration": it, "val_loss": loss} for it, loss in ((1, 3.0), (2, 2.0), (3, 1.0))]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records + evaluations))
    logging = dataclasses.replace(checkpoints[0].config.logging, metrics_file=str(metrics))
    evaluated = [dataclasses.replace(c, config=dataclasses.replace(c.config, logging=logging)) for c in checkpoints]
    norm = sum(math.exp(-v) for v in (3.0, 2.0, 1.0))
    assert average_checkpoints.averaging_weights("loss", evaluated) == pytest.approx(
        [math.exp(-v) / norm for v in (3.0, 2.0, 1.0)])
    # ema:0.5 over three: 0.25, 0.25, 0.5
    assert average_checkpoints.averaging_weights("ema:0.5", checkpoints) == pytest.approx([0.25, 0.25, 0.5])


def test_averaged_checkpoint_continues_training_without_its_optimizer(tiny_corpus, saved_run, tmp_path):
    out = str(tmp_path / "avg")
    average(saved_run, out, "--iterations", "2", "3", "--weights", "loss")  # resumes at 3 of 4
    _, records = run(flags(tiny_corpus, "--train-iters", "4", "--load", out, "--no-load-optim"))
    assert [r["iteration"] for r in records if "lm_loss" in r] == [4]
    with pytest.raises(UserError, match="weights only"):
        run(flags(tiny_corpus, "--train-iters", "4", "--load", out))


def test_bad_input_is_one_line(saved_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no checkpoint of iteration 9" in refusal(capsys, saved_run, out, "--iterations", "1", "9")
    assert "--last 5" in refusal(capsys, saved_run, out, "--last", "5")
    assert "--weights ema:1" in refusal(capsys, saved_run, out, "--last", "2", "--weights", "ema:1")
    other = read_checkpoint(saved_run, 1, optimizer=False)
    changed = dataclasses.replace(other.config, model=dataclasses.replace(other.config.model, hidden_dropout=0.0))
    mixed = str(tmp_path / "mixed")
    write_checkpoint(read_checkpoint(saved_run, 2, optimizer=False), mixed, optimizer=False)
    write_checkpoint(dataclasses.replace(other, config=changed, iteration=3), mixed, optimizer=False)
    assert "iterations 2 and 3 differ in hidden_dropout" in refusal(capsys, mixed, out, "--last", "2")
