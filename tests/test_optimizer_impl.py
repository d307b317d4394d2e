"""--optimizer-impl: torch's fused, foreach and per-parameter (loop) AdamW compute the same update, to
float32 round-off over a few steps and to 1e-12 in float64, alone and in a training run; auto picks fused
on CUDA and foreach on this CPU; a checkpoint keeps the kernels of the run that loads it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import flags, run
from megatron_eslm.config import OptimizerConfig, parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.training.optimizer import build_optimizer, impl_flags, load_optimizer_state

IMPLS = ("fused", "foreach", "loop")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def model_of(dtype: torch.dtype) -> nn.Module:
    """A decayed matrix and an undecayed bias, the same values every call."""
    model = nn.Linear(17, 33).to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype))
    return model


def optimizer_of(model: nn.Module, impl: str) -> torch.optim.AdamW:
    return build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1, optimizer_impl=impl))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, steps: int) -> None:
    """`steps` optimizer steps on random gradients drawn from `generator`."""
    for _ in range(steps):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        optimizer.step()


def difference(a: nn.Module, b: nn.Module) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_implementations_agree(dtype):
    models = {impl: model_of(dtype) for impl in IMPLS}
    for impl, model in models.items():
        step(model, optimizer_of(model, impl), torch.Generator().manual_seed(1), 5)
    for impl in ("fused", "foreach"):
        assert difference(models[impl], models["loop"]) <= TOLERANCE[dtype], impl


def test_flag_picks_the_kernels(tiny_corpus):
    assert impl_flags("auto", torch.device("cuda")) == impl_flags("fused", torch.device("cpu")) == \
        {"fused": True, "foreach": False}
    assert impl_flags("auto", torch.device("cpu")) == impl_flags("foreach", torch.device("cpu")) == \
        {"fused": False, "foreach": True}
    assert impl_flags("loop", torch.device("cuda")) == {"fused": False, "foreach": False}
    with pytest.raises(UserError) as err:
        parse_args(flags(tiny_corpus, "--optimizer-impl", "apex"))
    assert str(err.value) == "--optimizer-impl must be one of auto, fused, foreach, loop, got 'apex'"


def test_loaded_state_keeps_this_runs_kernels():
    """A loop run's checkpoint resumed with fused (and with loop) steps on as the uninterrupted run does, with
    the resuming run's kernels (torch alone would take the checkpoint's)."""
    model, generator = model_of(torch.float64), torch.Generator().manual_seed(1)
    optimizer = optimizer_of(model, "loop")
    step(model, optimizer, generator, 3)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), generator.get_state()))
    step(model, optimizer, generator, 3)
    for impl in ("fused", "loop"):
        weights, state, draws = copy.deepcopy(saved)
        resumed = model_of(torch.float64)
        resumed.load_state_dict(weights)
        resumed_optimizer = optimizer_of(resumed, impl)
        load_optimizer_state(resumed_optimizer, state)
        assert resumed_optimizer.param_groups[0]["fused"] is (impl == "fused")
        step(resumed, resumed_optimizer, torch.Generator().set_state(draws), 3)
        assert difference(resumed, model) <= TOLERANCE[torch.float64], impl


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_training_runs_agree(tiny_corpus, float64):
    """Whole runs (6 steps, ESLM) in float64: the same numbers and parameters with every implementation."""
    runs = {impl: run(flags(tiny_corpus, "--optimizer-impl", impl)) for impl in IMPLS}
    reference, reference_records = runs["loop"]
    for impl in ("fused", "foreach"):
        trainer, records = runs[impl]
        assert trainer.optimizer.param_groups[0]["fused"] is (impl == "fused")
        for got, want in zip(records, reference_records, strict=True):
            assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-12)
            assert got["kept"] == want["kept"]
        for p, q in zip(trainer.model.parameters(), reference.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
