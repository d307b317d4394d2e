"""`python -m megatron_eslm.evaluate` (megatron_eslm/evaluate.py): a checkpoint evaluated without training
gives the record the run's own evaluation wrote at that iteration; other validation data by flag; bad
input in one line, a tokenizer that moved since the run included (it and generate name where the path
came from and the flag that overrides it)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import flags, run
from megatron_eslm import evaluate, generate

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


def test_a_moved_tokenizer_names_the_checkpoint_and_the_flag(tiny_corpus, tmp_path, capsys):
    """The run recorded its --tokenizer-model; once that file has moved, evaluate and generate stop in one
    line naming the path, the --load it was recorded in and the flag; given the flag, they run."""
    save, recorded, moved = str(tmp_path / "ckpt"), str(tmp_path / "tok.model"), str(tmp_path / "moved.model")
    shutil.copy(tiny_corpus[1], recorded)
    run(flags(tiny_corpus, "--tokenizer-model", recorded, "--save", save, "--train-iters", "2"))
    os.rename(recorded, moved)
    capsys.readouterr()
    prompt = ["--prompt", "the king", "--max-new-tokens", "2"]
    for main, argv in ((evaluate.main, []), (generate.main, prompt)):
        with pytest.raises(SystemExit) as err:
            main(["--load", save, *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and lines == [
            f"error: --tokenizer-model {recorded}, recorded in the checkpoint --load {save}, does not exist here (a "
            "relative path is relative to where that run started); give --tokenizer-model to override it"], lines
    assert evaluated(capsys, ["--load", save, "--tokenizer-model", moved])["iteration"] == 2
    generate.main(["--load", save, "--tokenizer-model", moved, *prompt])
    assert capsys.readouterr().out.strip()  # the continuation
