"""tools/reshape_checkpoint.py: a TP2 x PP2 checkpoint reshaped to TP1 x PP1 and to TP2 x PP1 trains its
next step exactly as the original layout does (losses, updated parameters and moments), GPT-2 and Llama
shaped; reshaped back to TP2 x PP2 it is the original bit for bit. The runs have no dropout and the
default ESLM selection (it draws no random numbers), so the reshaped checkpoints' fresh RNG (seeded from
--seed) does not matter; --make-vocab-size-divisible-by 32 pads the vocabulary to 320 rows at TP1 and TP2
alike, since the LM head's softmax includes the padding rows. Also: the reader's one-line errors, the
data-parallel and RNG rule of the trainer's load, and layouts the model does not divide."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from megatron_eslm import parallel_state
from megatron_eslm.checkpoint.full_state import FullCheckpoint
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.checkpoint.regroup import regrouped_state
from megatron_eslm.checkpoint.writer import write_checkpoint
from megatron_eslm.errors import UserError
from megatron_eslm.parallel_state import Layout
from megatron_eslm.training.checkpointing import load_checkpoint

from helpers import REPO, flags, launch_pretrain as pretrain, run

sys.path.insert(0, os.path.join(REPO, "tools"))
import reshape_checkpoint  # noqa: E402


def reshape(load: str, save: str, tp: int, pp: int, iteration: int | None = None) -> None:
    """The tool in this process (a subprocess per call would cost more than the reshape)."""
    reshape_checkpoint.main(["--load", load, "--save", save, "--tensor-model-parallel-size", str(tp),
                             "--pipeline-model-parallel-size", str(pp),
                             *([] if iteration is None else ["--iteration", str(iteration)])])


@pytest.mark.slow
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
    back = str(tmp_path / "back")
    reshape(tp2, back, 2, 2)  # and back to the original layout: the same tensors, bit for bit
    assert_same(read_checkpoint(back), read_checkpoint(original, 3), exact=True)
    for load, ranks, layout in ((tp1, 1, (1, 1)), (tp2, 2, (2, 1))):
        after = str(tmp_path / f"after-{layout[0]}{layout[1]}")
        step = pretrain(tiny_corpus, tmp_path, ranks, layout, model, "--train-iters", "4", "--load", load,
                        "--save", after)
        assert [r["iteration"] for r in step] == [4]
        assert step[0]["lm_loss"] == pytest.approx(records[-1]["lm_loss"], rel=1e-6, abs=1e-6)
        assert_same(read_checkpoint(after), expected)


def assert_same(got: FullCheckpoint, expected: FullCheckpoint, exact: bool = False) -> None:
    """Weights within 1e-6 and moments within 1e-5 (relative), or equal with `exact`."""
    assert got.model.keys() == expected.model.keys() and got.optimizer_step == expected.optimizer_step
    exactly = {"rtol": 0, "atol": 0}
    weights, moments = (exactly, exactly) if exact else ({"rtol": 1e-6, "atol": 1e-6}, {"rtol": 1e-5, "atol": 1e-9})
    for name, value in expected.model.items():
        torch.testing.assert_close(got.model[name], value, **weights, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got.moments[name][key], expected.moments[name][key], **moments,
                                       msg=f"{name} {key}")


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        read_checkpoint(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="latest_checkpointed_iteration.txt missing"):
        read_checkpoint(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "empty" / "iter_0000002")
    with pytest.raises(UserError, match="mp_rank_00_000/model_optim_rng.pt: missing checkpoint file"):
        read_checkpoint(str(tmp_path / "empty"), 2)
    os.makedirs(tmp_path / "empty" / "iter_0000002" / "mp_rank_00")
    (tmp_path / "empty" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"torn")
    with pytest.raises(UserError, match="mp_rank_00/model_optim_rng.pt: cannot read checkpoint"):
        read_checkpoint(str(tmp_path / "empty"), 2)


def test_layouts_a_checkpoint_loads_on(tiny_corpus, tmp_path):
    """The trainer's load: another data-parallel size only without the saved RNG states (--no-load-rng, or
    a checkpoint of the offline writer, which has none); a tensor x pipeline split the model does not
    divide is refused by the writer."""
    trained = str(tmp_path / "ckpt")
    run(flags(tiny_corpus, "--train-iters", "2", "--save", trained))
    full = read_checkpoint(trained)
    written = str(tmp_path / "written")
    write_checkpoint(full, written)
    with parallel_state.offline_layout(Layout(dp=2, dp_rank=1)):
        with pytest.raises(UserError, match="data_parallel_size=1; .*--no-load-rng"):
            load_checkpoint(trained)
        assert load_checkpoint(trained, load_rng=False)["iteration"] == 2
        assert load_checkpoint(written)["layout"]["data_parallel_size"] is None
    # two model chunks of one layer (the interleaved layout's record): read back alike, and regrouped for a
    # run without chunks as the plain layout's file holds it (tests/test_interleaved_pipeline.py: PP2 x VP2)
    chunked = str(tmp_path / "chunked")
    write_checkpoint(full, chunked, num_layers_per_virtual_pipeline_stage=1)
    assert_same(read_checkpoint(chunked), full, exact=True)
    plain = load_checkpoint(written)
    regrouped = regrouped_state(chunked, 2, full.config, optimizer=True)
    assert all(torch.equal(regrouped["model"][name], value) for name, value in plain["model"].items())
    assert regrouped["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
    with pytest.raises(UserError, match="--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"):
        write_checkpoint(full, str(tmp_path / "tp3"), 3, 1)
    with pytest.raises(UserError, match="--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"):
        write_checkpoint(full, str(tmp_path / "pp4"), 1, 4)
