"""--fp8-format (`tensor_parallel/fp8.py`): the flag's checks and one-line refusals (no CUDA, a GPU below
compute capability 8.9, torchao missing, weight shards not divisible by 16), and the wiring through a
stand-in for torchao.float8 (this CPU build has neither torchao nor FP8 matmuls): every column- and
row-parallel linear of the blocks, and nothing else, runs its matmul through a converted linear sharing
its weight; biases stay ours, the state dict and the parameters unchanged, gradients reach the fp32
weights. The FP8 numbers themselves are the device check's (tools/device_check.sh, fp8_step)."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import flags
from megatron_eslm.config import ModelConfig, finalize_model, parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.tensor_parallel import fp8
from megatron_eslm.training.trainer import Trainer


class StandInLinear(nn.Module):
    """What torchao's Float8Linear is to us: x W^T by the shared weight (here in full precision)."""

    def __init__(self, linear: nn.Linear, config, calls: list):
        super().__init__()
        self.weight, self.config, self.calls = linear.weight, config, calls

    def forward(self, x):
        self.calls.append(self)
        return F.linear(x, self.weight)


def stand_in_float8(calls: list) -> types.SimpleNamespace:
    """A torchao.float8 with its Float8LinearConfig, CastConfig and convert_to_float8_training."""
    def convert(module: nn.Module, config):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, StandInLinear(child, config, calls))
        return module

    return types.SimpleNamespace(
        Float8LinearConfig=lambda cast_config_grad_output=None: types.SimpleNamespace(grad=cast_config_grad_output),
        CastConfig=lambda target_dtype: types.SimpleNamespace(target_dtype=target_dtype),
        convert_to_float8_training=convert)


@pytest.fixture
def calls(monkeypatch) -> list:
    """The stand-in installed and the device check passed; the converted linears called, in order."""
    calls = []
    monkeypatch.setattr(fp8, "_torchao_float8", lambda: stand_in_float8(calls))
    monkeypatch.setattr(fp8, "check_fp8_device", lambda *args: None)
    return calls


def tiny_model(**overrides) -> GPTModel:
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                 attention_dropout=0.0)
    return GPTModel(finalize_model(ModelConfig(**{**shape, **overrides})), 64, init_seed=3)


@pytest.mark.parametrize("overrides", [{}, dict(swiglu=True, normalization="RMSNorm", disable_bias_linear=True)],
                         ids=["gpt2", "llama"])
def test_every_block_linear_and_nothing_else_runs_through_the_conversion(calls, overrides):
    reference, model = tiny_model(**overrides), tiny_model(**overrides)
    assert fp8.convert_to_fp8(model, "hybrid", torch.device("cpu")) == 8  # 2 blocks x (qkv, dense, h->4h, 4h->h)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    got, want = model(tokens), reference(tokens)
    assert len(calls) == 8  # once each: the LM head and the embeddings are not linears
    assert {id(c.weight) for c in calls} == {id(m.weight) for m in model.modules() if hasattr(m, "fp8_matmul")}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the biases added by our layers
    got.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        assert p.dtype == torch.float32  # the master weights


def test_formats(calls):
    model = tiny_model()
    fp8.convert_to_fp8(model, "e4m3", torch.device("cpu"))
    model(torch.zeros(1, 16, dtype=torch.long))
    assert {c.config.grad.target_dtype for c in calls} == {torch.float8_e4m3fn}
    assert fp8.float8_config("hybrid", stand_in_float8([])).grad is None  # torchao's default: e5m2 gradients


def test_misaligned_shards_are_refused(calls):
    model = tiny_model(hidden_size=40, num_attention_heads=5)
    with pytest.raises(UserError, match=re.escape("--fp8-format: layers.0.self_attention.query_key_value's "
                                                  "weight is 120 x 40 on this rank; FP8 matmuls need both "
                                                  "dimensions divisible by 16")):
        fp8.convert_to_fp8(model, "hybrid", torch.device("cpu"))
    assert not calls and all(m.fp8_matmul is None for m in model.modules() if hasattr(m, "fp8_matmul"))


def test_devices_and_torchao_are_checked(tiny_corpus, monkeypatch):
    with pytest.raises(UserError, match=re.escape("--fp8-format hybrid needs a CUDA device (this run is on cpu)")):
        Trainer(parse_args(flags(tiny_corpus, "--fp8-format", "hybrid", "--bf16")))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(UserError, match=re.escape("--fp8-format e4m3 needs a GPU of compute capability 8.9 or "
                                                  "more (Ada, Hopper), this one is 8.0")):
        fp8.check_fp8_device("e4m3", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    fp8.check_fp8_device("e4m3", torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails as if not installed
    with pytest.raises(UserError, match=re.escape("--fp8-format needs torchao (pip install torchao)")):
        fp8._torchao_float8()


@pytest.mark.parametrize("argv, message", [
    (["--fp8-format", "e5m2", "--bf16"], "--fp8-format must be one of hybrid, e4m3, got 'e5m2'"),
    (["--fp8-format", "hybrid"], "--fp8-format hybrid needs --bf16 (the activations around the FP8 matmuls and "
                                 "the LM head run in bf16)"),
])
def test_bad_flags_fail_in_one_line(tiny_corpus, argv, message):
    with pytest.raises(UserError) as err:
        parse_args(flags(tiny_corpus, *argv))
    assert str(err.value) == message


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs CUDA with FP8 matmuls (compute capability 8.9) and torchao")
@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
def test_cuda_fp8_steps_follow_bf16(tiny_corpus, fp8_format):
    """A few steps of a model whose linears are multiples of 16, in FP8 and in bf16: the losses agree to
    a few percent (per-tensor FP8 rounding)."""
    pytest.importorskip("torchao", reason="needs torchao for CUDA FP8")
    from helpers import run
    argv = flags(tiny_corpus, "--hidden-size", "64", "--train-iters", "4", "--bf16", "--hidden-dropout", "0",
                 "--attention-dropout", "0")
    bf16 = run(argv)[1]
    fp8_records = run(argv + ["--fp8-format", fp8_format])[1]
    for a, b in zip(fp8_records, bf16):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=5e-2)


def test_bench_fp8_row(calls, capsys):
    """tools/bench_train_step.py --fp8-format: a dense row per format, against the bf16 dense row."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_train_step
    tiny = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
            "--vocab-size", "64", "--micro-batch-size", "2", "--steps", "1", "--threads", "1", "--device", "cpu",
            "--alphas", "--optimizer-impls", "--recompute"]
    with pytest.raises(UserError, match="--fp8-format needs --bf16"):
        bench_train_step.parse([*tiny, "--fp8-format", "hybrid"])
    bench_train_step.main([*tiny, "--bf16", "--fp8-format", "hybrid", "e4m3"])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["dense", "dense, fp8 hybrid", "dense, fp8 e4m3"] and calls  # after the header
