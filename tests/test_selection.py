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
    assert not sel.kept.any() and sel.normalizer == 0.0 and sel.threshold == float("inf")  # no threshold


def test_eslm_entropy_score_uses_entropy():
    s = scores_with_ties(300, 2)
    sel = ESLMPolicy(0.6, "entropy")(s)
    assert torch.equal(sel.kept, s.valid & (s.entropy >= var_threshold(s.entropy, s.valid, 0.6)))


def test_random_policy_keeps_as_many_as_eslm_uniformly_among_valid():
    s = scores_with_ties(400, 3)
    eslm = ESLMPolicy(0.7, "loss")(s)
    policy = RandomPolicy(ESLMPolicy(0.7, "loss"), seed=0)
    picks, steps = torch.zeros(400), 200
    for step in range(1, steps + 1):
        policy.start_step(step)
        sel = policy(s)
        assert int(sel.kept.sum()) == int(eslm.kept.sum()) == sel.normalizer
        assert not sel.kept[~s.valid].any()
        picks += sel.kept.float()
    # Uniform: each valid token's pick rate is a binomial proportion around q = kept / valid, sd
    # sqrt(q (1 - q) / steps) (0.033 here). Measured: every token within 2.6 sd, the rates' spread 0.92 sd.
    q = float(eslm.normalizer) / float(s.valid.sum())
    sd = math.sqrt(q * (1 - q) / steps)
    z = (picks[s.valid] / steps - q) / sd
    assert z.abs().max().item() < 4.5  # P(any of the 312 tokens beyond 4.5 sd) = 0.2%
    assert 0.75 < z.std().item() < 1.25  # the spread's own sd is 4%: 6 of those either side


def test_random_policy_draws_per_replica_and_replays_on_resume():
    """Replicas (streams) drop different positions; the same (seed, stream, step, micro-batch) draws the
    same tokens, so a resumed run needs no generator state."""
    s = scores_with_ties(400, 3)

    def kept(stream: int, step: int, micro_batches: int = 2) -> list[torch.Tensor]:
        policy = RandomPolicy(ESLMPolicy(0.7, "loss"), seed=5, stream=stream)
        policy.start_step(step)
        return [policy(s).kept for _ in range(micro_batches)]

    first, second = kept(0, 3)
    assert not torch.equal(first, second)  # a new draw per micro-batch
    assert all(torch.equal(a, b) for a, b in zip(kept(0, 3), (first, second)))
    assert not torch.equal(kept(1, 3)[0], first) and not torch.equal(kept(0, 4)[0], first)


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


def flat(values) -> TokenScores:
    loss = torch.tensor(values, dtype=torch.float32)
    return TokenScores(loss=loss, entropy=torch.zeros_like(loss), valid=torch.ones_like(loss, dtype=torch.bool))


def test_previous_step_scope_by_hand():
    """Step 2's threshold is the alpha-quantile of ALL of step 1's scores (both micro-batches); step 1 has
    no previous step and takes each micro-batch's own threshold; the normaliser stays the kept count."""
    policy = ESLMPolicy(0.5, "loss", threshold_mode="sketch-exact", sketch_size=2048, scope="previous-step")
    policy.start_step(1)
    first = [policy(flat([4.0, 1.0, 3.0, 2.0])), policy(flat([8.0, 5.0, 7.0, 6.0]))]
    assert [s.threshold for s in first] == [3.0, 7.0]  # x_(2) of each micro-batch (k = floor(0.5 * 4))
    policy.start_step(2)
    second = [policy(flat([0.0, 4.5, 5.0, 9.0])), policy(flat([13.0, 11.0, 12.0, 10.0]))]
    # x_(4) of 1..8 = 5, exact: 8 scores <= m, so the sketch is exact (bound 0)
    assert [s.threshold for s in second] == [5.0, 5.0]
    assert [s.kept.tolist() for s in second] == [[False, False, True, True], [True] * 4]
    assert [(s.normalizer, s.rank_error_bound) for s in second] == [(2.0, 0), (4.0, 0)]
    assert second[0].bytes_sent == 4 * (2048 + 2) + 8  # the micro-batch's sketch, the kept count
    policy.start_step(3)
    assert policy(flat([4.0])).threshold == 10.0  # x_(4) of step 2's 0, 4.5, 5, 9, 10, 11, 12, 13


@pytest.mark.parametrize("mode", ["sketch", "sketch-exact", "exact"])
def test_previous_step_scope_within_the_sketch_bound(mode):
    """With a small sketch, step 2's threshold is the exact rule's on step 1's concatenated scores at a
    rank within the stated bound B = min(sigma, k): sigma = sum over micro-batches t of E_t (the merge,
    floor((n_t - 1) / m) on one rank) plus floor((N_t - 1) / m) (compacting the N_t scores so far)."""
    g = torch.Generator().manual_seed(3)
    step1 = [torch.rand(n, generator=g) for n in (1000, 333, 17)]
    policy = ESLMPolicy(0.7, "loss", threshold_mode=mode, sketch_size=16, scope="previous-step")
    policy.start_step(1)
    for scores in step1:
        policy(TokenScores(loss=scores, entropy=scores, valid=torch.ones_like(scores, dtype=torch.bool)))
    policy.start_step(2)
    sel = policy(flat([0.1, 0.5, 0.9]))
    x = torch.cat(step1).sort().values
    k = math.floor(0.7 * x.numel())
    merges = (1000 - 1) // 16 + (333 - 1) // 16 + (17 - 1) // 16
    compactions = (1000 - 1) // 16 + (1333 - 1) // 16 + (1350 - 1) // 16
    bound = min(merges + compactions, k)
    assert sel.rank_error_bound == bound == (62 + 20 + 1) + (62 + 83 + 84)
    assert bool((x[k - bound:k + 1] == sel.threshold).any())
    assert sel.kept.tolist() == [s >= sel.threshold for s in (0.1, 0.5, 0.9)]


def test_previous_step_state_round_trips_and_resumes_the_same_threshold():
    def policy():
        return ESLMPolicy(0.5, "loss", sketch_size=4, scope="previous-step")
    straight = policy()
    straight.start_step(1)
    straight(flat([float(v) for v in range(20)]))
    state = straight.state_dict()
    resumed = policy()
    resumed.load_state_dict(state)
    for p in (straight, resumed):
        p.start_step(2)
    got, want = resumed(flat([3.0, 12.0])), straight(flat([3.0, 12.0]))
    assert (got.threshold, got.rank_error_bound, got.kept.tolist()) == (want.threshold, want.rank_error_bound,
                                                                       want.kept.tolist())
    # z_(10) of 20 scores in blocks of 5, compacted to 4 blocks of 5: sigma = E + floor(19 / 4) = 4 + 4
    assert got.threshold == 10.0 and got.rank_error_bound == 8
    assert state["current"]["payload"].shape == (4 + 2,)  # one sketch of m blocks, however many calls
    assert ESLMPolicy(0.5, "loss").state_dict() == {}  # the micro-batch scope has no state
    with pytest.raises(ValueError, match="scope"):
        ESLMPolicy(0.5, "loss", scope="global")
