"""The vocab-parallel LM head on two gloo ranks equals the one-process head over gradient-accumulation
micro-batches, with each shard's weight gradient returned to autograd or added in place into its .grad."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from megatron_eslm import parallel_state
from megatron_eslm.kernels import lm_head_triton
from megatron_eslm.model.lm_head import Selection, selective_lm_head_loss, weight_cast_cache
from megatron_eslm.tensor_parallel.lm_head import vocab_parallel_lm_head_loss
from rank_pool import run_on_ranks

N, V, H, IGNORE, MICRO_BATCHES = 24, 64, 16, -100, 2


def micro_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 hidden, labels with some ignored, and a fixed subset of the valid tokens to keep."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = IGNORE
    return hidden, labels, (labels != IGNORE) & (torch.rand(N, generator=gen) < 0.5)


def full_weight() -> torch.Tensor:
    return torch.randn(V, H, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.5


def run(head, weight: torch.Tensor, selective: bool, **kwargs) -> list[torch.Tensor]:
    """Accumulate MICRO_BATCHES micro-batches; returns their losses, hidden gradients and the weight's."""
    out = []
    with weight_cast_cache():
        for seed in range(MICRO_BATCHES):
            hidden, labels, kept = micro_batch(seed)
            hidden.requires_grad_()
            select = (lambda scores, kept=kept: Selection(kept=kept, normalizer=kept.sum())) if selective else None
            loss = head(hidden, weight, labels, select, ignore_index=IGNORE, **kwargs).loss
            (loss / MICRO_BATCHES).backward()
            out += [loss.detach(), hidden.grad]
    return [*out, weight.grad]


def impls() -> list[str]:
    return ["torch", "triton"] if lm_head_triton.is_available() else ["torch"]


def vocab_parallel_runs() -> dict:
    """On every rank of a 2-rank pool (tests/rank_pool.py): each implementation's head on this rank's
    vocabulary shard."""
    rank = dist.get_rank()
    parallel_state.initialize_model_parallel(2, 1)
    shard = full_weight().chunk(2)[rank]
    results = {(impl, selective, in_place): run(vocab_parallel_lm_head_loss, torch.nn.Parameter(shard.clone()),
                                                selective, impl=impl, vocab_start=V // 2 * rank,
                                                accumulate_into_grad=in_place)
               for impl in impls() for selective in (False, True) for in_place in (False, True)}
    parallel_state.destroy_model_parallel()
    return results


@pytest.mark.slow
def test_vocab_parallel_head_accumulates_like_one_process():
    ranks = run_on_ranks(2, vocab_parallel_runs)
    assert {impl for impl, _, _ in ranks[0]} == set(impls())
    for key, first in ranks[0].items():
        second = ranks[1][key]
        want = run(selective_lm_head_loss, torch.nn.Parameter(full_weight()), key[1])
        for got in (first, second):
            for a, b in zip((*got[:-1], torch.cat([first[-1], second[-1]])), want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=str(key))
