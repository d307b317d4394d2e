"""--bf16 without DeepSpeed: the parameters stay fp32 and autocast runs the forward in bf16, so the
micro-batches' gradients accumulate in the fp32 `.grad` of fp32 parameters. (Under --deepspeed, where
DeepSpeed holds bf16 parameters, tests/test_deepspeed.py checks its fp32 accumulators.)"""
from __future__ import annotations

import torch

from megatron_eslm.config import parse_args
from megatron_eslm.training.trainer import Trainer
from test_parallel_training import flags


def test_bf16_accumulates_micro_batches_in_fp32_grads(tiny_corpus):
    """One step of 3 micro-batches: before the optimizer step every parameter and gradient is fp32, and
    the gradients are not bf16 numbers (each micro-batch's weight gradient comes out of a bf16 GEMM; a
    bf16 sum of them would be a bf16 number again). No clipping, so `.grad` is the plain sum."""
    torch.set_num_threads(1)
    trainer = Trainer(parse_args(flags(tiny_corpus, 4, "--bf16", "--train-iters", "1", "--clip-grad", "0")),
                      log=lambda *args: None)
    assert trainer.num_micro_batches == 3
    grads = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *args: grads.update({name: p.grad.clone() for name, p in trainer.model.named_parameters()}))
    trainer.train()
    trainer.close()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert grads and {grad.dtype for grad in grads.values()} == {torch.float32}
    for name, grad in grads.items():
        if grad.any():
            assert not torch.equal(grad.bfloat16().float(), grad), f"{name}: its gradient is a bf16 sum"
