"""1F1B on two gloo ranks (PP2, 4 micro-batches): the first stage releases each sent output's values
(Megatron's deallocate_output_tensor), the gradients equal those of a run that keeps them, and under bf16
autocast every pipeline message is bf16 (half the fp32 bytes).

Each stage output is recorded by a wrapper around the model's forward; before every forward (and after the
step) the outputs already sent must hold at most one element of storage while their backward is pending.
A backward callable other than the plain autograd one (DeepSpeed's reads the output's values) keeps them:
that run is the reference, and shows the check has teeth.
"""
from __future__ import annotations

import contextlib

import torch

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.distributed import collectives
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.pipeline_parallel.schedules import autograd_backward
from megatron_eslm.training.step import forward_backward
from rank_pool import run_on_ranks

MICRO_BATCH, SEQ, HIDDEN, VOCAB, MICRO_BATCHES = 2, 16, 32, 64, 4
CFG = ModelConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=4 * HIDDEN,
                  seq_length=SEQ, max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0)


def keep_outputs_backward(output: torch.Tensor, output_grad: torch.Tensor | None) -> None:
    """Plain autograd, but not the schedule's own callable: the schedule must keep the outputs' values."""
    torch.autograd.backward(output, grad_tensors=output_grad)


def batches() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"tokens": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen),
             "labels": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)} for _ in range(MICRO_BATCHES)]


def run(backward, bf16: bool) -> dict:
    """One step's forward/backward on this stage: its gradients, the losses (last stage), the largest storage
    a sent output held while in flight (first stage), and the pipeline bytes per message."""
    model = GPTModel(CFG, VOCAB, init_seed=3)
    sent: list[torch.Tensor] = []
    held: list[int] = []
    losses: list[torch.Tensor] = []

    def forward(tokens, input_tensor, head=None):
        held.extend(out.untyped_storage().nbytes() for out in sent)
        result = model(tokens, input_tensor, head=head)
        if head is None:
            sent.append(result)
        else:
            losses.append(result[0].detach().float())
        return result

    collectives.reset()
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if bf16 else contextlib.nullcontext
    forward_backward(model, None, iter(batches()), MICRO_BATCHES, torch.device("cpu"), autocast=autocast,
                     backward=backward, forward=forward)
    held.extend(out.untyped_storage().nbytes() for out in sent)
    messages = {kind: collectives.bytes_by_kind[kind] / collectives.calls_by_kind[kind]
                for kind in (collectives.PP_SEND, collectives.PP_RECV) if collectives.calls_by_kind[kind]}
    return {"grads": {name: p.grad.clone() for name, p in model.named_parameters()}, "losses": losses,
            "held": held, "sent": len(sent), "messages": messages}


def stage_runs() -> dict:
    """On every rank of a 2-rank pool (tests/rank_pool.py): this stage's runs, outputs freed and kept."""
    parallel_state.initialize_model_parallel(1, 2)
    results = {(name, bf16): run(backward, bf16) for bf16 in (False, True)
               for name, backward in (("freed", autograd_backward), ("kept", keep_outputs_backward))}
    parallel_state.destroy_model_parallel()
    return results


def test_1f1b_frees_sent_outputs_and_sends_bf16():
    first, last = run_on_ranks(2, stage_runs)
    activation = MICRO_BATCH * SEQ * HIDDEN
    for bf16 in (False, True):
        freed, kept = first[("freed", bf16)], first[("kept", bf16)]
        assert freed["sent"] == kept["sent"] == MICRO_BATCHES
        assert freed["held"] and max(freed["held"]) <= 4  # one element
        assert min(kept["held"]) == activation * (2 if bf16 else 4)
        for stage in (first, last):  # releasing the values changes no gradient, bit for bit
            a, b = stage[("freed", bf16)]["grads"], stage[("kept", bf16)]["grads"]
            assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
        assert all(torch.equal(a, b) for a, b in zip(last[("freed", bf16)]["losses"], last[("kept", bf16)]["losses"]))
        # Activations forward (first stage) and gradients backward (last stage), in the activation dtype.
        size = activation * (2 if bf16 else 4)
        assert freed["messages"] == {collectives.PP_SEND: size, collectives.PP_RECV: size}
        assert last[("freed", bf16)]["messages"] == {collectives.PP_SEND: size, collectives.PP_RECV: size}
    fp32, bf16 = (torch.stack(last[("freed", flag)]["losses"]) for flag in (False, True))
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)
