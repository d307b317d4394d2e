"""The Triton LM head matches a float64 full-logits reference.

Without a GPU the kernels run in Triton's interpreter on CPU (float32/float64 only: the interpreter's
bf16 dot is unreliable), on tiny shapes chosen to leave ragged tiles in every dimension. With a GPU the same
tests run compiled, and ``TestOnGPU`` adds bf16 and larger shapes.
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own",
                    allow_module_level=True)
    # Triton reads this when it is imported: its kernels (and ours) then run in the interpreter on CPU.
    # conftest.py sets it for the session already; this covers running the file some other way.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (optional: pip install -e '.[triton]')")

from helpers import flags, run  # noqa: E402
from megatron_eslm.eslm.threshold import keep_mask, var_threshold  # noqa: E402
from megatron_eslm.kernels import lm_head_torch, lm_head_triton  # noqa: E402
from megatron_eslm.model.lm_head import IMPLEMENTATIONS, Selection, selective_lm_head_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
# (N, H, V): ragged against the 16-wide interpreter tiles, then exact multiples of them.
SHAPES = [(13, 24, 37), (32, 32, 48)]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make_inputs(shape, dtype, seed=0, device=DEVICE):
    num_rows, hidden_size, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size ** 0.25
    labels = torch.randint(0, vocab, (num_rows,), generator=gen)
    labels[torch.randperm(num_rows, generator=gen)[: num_rows // 5]] = IGNORE
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def kept_rows(labels, keep, seed=1):
    valid = (labels != IGNORE).nonzero().squeeze(1)
    order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed)).to(labels.device)
    return valid[order[: round(keep * len(valid))]].sort().values


def reference(hidden, weight, labels, rows, grad_scale):
    """Float64, full logits: (loss, lse, entropy, grad_hidden[rows], grad_weight) of grad_scale * sum(loss[rows])."""
    hidden, weight = hidden.double(), weight.double()
    logits = hidden @ weight.t()
    log_probs = logits.log_softmax(-1)
    valid = labels != IGNORE
    loss = -log_probs.gather(1, labels.where(valid, 0).unsqueeze(1)).squeeze(1) * valid
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    d_logits = (log_probs[rows].exp() - F.one_hot(labels[rows], weight.shape[0])) * grad_scale
    return loss, logits.logsumexp(-1), entropy, d_logits @ weight, d_logits.t() @ hidden[rows]


def assert_all_close(actual, expected, dtype):
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want.to(got.dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_scores(shape, dtype):
    hidden, weight, labels = make_inputs(shape, dtype)
    scores = lm_head_triton.lm_head_scores(hidden, weight, labels, IGNORE)
    assert all(s.dtype == lm_head_triton.score_dtype(dtype) for s in scores)
    assert_all_close(scores, reference(hidden, weight, labels, labels[:0], 1.0)[:3], dtype)
    assert not scores[0][labels == IGNORE].any()


def test_scores_with_vocab_split_across_programs(monkeypatch):
    """Pass 1 splits the vocabulary over programs when rows are few; the split partials must merge exactly."""
    monkeypatch.setattr(lm_head_triton, "_vocab_splits", lambda *_: 3)
    hidden, weight, labels = make_inputs(SHAPES[0], torch.float32)
    scores = lm_head_triton.lm_head_scores(hidden, weight, labels, IGNORE)
    assert_all_close(scores, reference(hidden, weight, labels, labels[:0], 1.0)[:3], torch.float32)


@pytest.mark.parametrize("bounds", [(0, 20, 37), (0, 5, 16, 37)])
def test_vocab_shards_combine_to_unsharded(bounds):
    hidden, weight, labels = make_inputs(SHAPES[0], torch.float32)
    shards = [lm_head_triton.lm_head_partials(hidden, weight[start:end], labels, start, IGNORE)
              for start, end in zip(bounds, bounds[1:])]
    valid = labels != IGNORE
    unsharded = lm_head_triton.lm_head_scores(hidden, weight, labels, IGNORE)
    gathered = lm_head_triton.Partials(*(torch.stack(fields) for fields in zip(*shards)))
    assert_all_close(lm_head_triton.combine_partials(gathered, valid), unsharded, torch.float32)
    # The all-reduce recipe: MAX of the maxima, then SUM of the partials rescaled to it.
    global_max = torch.stack([p.row_max for p in shards]).amax(0)
    rescaled = [lm_head_triton.rescale_partials(p, global_max) for p in shards]
    sums = [sum(p[i] for p in rescaled) for i in (1, 2, 3)]
    reduced = lm_head_triton.combine_partials(lm_head_triton.Partials(global_max, *sums), valid)
    assert_all_close(reduced, unsharded, torch.float32)


@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("keep", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_rows(shape, keep, chunk_rows):
    hidden, weight, labels = make_inputs(shape, torch.float32)
    rows = kept_rows(labels, keep)
    expected = reference(hidden, weight, labels, rows, 2.5)
    grads = lm_head_triton.lm_head_backward_rows(hidden, weight, labels, rows, expected[1].float(),
                                                  torch.tensor(2.5, device=DEVICE), chunk_rows)
    assert grads[0].shape == (len(rows), shape[1]) and grads[1].dtype == torch.float32
    assert_all_close(grads, expected[3:], torch.float32)


def test_backward_rows_float64():
    hidden, weight, labels = make_inputs(SHAPES[0], torch.float64)
    rows = kept_rows(labels, 0.5)
    expected = reference(hidden, weight, labels, rows, 0.3)
    grads = lm_head_triton.lm_head_backward_rows(hidden, weight, labels, rows, expected[1], 0.3, 3)
    assert_all_close(grads, expected[3:], torch.float64)


def test_fused_dense(monkeypatch):
    """The fused dense pass: scores and both gradients of grad_scale * sum(valid losses), over ragged chunks
    of rows whose vocabulary pass 1 splits over programs (each writing its columns of the logits buffer).
    Float64, and unsplit in one chunk: `test_dense_through_the_head`."""
    monkeypatch.setattr(lm_head_triton, "_vocab_splits", lambda *_: 2)
    dtype = torch.float32
    hidden, weight, labels = make_inputs(SHAPES[0], dtype)
    valid_rows = (labels != IGNORE).nonzero().squeeze(1)
    expected = reference(hidden, weight, labels, valid_rows, 2.5)
    *scores, grad_hidden, grad_weight = lm_head_triton.lm_head_fused_dense(
        hidden, weight, labels, torch.tensor(2.5, dtype=dtype, device=DEVICE), IGNORE, chunk_rows=5)
    assert_all_close((*scores, grad_hidden[valid_rows], grad_weight), expected, dtype)
    assert not grad_hidden[labels == IGNORE].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_through_the_head(monkeypatch, shape, dtype):
    """Dense training with the Triton kernels: the fused pass in the forward, the backward scaling its
    gradients by the incoming one (here 0.5) and adding the weight gradient in place into .grad."""
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", lm_head_triton)
    hidden, weight, labels = make_inputs(shape, dtype)
    valid_rows = (labels != IGNORE).nonzero().squeeze(1)
    expected = reference(hidden, weight, labels, valid_rows, 0.5 / len(valid_rows))
    hidden, weight = hidden.requires_grad_(), torch.nn.Parameter(weight)
    out = selective_lm_head_loss(hidden, weight, labels, None, IGNORE, impl="triton", accumulate_into_grad=True)
    (out.loss * 0.5).backward()
    assert_all_close((out.scores.loss, weight.grad), (expected[0], expected[4]), dtype)
    assert_all_close((hidden.grad[valid_rows],), expected[3:4], dtype)
    assert not hidden.grad[labels == IGNORE].any()


def two_pass_triton() -> SimpleNamespace:
    """The Triton kernels without their fused dense pass: dense training as before it, pass 1 in the forward
    and pass 2 over every row in the backward."""
    return SimpleNamespace(**{name: getattr(lm_head_triton, name)
                              for name in ("lm_head_scores", "lm_head_backward_rows", "lm_head_partials")})


def test_no_grad_runs_no_fused_pass(monkeypatch):
    """Evaluation pays for no gradient: without autograd the dense head runs the scoring pass only."""
    def refuse(*args, **kwargs):
        raise AssertionError("the fused dense pass ran without autograd")

    monkeypatch.setitem(IMPLEMENTATIONS, "triton", lm_head_triton)
    monkeypatch.setattr(lm_head_triton, "lm_head_fused_dense", refuse)
    hidden, weight, labels = make_inputs(SHAPES[0], torch.float32)
    with torch.no_grad():
        loss = selective_lm_head_loss(hidden.requires_grad_(), weight, labels, None, IGNORE, impl="triton").loss
    expected = reference(hidden, weight, labels, labels[:0], 1.0)[0].sum() / (labels != IGNORE).sum()
    assert_all_close((loss,), (expected,), torch.float32)


@pytest.fixture
def coarse_interpreter_tiles(monkeypatch):
    """Interpreter tiles of 64 rows and 512 vocabulary columns, for a test whose shapes need not be ragged
    against them: the interpreter's cost is per program and per tile, and a training run's head has 64
    rows and 320 columns (one tile: the fused pass 8x faster than with 16-wide tiles, measured)."""
    monkeypatch.setattr(lm_head_triton, "INTERPRETER_TILE", (64, 512, 64, 1, 1))
    lm_head_triton._kernels.cache_clear()  # the kernels are decorated with their tiles on first launch
    yield
    lm_head_triton._kernels.cache_clear()


@pytest.mark.slow
def test_dense_training_fused_equals_two_pass(tiny_corpus, monkeypatch, coarse_interpreter_tiles):
    """A dense training run with the Triton head (interpreted), two micro-batches a step (the backward's
    incoming gradient is 1/2), logs the losses of the two-pass head it replaces."""
    argv = flags(tiny_corpus, "--selection", "none", "--lm-head-impl", "triton", "--train-iters", "2",
                 "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0")
    fused_calls = []

    def fused_dense(*args, **kwargs):
        fused_calls.append(args[0].shape[0])
        return fused_pass(*args, **kwargs)

    fused_pass = lm_head_triton.lm_head_fused_dense
    monkeypatch.setattr(lm_head_triton, "lm_head_fused_dense", fused_dense)
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", lm_head_triton)
    _, fused = run(argv)
    assert fused_calls == [2 * 32] * 4  # each micro-batch's rows, 2 steps of 2
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", two_pass_triton())
    _, two_pass = run(argv)
    assert len(fused) == len(two_pass) == 2
    for ours, theirs in zip(fused, two_pass):
        assert ours["lm_loss"] == pytest.approx(theirs["lm_loss"], abs=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


def test_backward_rows_accumulates_into_grad_weight_out():
    hidden, weight, labels = make_inputs(SHAPES[0], torch.float32)
    rows = kept_rows(labels, 0.5)
    expected = reference(hidden, weight, labels, rows, 1.0)
    accumulator = torch.ones_like(weight)
    _, grad_weight = lm_head_triton.lm_head_backward_rows(hidden, weight, labels, rows, expected[1].float(), 1.0,
                                                          grad_weight_out=accumulator)
    assert grad_weight is accumulator
    assert_all_close((accumulator - 1,), expected[4:], torch.float32)


def test_bf16_scores_and_kept_tokens_match_the_torch_head():
    """bf16 inputs: the torch head (fp32 sums of the bf16 products) and the Triton kernels (the same bf16
    values held in fp32: the interpreter's bf16 dot is unreliable) score alike and keep the same tokens."""
    hidden, weight, labels = make_inputs((300, 32, 97), torch.float32)
    hidden16 = hidden.bfloat16()
    torch_scores = lm_head_torch.lm_head_scores(hidden16, weight, labels, IGNORE)  # casts the fp32 weight
    triton_scores = lm_head_triton.lm_head_scores(hidden16.float(), weight.bfloat16().float(), labels, IGNORE)
    for ours, theirs in zip(torch_scores, triton_scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    valid = labels != IGNORE
    for ours, theirs in ((torch_scores[0], triton_scores[0]), (torch_scores[2], triton_scores[2])):
        kept = [keep_mask(score, valid, var_threshold(score, valid, 0.5)) for score in (ours, theirs)]
        assert torch.equal(*kept) and 0 < kept[0].sum() < valid.sum()
    # Not vacuous: logits rounded to bf16 by the GEMM (the head's old behaviour) are off by far more.
    rounded = (hidden16 @ weight.bfloat16().t()).float().log_softmax(-1)
    rounded_loss = -rounded.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) * valid
    assert (rounded_loss - torch_scores[0]).abs().max() > 1e-4


@pytest.mark.parametrize("select", [None, "some"])
def test_plugs_into_the_autograd_head(monkeypatch, select):
    """Through selective_lm_head_loss the Triton module gives the torch module's loss and gradients."""
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", lm_head_triton)
    hidden, weight, labels = make_inputs(SHAPES[0], torch.float32)
    kept = torch.zeros_like(labels, dtype=torch.bool).index_fill_(0, kept_rows(labels, 0.5), True)
    selector = (lambda scores: Selection(kept=kept, normalizer=float(kept.sum()))) if select else None
    results = []
    for impl in ("torch", "triton"):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        loss = selective_lm_head_loss(*leaves, labels, selector, IGNORE, impl=impl).loss
        loss.backward()
        results.append((loss, *(leaf.grad for leaf in leaves)))
    assert_all_close(results[1], results[0], torch.float32)


def test_is_available():
    assert lm_head_triton.is_available()


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
class TestOnGPU:
    """Compiled kernels: no worse than the torch implementation in the same dtype, plus a margin."""

    MARGIN = {torch.bfloat16: 1e-2, torch.float32: 5e-4}

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("shape", [(1000, 768, 32003), (4096, 1024, 50304)])
    def test_error_bounded_by_torch_error(self, shape, dtype):
        hidden, weight, labels = make_inputs(shape, dtype)
        rows = kept_rows(labels, 0.3)
        valid_rows = (labels != IGNORE).nonzero().squeeze(1)
        expected = reference(hidden, weight, labels, rows, 1.0 / len(rows))
        outputs = {}
        for name, impl in (("torch", lm_head_torch), ("triton", lm_head_triton)):
            scores = impl.lm_head_scores(hidden, weight, labels, IGNORE)
            grads = impl.lm_head_backward_rows(hidden, weight, labels, rows, scores[1], 1.0 / len(rows))
            # dense through the head (the fused pass): loss = sum of the token losses
            leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
            dense = selective_lm_head_loss(*leaves, labels, None, IGNORE, impl=name, normalizer=1.0)
            dense.loss.backward()
            outputs[impl] = (*scores, *grads, dense.scores.loss, leaves[0].grad[valid_rows], leaves[1].grad)
        dense_expected = reference(hidden, weight, labels, valid_rows, 1.0)
        expected = (*expected, dense_expected[0], dense_expected[3], dense_expected[4])
        names = ("loss", "lse", "entropy", "grad_hidden", "grad_weight", "dense loss", "dense grad_hidden",
                 "dense grad_weight")
        for name, ours, theirs, want in zip(names, outputs[lm_head_triton], outputs[lm_head_torch], expected):
            ours_err, torch_err = relative_error(ours, want), relative_error(theirs, want)
            assert ours_err <= torch_err + self.MARGIN[dtype], (name, ours_err, torch_err)

    def test_bf16_hidden_with_fp32_weight(self):
        """Both heads sum bf16 products in fp32 (cuBLAS's fp32-output GEMM, Triton's dot): they differ by
        summation order only, and keep the same tokens."""
        hidden, weight, labels = make_inputs((512, 256, 5000), torch.float32)
        hidden = hidden.bfloat16()
        loss, lse, entropy = lm_head_triton.lm_head_scores(hidden, weight, labels, IGNORE)
        expected = lm_head_torch.lm_head_scores(hidden, weight, labels, IGNORE)
        for got, want in zip((loss, lse, entropy), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        valid = labels != IGNORE
        for ours, theirs in ((loss, expected[0]), (entropy, expected[2])):
            kept = [keep_mask(score, valid, var_threshold(score, valid, 0.5)) for score in (ours, theirs)]
            assert torch.equal(*kept)
