"""--attention-backend (`model/attention_backend.py`): the flag's values and refusals, the SDPA backends each
value enables and in which order, the CPU run under `math` against the default one, and on CUDA every
backend training a step and context parallelism's lower-right mask running unmaterialised in the fused
kernels (with grouped queries where the kernel has them)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from helpers import flags, run
from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.config.model import model_config_from_dict
from megatron_eslm.errors import UserError
from megatron_eslm.model import attention_backend
from megatron_eslm.model.attention_backend import attention_backends, backend_priority, check_attention_device
from megatron_eslm.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_context_parallel import chunk_attention_errors  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
LLAMA = ["--group-query-attention", "--num-query-groups", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--attention-backend", "sdpa"], "--attention-backend must be one of auto, flash, cudnn, efficient, math, "
                                      "got 'sdpa'"),
    (["--attention-backend", "flash"], "--attention-backend flash needs --bf16 (its kernels take 16-bit inputs only)"),
    (["--attention-backend", "cudnn"], "--attention-backend cudnn needs --bf16"),
    (["--attention-backend", "efficient", *LLAMA], "--attention-backend efficient needs a key/value head per query "
                                                   "head (PyTorch's memory-efficient kernel has no grouped-query "
                                                   "form), got --num-query-groups 2 of 4 heads"),
    (["--attention-backend", "flash", "--bf16", "--kv-channels", "320"],
     "--attention-backend flash runs head dimensions up to 256, got --kv-channels 320"),
])
def test_bad_values_fail_in_one_line(tiny_corpus, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(flags(tiny_corpus, *argv))


def test_cudnn_is_refused_under_context_parallelism(tiny_corpus):
    cfg = parse_args(flags(tiny_corpus, "--attention-backend", "cudnn", "--bf16", "--context-parallel-size", "2",
                           "--hidden-dropout", "0", "--attention-dropout", "0"))
    with pytest.raises(UserError, match=re.escape("--attention-backend cudnn does not run with "
                                                  "--context-parallel-size 2: cuDNN has no kernel for the "
                                                  "lower-right causal mask")):
        validate_layout(cfg, 2)
    cfg.model.attention_backend = "flash"  # flash and efficient have it
    validate_layout(cfg, 2)


def test_cuda_kernels_are_refused_off_cuda(tiny_corpus):
    with pytest.raises(UserError, match=re.escape("--attention-backend efficient needs a CUDA device (this run "
                                                  "is on cpu): use auto or math")):
        Trainer(parse_args(flags(tiny_corpus, "--attention-backend", "efficient")))
    for name in ("flash", "cudnn"):
        with pytest.raises(UserError, match=f"--attention-backend {name} needs a CUDA device"):
            check_attention_device(name, CPU)
    for name in ("auto", "math"):
        check_attention_device(name, CPU)


def test_priorities(monkeypatch):
    """auto: SDPA's own choice off CUDA; on CUDA cuDNN first on Hopper, flash first elsewhere, math last."""
    assert backend_priority("auto", CPU) is None
    assert backend_priority("math", CPU) == (SDPBackend.MATH,)
    assert backend_priority("efficient", CUDA) == (SDPBackend.EFFICIENT_ATTENTION,)
    for capability, first in (((9, 0), SDPBackend.CUDNN_ATTENTION), ((8, 0), SDPBackend.FLASH_ATTENTION),
                              ((10, 0), SDPBackend.FLASH_ATTENTION)):
        backend_priority.cache_clear()
        monkeypatch.setattr(attention_backend.torch.cuda, "get_device_capability", lambda device, c=capability: c)
        order = backend_priority("auto", CUDA)
        assert order[0] == first and order[-1] == SDPBackend.MATH and len(set(order)) == 4, capability
    backend_priority.cache_clear()


def test_the_context_enables_the_backend_and_restores_the_flags():
    before = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()]
    with attention_backends("math", CPU):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    assert [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()] == before


def test_math_equals_the_default_on_cpu(tiny_corpus):
    """Training forwards with dropout, as in the tiny runs: the CPU's default is math itself (its flash
    kernel has no dropout), so the logged numbers are equal bit for bit. (Without dropout the default is
    that flash kernel, which sums in another order: float32 round-off apart.)"""
    argv = flags(tiny_corpus, "--train-iters", "2", "--eval-iters", "0")
    default, math = (run(argv + extra)[1] for extra in ([], ["--attention-backend", "math"]))
    fields = ("lm_loss", "kept_loss", "grad_norm", "threshold")
    assert [[r[f] for f in fields] for r in default] == [[r[f] for f in fields] for r in math]


def test_a_stored_backend_is_not_the_rebuilt_models():
    """A checkpoint's config names the kernel its run used; tools rebuilding the model on their own device
    take auto."""
    assert model_config_from_dict({"num_layers": 2, "attention_backend": "flash"}).attention_backend == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused SDPA kernels)")
@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "efficient", "math"])
def test_cuda_every_backend_trains(tiny_corpus, backend):
    """Two bf16 steps under each backend: the losses agree with math's to bf16 rounding."""
    argv = flags(tiny_corpus, "--train-iters", "2", "--bf16", "--attention-dropout", "0", "--hidden-dropout", "0")
    want = run(argv + ["--attention-backend", "math"])[1]
    got = run(argv + ["--attention-backend", backend])[1]
    for a, b in zip(got, want):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused SDPA kernels)")
@pytest.mark.parametrize("backend, groups", [("auto", 2), ("flash", 2), ("efficient", 8)])
def test_cuda_lower_right_mask_runs_unmaterialised(monkeypatch, backend, groups):
    """Context parallelism's chunks (the Llama shape: head dim 128, grouped queries where the kernel has
    them) under auto, flash and efficient: the CausalBias reaches a kernel without being materialised (its
    `_materialize` raises here), and each chunk equals full causal attention to bf16 rounding."""
    from torch.nn.attention.bias import CausalBias

    def materialised(*args, **kwargs):
        raise AssertionError(f"--attention-backend {backend} materialised the lower-right mask")

    monkeypatch.setattr(CausalBias, "_materialize", materialised)
    with attention_backends(backend, CUDA):
        errors = chunk_attention_errors("cuda", torch.bfloat16, b=2, heads=8, groups=groups, length=1024, d=128, cp=4)
    assert max(errors) <= 2e-2, errors
