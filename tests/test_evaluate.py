"""`python -m megatron_eslm.evaluate` (megatron_eslm/evaluate.py): a checkpoint evaluated without training
gives the record the run's own evaluation wrote at that iteration; other validation data by flag; bad
input in one line."""
from __future__ import annotations

import json

import pytest

from helpers import flags, run
from megatron_eslm import evaluate

COMPARED = ("iteration", "val_loss", "val_ppl", "samples", "val_cvar50", "val_cvar90")


def final_eval(metrics: str) -> dict:
    return [r for r in map(json.loads, open(metrics)) if r.get("split") == "valid"][-1]


def evaluated(capsys, argv: list[str]) -> dict:
    evaluate.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_equals_the_in_training_evaluation(tiny_corpus, tmp_path, capsys):
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    run(flags(tiny_corpus, "--save", save, "--metrics-file", metrics))
    record = evaluated(capsys, ["--load", save, "--metrics-file", str(tmp_path / "eval.jsonl")])
    expected = final_eval(metrics)
    assert {k: record[k] for k in COMPARED} == pytest.approx({k: expected[k] for k in COMPARED}, rel=1e-6)
    assert final_eval(str(tmp_path / "eval.jsonl")) == record


def test_a_blend_of_other_validation_data(tiny_corpus, two_corpora, tmp_path, capsys):
    (alpha, beta), _ = two_corpora
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    run(flags(tiny_corpus, "--data-path", "0.3", alpha, "0.7", beta, "--save", save, "--metrics-file", metrics))
    expected = final_eval(metrics)
    same = evaluated(capsys, ["--load", save])
    for name in ("alpha", "beta"):
        assert same["datasets"][name]["tokens"] == expected["datasets"][name]["tokens"]
        assert same["datasets"][name]["val_loss"] == pytest.approx(expected["datasets"][name]["val_loss"], rel=1e-6)
    other = evaluated(capsys, ["--load", save, "--valid-data-path", "1", alpha, "1", beta, "--eval-iters", "1"])
    assert set(other["datasets"]) == {"alpha", "beta"} and other["samples"] == 8


@pytest.mark.parametrize("argv, message", [
    (["--eval-iters", "0"], "--eval-iters must be positive"),
    (["--valid-data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
])
def test_bad_input_in_one_line(tiny_corpus, tmp_path, capsys, argv, message):
    save = str(tmp_path / "ckpt")
    run(flags(tiny_corpus, "--save", save, "--train-iters", "2"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--load", save, *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and message in lines[0]
