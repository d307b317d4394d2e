"""The selection family (ada-eslm, eslm-kd, rho1, lfr) against hand-computed examples and reference
formulas; their state round trips; end-to-end runs, exact resume and FLOPs accounting in the trainer."""
import copy
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import flags, run, straight_and_resumed, without_timing
from megatron_eslm.config import ModelConfig, finalize_model, parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.eslm.ada import AdaESLMPolicy, AlphaRule, droppable_count
from megatron_eslm.eslm.frozen_model import FrozenPass, load_frozen_model
from megatron_eslm.eslm.kd import ESLMKDPolicy, kd_loss_sum
from megatron_eslm.eslm.lfr import LFRPolicy, Phases
from megatron_eslm.eslm.policies import ESLMPolicy
from megatron_eslm.eslm.rho1 import Rho1Policy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import TokenScores
from megatron_eslm.training.flops import forward_flops, micro_batch_flops


def scores_of(loss, valid=None) -> TokenScores:
    loss = torch.tensor(loss, dtype=torch.float32)
    valid = torch.ones_like(loss, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return TokenScores(loss=loss, entropy=torch.zeros_like(loss), valid=valid)


# ----------------------------------------------------------------------------------------- ada-eslm
def test_droppable_count_by_hand():
    # masses 1 - exp(-loss): 0.00995, 0.09516, 0.86466, 0.95021; total 1.91998
    loss = torch.tensor([2.0, 0.01, 3.0, 0.1])
    valid = torch.ones(4, dtype=torch.bool)
    assert droppable_count(loss, loss, valid, 0.06) == 2  # 0.1051 <= 0.1152
    assert droppable_count(loss, loss, valid, 0.05) == 1  # 0.1051 > 0.0960
    assert droppable_count(loss, loss, valid, 0.0) == 0
    # ignored tokens are left out; the order is by the score, the mass by the loss
    assert droppable_count(loss, loss, torch.tensor([True, False, True, True]), 0.06) == 1
    assert droppable_count(-loss, loss, valid, 0.5) == 1  # highest loss first: 0.95 <= 0.96
    assert droppable_count(loss, loss, valid, 1.0) == 4  # the whole mass is within a budget of 1


def test_droppable_count_never_splits_a_tie():
    # three tokens of equal mass m: one score-1 tie of two, then score 2. Budget 0.5 allows 1.5 m: the
    # tie (2 m) does not fit whole, so nothing is dropped (a split at the tie would have dropped one).
    equal = torch.ones(3)
    valid = torch.ones(3, dtype=torch.bool)
    assert droppable_count(torch.tensor([1.0, 1.0, 2.0]), equal, valid, 0.5) == 0
    assert droppable_count(torch.tensor([1.0, 1.0, 2.0]), equal, valid, 0.7) == 2  # 2 m <= 2.1 m
    # budget 0: only the tokens below the lowest score that carries mass, here the two zero losses
    assert droppable_count(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.0, 0.0, 1.0]), valid, 0.0) == 2
    assert droppable_count(torch.tensor([0.5, 0.7, 0.1]), torch.tensor([0.0, 0.0, 1.0]), valid, 0.0) == 0
    assert droppable_count(torch.tensor([0.5, 0.7, 0.1]), torch.zeros(3), valid, 0.0) == 3  # no mass at all
    assert droppable_count(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), 0.5) == 0


