"""VaR threshold, tie rule and selection policies against sorting."""
import math

import pytest
import torch

from megatron_eslm.eslm.build import build_policy
from megatron_eslm.eslm.policies import ESLMPolicy, RandomPolicy
from megatron_eslm.eslm.threshold import keep_mask, var_threshold
from megatron_eslm.config import Config, SelectionConfig
from megatron_eslm.model.lm_head import TokenScores


def scores_with_ties(n: int, seed: int) -> TokenScores:
    g = torch.Generator().manual_seed(seed)
    loss = torch.randint(0, 7, (n,), generator=g).float() / 2  # few distinct values: heavy ties
    valid = torch.rand(n, generator=g) > 0.2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    entropy = torch.rand(n, generator=g)
    return TokenScores(loss=loss, entropy=entropy, valid=valid)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("seed", range(5))
def test_threshold_equals_sorted_order_statistic(alpha, seed):
    s = scores_with_ties(257, seed)
    values = s.loss[s.valid]
    n = values.numel()
    expected = torch.sort(values).values[math.floor(alpha * n)]
    threshold = var_threshold(s.loss, s.valid, alpha)
    assert threshold == expected
    kept = keep_mask(s.loss, s.valid, threshold)
    # Tie rule: everything at or above the threshold is kept; ignored tokens never are.
    assert torch.equal(kept, s.valid & (s.loss >= expected))
    assert not kept[~s.valid].any()
    assert int((values < threshold).sum()) <= math.floor(alpha * n)
    assert int(kept.sum()) >= n - math.floor(alpha * n)


def test_ignored_tokens_do_not_move_the_threshold():
    s = scores_with_ties(200, 0)
    spiked = TokenScores(loss=torch.where(s.valid, s.loss, torch.full_like(s.loss, 1e9)),
                         entropy=s.entropy, valid=s.valid)
    assert var_threshold(spiked.loss, s.valid, 0.5) == var_threshold(s.loss, s.valid, 0.5)


def test_alpha_zero_keeps_every_valid_token_and_empty_batch_keeps_none():
    s = scores_with_ties(100, 1)
    sel = ESLMPolicy(0.0, "loss")(s)
    assert torch.equal(sel.kept, s.valid) and sel.normalizer == float(s.valid.sum())
    empty = TokenScores(loss=s.loss, entropy=s.entropy, valid=torch.zeros_like(s.valid))
    sel = ESLMPolicy(0.5, "loss")(empty)
    assert not sel.kept.any() and sel.normalizer == 0.0 and sel.threshold is None


def test_eslm_entropy_score_uses_entropy():
    s = scores_with_ties(300, 2)
    sel = ESLMPolicy(0.6, "entropy")(s)
    assert torch.equal(sel.kept, s.valid & (s.entropy >= var_threshold(s.entropy, s.valid, 0.6)))


def test_random_policy_keeps_as_many_as_eslm_uniformly_among_valid():
    s = scores_with_ties(400, 3)
    eslm = ESLMPolicy(0.7, "loss")(s)
    torch.manual_seed(0)
    picks = torch.zeros(400)
    for _ in range(200):
        sel = RandomPolicy(ESLMPolicy(0.7, "loss"))(s)
        assert int(sel.kept.sum()) == int(eslm.kept.sum()) == sel.normalizer
        assert not sel.kept[~s.valid].any()
        picks += sel.kept.float()
    # Uniform: each valid token is picked about kept/valid of the time.
    rate = picks[s.valid] / 200
    assert abs(rate.mean().item() - eslm.normalizer / float(s.valid.sum())) < 1e-6
    assert rate.std().item() < 0.1


def test_build_policy():
    def build(selection):
        return build_policy(Config(selection=SelectionConfig(selection=selection)), vocab_size=128)

    assert build("none") is None
    assert isinstance(build("eslm"), ESLMPolicy)
    assert isinstance(build("random"), RandomPolicy)


@pytest.mark.parametrize("mode", ["sketch-exact", "exact"])
def test_policy_threshold_modes_agree_with_the_exact_rule(mode):
    s = scores_with_ties(3000, 4)
    expected = var_threshold(s.loss, s.valid, 0.6)
    sel = ESLMPolicy(0.6, "loss", threshold_mode=mode, sketch_size=16)(s)
    assert sel.threshold == float(expected)
    assert torch.equal(sel.kept, keep_mask(s.loss, s.valid, expected))


def test_policy_sketch_mode_keeps_a_superset_within_its_bound():
    g = torch.Generator().manual_seed(5)
    s = TokenScores(loss=torch.rand(5000, generator=g), entropy=torch.rand(5000, generator=g),
                    valid=torch.ones(5000, dtype=torch.bool))
    exact = keep_mask(s.loss, s.valid, var_threshold(s.loss, s.valid, 0.5))
    sel = ESLMPolicy(0.5, "loss", threshold_mode="sketch", sketch_size=64)(s)
    assert not (exact & ~sel.kept).any()
    assert int(sel.kept.sum()) - int(exact.sum()) <= 5000 // 64
