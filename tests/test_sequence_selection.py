"""--eslm-granularity sequence (eslm/sequence.py, training/step.py `select_sequences`): whole sequences of the
global batch kept before the training pass, scored by the student without autograd, by a proxy, or drawn at
random; its FLOPs (hand-computed ones in test_lfr_skip.test_flops_by_hand), sample counters, one-process
equivalence under DP2, TP2 and PP2, and the refusals."""
import os

import pytest
import torch

from helpers import flags, run, straight_and_resumed, without_timing
from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.errors import UserError
from megatron_eslm.model.gpt import GPTModel
from test_llama import MatmulFlops
from test_parallel_training import TWO_RANK_BASICS, equal_to_one_process

SEQUENCE = ["--selection", "eslm", "--eslm-granularity", "sequence", "--eslm-alpha", "0.5"]
RANDOM = ["--selection", "random", "--eslm-granularity", "sequence", "--eslm-alpha", "0.5"]
ONE_STEP = ["--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0"]


def forwards(monkeypatch) -> list[tuple[int, bool, bool]]:
    """(samples, training mode, autograd on) of each forward of the model."""
    seen = []
    forward = GPTModel.forward

    def counted(self, tokens, *args, **kwargs):
        seen.append((tokens.shape[0], self.training, torch.is_grad_enabled()))
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(GPTModel, "forward", counted)
    return seen


def test_scores_without_autograd_and_trains_the_kept_half(tiny_corpus, monkeypatch):
    """Each step: a no-autograd eval-mode forward over the 8 candidates (2 micro-batches of 4), then one
    training forward of the 4 kept; half the samples seen are trained, and half the tokens."""
    seen = forwards(monkeypatch)
    _, records = run(flags(tiny_corpus, *SEQUENCE, "--eval-iters", "0", "--train-iters", "2"))
    assert seen == [(4, False, False), (4, False, False), (4, True, True)] * 2
    assert [r["samples_seen"] for r in records] == [8, 16]
    assert [r["samples_trained"] for r in records] == [4, 8]
    assert all(r["kept_fraction"] == 0.5 and r["kept"] == 128 and r["threshold"] is not None for r in records)
    assert records[-1]["tokens_trained"] == 8 * 32


def test_executed_flops_are_the_matmuls_that_run(tiny_corpus):
    """At keep 0.5 a step runs (1/3 + 1/2) of a dense step on the same candidates (at most 0.85x), counted
    by the matmuls dispatched; the random control, which scores nothing, half."""
    for selection, share in ((SEQUENCE, 5 / 6), (RANDOM, 1 / 2)):
        with MatmulFlops() as matmuls:
            _, records = run(flags(tiny_corpus, *selection, *ONE_STEP))
        record = records[0]
        assert matmuls.flops == record["executed_flops"]
        assert record["executed_flops"] == pytest.approx(share * record["dense_flops"], rel=1e-12)
        assert record["executed_flops"] <= 0.85 * record["dense_flops"]
        assert record["samples_trained"] / record["samples_seen"] == 0.5


def test_keeps_the_highest_mean_losses(tiny_corpus, monkeypatch):
    """The kept sequences are the candidates whose mean token loss (by the same model, in eval mode) is
    among the top half; the random control keeps another half at the same count."""
    from megatron_eslm.eslm.sequence import SequencePolicy
    chosen = []
    kept = SequencePolicy.kept

    def spy(self, local, candidates, device):
        out = kept(self, local, candidates, device)
        chosen.append((None if local is None else local.reshape(-1).clone(), out[0].clone(), out[1]))
        return out

    monkeypatch.setattr(SequencePolicy, "kept", spy)
    run(flags(tiny_corpus, *SEQUENCE, *ONE_STEP))
    scores, indices, threshold = chosen[0]
    assert set(indices.tolist()) == set(scores.argsort(descending=True)[:4].tolist())
    assert threshold == scores.sort(descending=True).values[3]
    run(flags(tiny_corpus, *RANDOM, *ONE_STEP))
    assert chosen[1][0] is None and len(set(chosen[1][1].tolist())) == 4


@pytest.mark.slow
def test_resume_is_exact(tiny_corpus, tmp_path):
    _, straight, _, resumed = straight_and_resumed(tiny_corpus, tmp_path, *SEQUENCE)
    assert without_timing(resumed) == without_timing(straight[3:])
    assert resumed[-1]["samples_trained"] == 24


@pytest.mark.slow
@pytest.mark.parametrize("selection, layouts", [(SEQUENCE, TWO_RANK_BASICS), (RANDOM, {"dp2": TWO_RANK_BASICS["dp2"]})],
                         ids=["eslm", "random"])