def test_ada_grad_mass_alpha_trajectory_on_a_synthetic_signal():
    rule = AlphaRule("grad-mass", alpha_min=0.05, alpha_max=0.5, budget=0.105, momentum=0.5, train_iters=100)
    policy = AdaESLMPolicy(ESLMPolicy(0.2, "loss"), rule)
    # The score is the loss, so tied losses would be dropped or kept whole (the tie rule); the losses of
    # the tokens the count cuts through are therefore distinct (below 1e-9 apart in mass, 2^-32 units).
    # 100 learnt tokens (loss 0: no gradient mass) and 100 hard ones (mass ~1): the first 100 + 10 may go.
    learnt = scores_of([0.0] * 100 + [30.0 + i / 100 for i in range(100)])
    # all tokens nearly alike (the lower losses carry a little less mass): floor(0.105 * 200) = 21 may go.
    uniform = scores_of([2.0 + i * 1e-4 for i in range(200)])
    expected, alpha = [], 0.2
    for signal, level in [(learnt, 0.55)] * 4 + [(uniform, 0.105)] * 4:
        sel = policy(signal)
        # the selection uses the alpha from before this micro-batch, then alpha moves toward the level
        assert sel.normalizer == float(ESLMPolicy(alpha, "loss")(signal).normalizer)
        alpha = min(max(0.5 * alpha + 0.5 * level, 0.05), 0.5)
        expected.append(alpha)
        assert policy.alpha == pytest.approx(alpha, abs=1e-12)
    assert expected[3] == 0.5  # clipped at --eslm-alpha-max
    assert expected[-1] == pytest.approx(0.105 + 0.395 / 16)
    restored = AdaESLMPolicy(ESLMPolicy(0.2, "loss"), rule)
    restored.load_state_dict(copy.deepcopy(policy.state_dict()))
    assert restored.alpha == policy.alpha


@pytest.mark.parametrize("kind,values", [("linear", [0.1, 0.25, 0.4, 0.55, 0.7]),
                                         ("cosine", [0.1, 0.4 - 0.3 * math.sqrt(0.5), 0.4,
                                                     0.4 + 0.3 * math.sqrt(0.5), 0.7])])
def test_ada_schedules(kind, values):
    policy = AdaESLMPolicy(ESLMPolicy(0.5, "loss"), AlphaRule(kind, 0.1, 0.7, 0.1, 0.9, train_iters=4))
    for iteration, value in zip([0, 1, 2, 3, 5], values):
        policy.start_step(iteration)
        assert policy.alpha == pytest.approx(value)


# ----------------------------------------------------------------------------------------- rho1
def test_rho1_keeps_the_largest_excess_loss_by_hand():
    policy = Rho1Policy(ESLMPolicy(0.5, "loss"), reference=None)
    policy._reference = FrozenPass(hidden=torch.zeros(5, 1), scores=scores_of([1.0, 0.5, 2.5, 1.0, 0.0]),
                                   flops=0.0)
    # excess = [2, 0.5, -0.5, 4, (ignored)]; n = 4, k = 2: threshold 2, tokens 0 and 3 kept
    sel = policy(scores_of([3.0, 1.0, 2.0, 5.0, 9.0], valid=[True, True, True, True, False]))
    assert sel.kept.tolist() == [True, False, False, True, False]
    assert sel.threshold == 2.0 and sel.normalizer == 2.0


def tiny_gpt(seed: int, layers: int = 1, hidden: int = 16, vocab: int = 48) -> GPTModel:
    torch.manual_seed(seed)
    cfg = finalize_model(ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=2, seq_length=8,
                                     hidden_dropout=0.0, attention_dropout=0.0))
    return GPTModel(cfg, vocab).eval()


def test_rho1_with_a_reference_model_matches_full_logits():
    student, reference = tiny_gpt(0), tiny_gpt(1, layers=2, hidden=24).requires_grad_(False)
    tokens = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = tokens.roll(-1, 1)
    policy = Rho1Policy(ESLMPolicy(0.75, "loss", threshold_mode="exact"), reference)
    policy.prepare(tokens, labels, None)
    hidden = student(tokens)
    out = student.loss(hidden, labels, policy)
    excess = (F.cross_entropy(student.logits(hidden).flatten(0, 1), labels.flatten(), reduction="none")
              - F.cross_entropy(reference.logits(reference(tokens)).flatten(0, 1), labels.flatten(),
                                reduction="none")).detach()
    threshold = excess.sort().values[12]  # floor(0.75 * 16)
    assert out.selection.kept.tolist() == (excess >= threshold).tolist()
    assert out.selection.kept.sum() == 4
    assert policy.extra_flops() == forward_flops(reference.cfg, 48, 16, 16)


