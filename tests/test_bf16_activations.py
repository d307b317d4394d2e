"""--bf16 (autocast over the forward, fp32 parameters) keeps every activation in bf16, as Megatron does:
what autograd saves from the embeddings to the final norm (recorded with saved-tensor hooks), the residual
stream and the final hidden; and such runs still train, equal to one process within bf16's precision
under TP2 with sequence parallelism and PP2 (the bf16 pipeline messages: tests/test_pipeline_memory.py).

Which saved tensors may stay fp32: per-row statistics. They have at most b * s * heads elements (a norm's
mean and rstd: one per token; attention's log-sum-exp: one per token and head), while every activation
has at least b * s * hidden / TP (hidden / TP > heads whenever head_dim > TP, as here: 8 > 2). So every
floating saved tensor larger than b * s * heads must be bf16. The parameters themselves (fp32) are not
activations; their bf16 casts that GEMMs save are bf16 anyway. The LM head is left out: its memory
has its own tests.
"""
from __future__ import annotations


import pytest
import torch

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.model.gpt import GPTModel
from test_parallel_training import REFERENCE_MICRO_BATCH, flags, layout_flags, micro_batch, train
from rank_pool import run_on_ranks

BATCH, SEQ, HIDDEN, HEADS, VOCAB = 2, 16, 32, 4, 64
CFG = ModelConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=4 * HIDDEN,
                  seq_length=SEQ, max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0)
STEPS = 6
LAYOUTS = {"tp2-sp": (2, 1, True), "pp2": (1, 2, False)}
# Relative lm_loss difference to one process, per step. Measured, dense / eslm-loss: TP2-SP 8.6e-6 / 1.9e-4
# (the sequence-parallel sums round in another order), PP2 0 / 3.2e-6.
RTOL = {"tp2-sp": 2e-3, "pp2": 3e-5}
SELECTIONS = {"dense": ["--selection", "none"], "eslm-loss": ["--selection", "eslm", "--eslm-alpha", "0.6"]}


def saved_tensors(model: GPTModel, bf16: bool) -> tuple[list[tuple[torch.dtype, int]], torch.Tensor]:
    """(dtype, numel) of every floating tensor autograd saves in the forward up to the final norm (the
    parameters themselves left out), and the final hidden; then runs a backward through it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            saved.append((t.dtype, t.numel()))
        return t

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model(tokens)
    hidden.float().square().mean().backward()
    return saved, hidden


def check_saved_tensors(model: GPTModel) -> None:
    saved, hidden = saved_tensors(model, bf16=True)
    assert hidden.dtype == torch.bfloat16
    large = [dtype for dtype, numel in saved if numel > BATCH * SEQ * HEADS]
    assert large and set(large) == {torch.bfloat16}, saved
    assert all(p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all()) for p in model.parameters())


def test_saved_activations_are_bf16():
    torch.manual_seed(0)
    check_saved_tensors(GPTModel(CFG, VOCAB, init_seed=1))
    fp32, hidden = saved_tensors(GPTModel(CFG, VOCAB, init_seed=1), bf16=False)  # without --bf16: untouched
    assert hidden.dtype == torch.float32 and {dtype for dtype, _ in fp32} == {torch.float32}


def tp2_saved_tensors() -> None:
    """The same under TP2 with sequence parallelism (vocab-parallel embedding, row-parallel bias)."""
    parallel_state.initialize_model_parallel(2, 1)
    check_saved_tensors(GPTModel(CFG, VOCAB, init_seed=1, sequence_parallel=True))
    parallel_state.destroy_model_parallel()


def two_rank_runs(jobs: dict[tuple, list[str]]) -> dict:
    """On every rank of a 2-rank pool (tests/rank_pool.py): the TP2 saved-tensor check, then each job's
    records."""
    tp2_saved_tensors()
    return {name: train(argv, torch.float32)["records"] for name, argv in jobs.items()}


def bf16_flags(corpus, micro: int, *extra: str) -> list[str]:
    return [*flags(corpus, micro, *extra), "--bf16", "--train-iters", str(STEPS)]


@pytest.mark.slow
def test_bf16_trains_like_one_process(tiny_corpus):
    """lm_loss falls over the steps, and TP2-SP / PP2 follow one process step by step, to RTOL (below
    bf16's 7.8e-3 epsilon)."""
    torch.set_num_threads(1)
    references = {selection: train(bf16_flags(tiny_corpus, REFERENCE_MICRO_BATCH, *extra), torch.float32)["records"]
                  for selection, extra in SELECTIONS.items()}
    jobs = {(layout, selection): bf16_flags(tiny_corpus, micro_batch(2, tp, pp), *extra, *layout_flags(tp, pp, sp))
            for layout, (tp, pp, sp) in LAYOUTS.items() for selection, extra in SELECTIONS.items()}
    results = run_on_ranks(2, two_rank_runs, jobs)[0]
    for selection, reference in references.items():
        losses = [r["lm_loss"] for r in reference]
        assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1, losses
        for layout in LAYOUTS:
            got = [r["lm_loss"] for r in results[(layout, selection)]]
            print(f"{layout} {selection}: lm_loss {got[0]:.4f} -> {got[-1]:.4f}, largest relative difference "
                  f"{max(abs(a - b) / b for a, b in zip(got, losses)):.1e}")
            torch.testing.assert_close(torch.tensor(got), torch.tensor(losses), rtol=RTOL[layout], atol=0,
                                       msg=f"{layout} {selection}")
