"""eslm-is (eslm/importance.py): tokens above the VaR threshold with weight 1, the others kept with
probability p and weight 1/p, the loss over the dense divisor. p = 1 is dense; the expected loss and
gradient are dense's; DP2 equals one process; the draws are keyed by (seed, iteration, sample, position)."""
from __future__ import annotations

import pytest
import torch

import test_parallel_training as tpt
from helpers import flags
from megatron_eslm.eslm.importance import ESLMISPolicy, token_uniforms
from megatron_eslm.eslm.policies import ESLMPolicy
from megatron_eslm.model.lm_head import selective_lm_head_loss


def test_uniforms_are_uniform_and_keyed():
    u = token_uniforms(7, 3, torch.arange(64), torch.arange(256))
    assert u.shape == (64 * 256,) and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float((u < 0.1).double().mean()) - 0.1) < 0.005
    # a sample draws the same wherever it lands; another iteration or sample draws anew
    again = token_uniforms(7, 3, torch.tensor([5, 9]), torch.arange(256)).view(2, 256)
    assert torch.equal(again[0], u.view(64, 256)[5]) and torch.equal(again[1], u.view(64, 256)[9])
    assert not torch.equal(token_uniforms(7, 4, torch.tensor([5]), torch.arange(256)), again[0])
    assert not torch.equal(token_uniforms(8, 3, torch.tensor([5]), torch.arange(256)), again[0])


def _head(policy, hidden, weight, labels):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    out = selective_lm_head_loss(hidden, weight, labels, policy)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def test_expected_gradient_is_dense(tmp_path):
    """Averaged over many iterations' draws on one fixed batch, the loss and both gradients converge to
    dense's (float64), within a few standard errors; p = 1 is dense exactly (to round-off)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4 * 32, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, 50, (4 * 32,), generator=g)
    labels[::7] = -100
    dense, dense_h, dense_w = _head(None, hidden, weight, labels)
    policy = ESLMISPolicy(ESLMPolicy(0.7, "loss", "exact"), 1.0, seed=1)
    policy.prepare(labels.view(4, 32), labels.view(4, 32), torch.arange(4))
    one, one_h, one_w = _head(policy, hidden, weight, labels)
    torch.testing.assert_close(one.loss, dense.loss)
    torch.testing.assert_close(one_h, dense_h)
    torch.testing.assert_close(one_w, dense_w)
    draws, losses, grads_h, grads_w, kept = 400, [], [], [], []
    policy = ESLMISPolicy(ESLMPolicy(0.7, "loss", "exact"), 0.25, seed=1)
    for iteration in range(draws):
        policy.start_step(iteration)
        policy.prepare(labels.view(4, 32), labels.view(4, 32), torch.arange(4))
        out, grad_h, grad_w = _head(policy, hidden, weight, labels)
        losses.append(out.loss.detach())
        grads_h.append(grad_h)
        grads_w.append(grad_w)
        kept.append(float(out.selection.kept.sum()) / float(out.scores.valid.sum()))
    for samples, target in ((torch.stack(losses), dense.loss.detach()), (torch.stack(grads_h), dense_h),
                            (torch.stack(grads_w), dense_w)):
        mean, stderr = samples.mean(0), samples.std(0) / draws ** 0.5
        assert bool(((mean - target).abs() <= 5 * stderr + 1e-12).all()), float(((mean - target).abs() / (stderr + 1e-12)).max())
    assert sum(kept) / draws == pytest.approx(0.3 + 0.7 * 0.25, abs=0.02)  # the backward's rows


def test_training_with_p_one_is_dense(tiny_corpus):
    """In float64, to round-off. Measured: lm_loss equal, grad_norm 1.2e-16 relative, parameters 8.0e-16
    apart (the row backward against the fused dense pass): the bounds leave 10-100x, a few ulps."""
    dense = tpt.train(flags(tiny_corpus, "--selection", "none", "--train-iters", "3"), torch.float64)
    full = tpt.train(flags(tiny_corpus, "--selection", "eslm-is", "--eslm-is-prob", "1", "--train-iters", "3"),
                 torch.float64)
    assert [r["kept_fraction"] for r in full["records"]] == [1.0] * 3
    for a, b in zip(full["records"], dense["records"]):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-14, abs=0)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-14, abs=0)
    for name, (param, *_) in dense["params"].items():
        assert param.dtype == torch.float64
        torch.testing.assert_close(full["params"][name][0], param, rtol=0, atol=1e-14, msg=name)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_corpus):
    """DP2 (one process with the replicas' micro-batches side by side: one threshold per micro-batch index
    over the replicas), TP2 (the vocabulary-parallel head, two row groups) and PP2 against one process:
    logged numbers (loss, kept loss, threshold, grad norm) in float32, kept fractions exactly, parameters in
    float64."""
    records = tpt.equal_to_one_process(tiny_corpus, 2, tpt.TWO_RANK_BASICS, ["--selection", "eslm-is", "--eslm-threshold",
                                                                           "exact", "--eslm-is-prob", "0.3"])
    assert all(0.5 < r["kept_fraction"] < 1.0 for r in records)