# ----------------------------------------------------------------------------------------- eslm-kd
def test_kd_loss_matches_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    expected = 4.0 * F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True,
                              reduction="sum")
    torch.testing.assert_close(kd_loss_sum(student, teacher, 2.0), expected)
    assert kd_loss_sum(teacher, teacher, 3.0).abs() < 1e-5


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("score_by", ["student", "teacher"])
def test_kd_objective_and_gradient_match_full_logits(float64, score_by):
    student, teacher = tiny_gpt(0), tiny_gpt(1, layers=2, hidden=24).requires_grad_(False)
    tokens = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = tokens.roll(-1, 1)
    labels[0, :2] = -100
    policy = ESLMKDPolicy(ESLMPolicy(0.5, "entropy", threshold_mode="exact"), teacher, kd_alpha=0.3,
                          temperature=2.0, score_by=score_by)
    policy.prepare(tokens, labels, None)
    hidden = student(tokens)
    out = student.loss(hidden, labels, policy)
    policy.objective(student, hidden, out).backward()
    got = [p.grad.clone() for p in student.parameters()]
    kept = out.selection.kept

    student.zero_grad()
    logits = student.logits(student(tokens)).flatten(0, 1)
    teacher_logits = teacher.logits(teacher(tokens)).flatten(0, 1)
    source = logits if score_by == "student" else teacher_logits
    logp = F.log_softmax(source.detach(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    valid = labels.flatten() != -100
    expected_kept = valid & (entropy >= entropy[valid].sort().values[valid.sum() // 2])
    assert kept.tolist() == expected_kept.tolist()
    k = int(kept.sum())
    ce = F.cross_entropy(logits[kept], labels.flatten()[kept], reduction="sum") / k
    kl = F.kl_div(F.log_softmax(logits[kept] / 2, -1), F.log_softmax(teacher_logits[kept] / 2, -1),
                  log_target=True, reduction="sum") * 4 / k
    (0.7 * ce + 0.3 * kl).backward()
    for (name, p), g in zip(student.named_parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    teacher_head = 2 * 16 * 48 * 24 if score_by == "teacher" else 0
    assert policy.extra_flops() == pytest.approx(
        forward_flops(teacher.cfg, 48, 16, 0) + teacher_head + 2 * k * 48 * (3 * 16 + 24))


# ----------------------------------------------------------------------------------------- lfr
def test_lfr_phases():
    phases = Phases(learn=2, focus=3, review=1)
    assert [phases.phase(t) for t in range(1, 11)] == ["learn", "learn", "focus", "focus", "focus", "review",
                                                        "focus", "focus", "focus", "review"]


def lfr_batch(log_ppls, valid_per_sample=2):
    """Samples whose valid tokens all have loss = the sample's log-perplexity (one ignored token each)."""
    loss = [[v] * valid_per_sample + [0.0] for v in log_ppls]
    valid = [[True] * valid_per_sample + [False] for _ in log_ppls]
    return scores_of(sum(loss, []), sum(valid, []))


def lfr_step(policy, iteration, indices, log_ppls):
    policy.start_step(iteration)
    policy.prepare(None, None, torch.tensor(indices))
    return policy(lfr_batch(log_ppls))


def test_lfr_drops_the_easiest_recent_samples_by_hand():
    policy = LFRPolicy(Phases(learn=1, focus=1, review=2), drop_fraction=0.5)
    # step 1 learn: everything kept, recorded
    sel = lfr_step(policy, 1, [0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    assert sel.normalizer == 8 and sel.threshold is None
    # step 2 focus: window = steps 1-2, sorted [0.5, 1, 2, 3, 3.5, 4, 5, 6]; floor(0.5 * 8) = 4 -> 3.5
    sel = lfr_step(policy, 2, [4, 5, 6, 7], [0.5, 3.5, 5.0, 6.0])
    assert sel.threshold == 3.5
    assert sel.kept.view(4, 3).any(1).tolist() == [False, True, True, True]
    assert sel.normalizer == 6 and not sel.kept.view(4, 3)[:, 2].any()
    # steps 3-4 review: everything kept; step 3 prunes step 1's entries (window of 2 steps)
    assert lfr_step(policy, 3, [8, 9], [9.0, 9.0]).normalizer == 4
    assert sorted(policy.table) == [4, 5, 6, 7, 8, 9]
    state = copy.deepcopy(policy.state_dict())
    assert lfr_step(policy, 4, [10, 11], [0.1, 0.2]).normalizer == 4
    # step 5 focus: window = steps 4-5: [0.1, 0.2, 1, 7]; threshold = x_(2) = 1.0
    sel = lfr_step(policy, 5, [12, 13], [1.0, 7.0])
    assert sel.kept.view(2, 3).any(1).tolist() == [True, True] and sel.threshold == 1.0
    # the same from the saved state
    restored = LFRPolicy(Phases(learn=1, focus=1, review=2), drop_fraction=0.5)
    restored.load_state_dict(state)
    assert restored.iteration == 3
    lfr_step(restored, 4, [10, 11], [0.1, 0.2])
    assert lfr_step(restored, 5, [12, 13], [1.0, 7.0]).threshold == 1.0
    assert restored.table == policy.table


def test_lfr_needs_sample_indices():
    with pytest.raises(UserError, match="--selection lfr"):
        LFRPolicy(Phases(1, 1, 1), 0.3).prepare(None, None, None)


# ----------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def dense_checkpoint(tiny_corpus, tmp_path_factory):
    """A dense model of another size trained briefly: the teacher / reference."""
    save = str(tmp_path_factory.mktemp("teacher") / "ckpt")
    run(flags(tiny_corpus, "--selection", "none", "--num-layers", "1", "--hidden-size", "48",
              "--train-iters", "4", "--save", save))
    return save


def test_flags_of_the_family_fail_in_one_line(tiny_corpus, dense_checkpoint):
    for extra, message in [(["--selection", "rho1"], "--selection rho1 needs --reference-load"),
                           (["--teacher-load", dense_checkpoint], "--teacher-load is only read by --selection eslm-kd"),
                           (["--eslm-alpha-min", "0.6", "--eslm-alpha-max", "0.5"], "--eslm-alpha-min 0.6"),
                           (["--ada-eslm-rule", "gap"], "--ada-eslm-rule must be one of"),
                           (["--lfr-drop-fraction", "1"], "--lfr-drop-fraction must be in [0, 1)")]:
        with pytest.raises(UserError, match=re.escape(message)):
            parse_args(flags(tiny_corpus, *extra))
    with pytest.raises(UserError, match="--reference-load .*: no checkpoint"):
        load_frozen_model(os.path.dirname(dense_checkpoint), "--reference-load", 384, 32, torch.device("cpu"))
    with pytest.raises(UserError, match="vocabulary of 384 rows, this model has 512"):
        load_frozen_model(dense_checkpoint, "--reference-load", 512, 32, torch.device("cpu"))


@pytest.mark.parametrize("selection,extra", [
    ("ada-eslm", ["--eslm-alpha", "0.3", "--ada-eslm-budget", "0.2", "--ada-eslm-momentum", "0.5"]),
    ("lfr", ["--lfr-mode", "mask", "--lfr-learn-iters", "3", "--lfr-focus-iters", "2", "--lfr-review-iters", "2"]),
])
def test_stateful_policies_resume_exactly(tiny_corpus, tmp_path, selection, extra):
    common = ["--selection", selection, "--hidden-dropout", "0.1", *extra]
    trainer, straight, resumed_trainer, resumed = straight_and_resumed(tiny_corpus, tmp_path, *common)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert without_timing(straight[3:]) == without_timing(resumed)
    assert resumed_trainer.policy.state_dict() == trainer.policy.state_dict()
    if selection == "lfr":  # step 4 is a focus step whose window holds step 3's samples, from the checkpoint
        assert any(r["kept_fraction"] < 1.0 for r in straight[3:5])
    else:
        assert len({r["kept_fraction"] for r in straight}) > 1  # alpha moved


@pytest.mark.parametrize("selection", ["eslm", "ada-eslm"])
def test_previous_step_scope_resumes_exactly(tiny_corpus, tmp_path, selection):
    """The previous step's sketch is checkpointed (also through a wrapping policy): without it the resumed
    step 4 would fall back to per-micro-batch thresholds and log other numbers."""
    common = ["--selection", selection, "--eslm-threshold-scope", "previous-step", "--eslm-sketch-size", "16",
              "--hidden-dropout", "0.1"]
    trainer, straight, resumed_trainer, resumed = straight_and_resumed(tiny_corpus, tmp_path, *common)
    assert without_timing(straight[3:]) == without_timing(resumed)
    state, resumed_state = trainer.policy.state_dict(), resumed_trainer.policy.state_dict()
    if selection == "ada-eslm":
        assert state["alpha"] == resumed_state["alpha"]
        state, resumed_state = state["eslm"], resumed_state["eslm"]
    assert state["step"] == resumed_state["step"] == 6
    for key in ("previous", "current"):  # one running sketch each, of m + 2 words
        assert state[key]["carried"] == resumed_state[key]["carried"]
        assert torch.equal(state[key]["payload"], resumed_state[key]["payload"])
        assert state[key]["payload"].shape == (16 + 2,)
    if selection == "eslm":
        # 2 micro-batches of 128 scores, m = 16: from step 2 on each threshold's bound is sigma = the merges'
        # E = 2 x floor(127 / 16) = 14 plus the compactions' floor(127 / 16) + floor(255 / 16) = 7 + 15;
        # each call sends its sketch (4 x 18 bytes) and the kept count (8 bytes)
        assert straight[0]["threshold_bound"] == 0  # step 1: sketch-exact per micro-batch
        assert all(r["threshold_bound"] == 2 * (14 + 7 + 15) and r["threshold_bytes"] == 2 * (4 * 18 + 8)
                   for r in straight[1:])


def student_flops(record, cfg_argv):
    """Executed FLOPs of the student's own passes for a logged step (GPT samples have no ignored labels;
    the formula is linear, so the step's totals stand for its micro-batches)."""
    cfg = parse_args(cfg_argv)
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    kept = round(record["kept_fraction"] * tokens)
    return micro_batch_flops(cfg.model, 384, tokens, tokens, kept, True).executed


@pytest.mark.parametrize("selection,load_flag", [("rho1", "--reference-load"), ("eslm-kd", "--teacher-load")])
def test_executed_flops_include_the_reference_and_teacher(tiny_corpus, dense_checkpoint, selection, load_flag):
    argv = flags(tiny_corpus, "--selection", selection, load_flag, dense_checkpoint, "--train-iters", "2")
    trainer, records = run(argv)
    frozen = trainer.policy.reference if selection == "rho1" else trainer.policy.teacher
    assert frozen.cfg.hidden_size == 48 and trainer.model.cfg.hidden_size == 32
    tokens = 8 * 32
    for r in records:
        kept = round(r["kept_fraction"] * tokens)
        extra = forward_flops(frozen.cfg, 384, tokens, tokens if selection == "rho1" else 0)
        if selection == "eslm-kd":
            extra += 2 * kept * 384 * (3 * 32 + 48)
        assert r["executed_flops"] == pytest.approx(student_flops(r, argv) + extra)
        assert r["dense_flops"] == micro_batch_flops(trainer.cfg.model, 384, tokens, tokens, tokens, False).dense