def test_dp2_tp2_pp2_equal_one_process(tiny_corpus, selection, layouts):
    """8 candidates a step (2 micro-batches of 4, or of 2 on each DP2 replica), 4 kept: one micro-batch of 4
    for one process and on TP2 and PP2 (the last stage scores, the others receive the kept ids), one of 2 on
    each DP2 replica (the scores and the kept sequences' tokens all-gathered, cut as the sampler cuts a
    batch). The random control's draw is the same on every rank: DP2 moves its sequences alike."""
    records = equal_to_one_process(tiny_corpus, 2, layouts, [*selection, "--global-batch-size", "8"])
    assert all(r["kept_fraction"] == 0.5 for r in records) and records[-1]["samples_trained"] == 12


@pytest.mark.parametrize("argv, world, message", [
    (["--eslm-granularity", "sample"], 1, "--eslm-granularity must be one of token, sequence"),
    (["--selection", "rho1", "--reference-load", "x", "--eslm-granularity", "sequence"], 1,
     "--eslm-granularity sequence is read by --selection eslm and random only"),
    (["--eslm-scorer", "proxy", "--proxy-load", "x"], 1, "--eslm-scorer proxy needs --selection eslm --eslm-granularity"),
    ([*SEQUENCE, "--eslm-scorer", "proxy"], 1, "--eslm-scorer proxy needs --proxy-load"),
    ([*SEQUENCE, "--proxy-load", "x"], 1, "--proxy-load is only read by --eslm-scorer proxy"),
    ([*SEQUENCE, "--eslm-alpha", "0.7"], 1, "--eslm-alpha 0.7 keeps 3 of the 8 sequences"),
    (SEQUENCE, 2, "keeps 4 of the 8 sequences of a global batch, not a multiple of --micro-batch-size 4 x "
                  "data-parallel size 2"),
    ([*SEQUENCE, "--context-parallel-size", "2", "--hidden-dropout", "0", "--attention-dropout", "0"], 2,
     "--eslm-granularity sequence does not run with --context-parallel-size 2"),
    ([*SEQUENCE, "--zero-stage", "1"], 1, "--eslm-granularity sequence does not run with --deepspeed"),
    ([*SEQUENCE, "--eslm-scorer", "proxy", "--proxy-load", "x", "--tensor-model-parallel-size", "2"], 2,
     "--eslm-scorer proxy runs a whole frozen model on every rank"),
])
def test_bad_flags_fail_in_one_line(tiny_corpus, argv, world, message):
    with pytest.raises(UserError, match=message):
        validate_layout(parse_args(flags(tiny_corpus, *argv)), world)


PROXY_MODEL = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2"]


def test_proxy_scores_and_its_forward_is_counted(tiny_corpus, tmp_path, monkeypatch):
    """A 1-layer, hidden-16 proxy (same tokenizer) scores the 8 candidates: its eval-mode no-autograd forwards
    and the student's one training forward of the 4 kept are what runs; executed FLOPs = the matmuls
    dispatched = a dense step on the kept + the proxy's forward; the paper count charges the student only
    (the dropped never reached it)."""
    proxy = str(tmp_path / "proxy")
    run(flags(tiny_corpus, *PROXY_MODEL, *ONE_STEP, "--selection", "none", "--save", proxy))
    seen = forwards(monkeypatch)
    with MatmulFlops() as matmuls:
        _, records = run(flags(tiny_corpus, *SEQUENCE, *ONE_STEP, "--eslm-scorer", "proxy", "--proxy-load", proxy))
    assert seen == [(4, False, False), (4, False, False), (4, True, True)]
    record = records[0]
    assert matmuls.flops == record["executed_flops"]
    half = record["dense_flops"] / 2  # the kept half, trained dense
    assert half < record["executed_flops"] < 0.6 * record["dense_flops"]
    assert record["paper_flops"] == pytest.approx(half, rel=1e-12)
    assert record["samples_trained"] == 4 and record["kept_fraction"] == 0.5


def test_proxy_recipe_is_at_most_an_eighth_of_the_student():
    """examples/gpt2_124m_sequence: both configs parse with the student's layout, share the padded
    vocabulary and sequence length, and the proxy has at most 1/8 of the student's non-embedding parameters."""
    from helpers import REPO
    from megatron_eslm.training.memory import layer_parameters
    configs = {}
    for name in ("proxy", "student"):
        configs[name] = parse_args(["--config", os.path.join(REPO, "examples", "gpt2_124m_sequence", f"{name}.json"),
                                    "--data-path", "x", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
                                    "--save", "x", *(["--proxy-load", "x"] if name == "student" else [])])
        validate_layout(configs[name], 8)
    proxy, student = (configs[name].model for name in ("proxy", "student"))
    blocks = {name: m.num_layers * sum(p.numel for p in layer_parameters(m, 1)) for name, m in
              (("proxy", proxy), ("student", student))}
    assert 8 * blocks["proxy"] <= blocks["student"]
    assert proxy.make_vocab_size_divisible_by == student.make_vocab_size_divisible_by
    assert proxy.max_position_embeddings >= student.seq_length
