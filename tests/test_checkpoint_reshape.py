"""tools/reshape_checkpoint.py: a TP2 x PP2 checkpoint reshaped to TP1 x PP1 and to TP2 x PP1 trains its
next step exactly as the original layout does (losses and updated parameters), optimizer moments included;
the reader's whole tensors equal a one-process model's state_dict names and shapes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.errors import UserError

from helpers import REPO, launch_pretrain as pretrain


def reshape(load: str, save: str, tp: int, pp: int, iteration: int | None = None) -> None:
    argv = ["--load", load, "--save", save, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp)] + ([] if iteration is None else ["--iteration", str(iteration)])
    done = subprocess.run([sys.executable, "tools/reshape_checkpoint.py", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_reshaped_checkpoint_trains_like_the_original_layout(tiny_corpus, tmp_path, model):
    original = str(tmp_path / "tp2pp2")
    records = pretrain(tiny_corpus, tmp_path, 4, (2, 2), model, "--train-iters", "4", "--save", original,
                       "--save-interval", "3")
    expected = read_checkpoint(original, 4)
    tp1 = str(tmp_path / "tp1pp1")
    reshape(original, tp1, 1, 1, iteration=3)
    tp2 = str(tmp_path / "tp2pp1")
    reshape(tp1, tp2, 2, 1)
    for load, ranks, layout in ((tp1, 1, (1, 1)), (tp2, 2, (2, 1))):
        after = str(tmp_path / f"after-{layout[0]}{layout[1]}")
        step = pretrain(tiny_corpus, tmp_path, ranks, layout, model, "--train-iters", "4", "--load", load,
                        "--save", after)
        assert [r["iteration"] for r in step] == [4]
        assert step[0]["lm_loss"] == pytest.approx(records[-1]["lm_loss"], rel=1e-6, abs=1e-6)
        got = read_checkpoint(after)
        assert got.model.keys() == expected.model.keys()
        for name, value in expected.model.items():
            torch.testing.assert_close(got.model[name], value, rtol=1e-6, atol=1e-6, msg=name)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got.moments[name][key], expected.moments[name][key], rtol=1e-5,
                                           atol=1e-9, msg=f"{name} {key}")


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        read_checkpoint(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="latest_checkpointed_iteration.txt missing"):
        read_checkpoint(str(tmp_path / "empty"))
