"""--selection lfr --lfr-mode skip (eslm/lfr_skip.py, data/samplers.py): learned blocks never reach the
model; and each record's FLOPs counts (executed, paper) and sample counters, against hand-computed values."""
import pytest

from helpers import flags, run, straight_and_resumed, without_timing
from megatron_eslm.data.samplers import ResumableBatchSampler, SkippingBatchSampler
from megatron_eslm.model.gpt import GPTModel

# The tiny model of `flags`: L 2, h 32, f 128, s 32, n = 4 heads of d 8, V 384 (320 pieces padded), 8 x 32
# tokens a step. Transformer forward a token: T = L (2 (4h^2 + 2hf) + 4sh) = 2 (2 (4096 + 8192) + 4096);
# head forward 2hV; F = T + 2hV.
T, HEAD, TOKENS = 57344.0, 2 * 32 * 384.0, 256
F = T + HEAD
DENSE = TOKENS * (3 * T + HEAD + 2 * HEAD)  # the fused dense head backward: 4hV a token
SMALL = ["--split", "1,99,0"]  # 4 training documents: 24 blocks of 33 tokens, one pass in the 3 learn steps
LFR = ["--selection", "lfr", "--lfr-learn-iters", "3", "--lfr-focus-iters", "3", "--lfr-review-iters", "1",
       "--lfr-drop-fraction", "0.5"]


@pytest.mark.slow
def test_flops_by_hand(tiny_corpus):
    """Dense: executed = paper = 256 (3T + 3 * 2hV) = 62,914,560. Token ESLM with K kept tokens: executed =
    256 (3T + 2hV) + K 3 * 2hV (the selective head backward recomputes), paper = 256 F + 2 F K. LFR skip in a
    focus step: a dense step, both counts dense's. Sequence ESLM keeping 4 of the 8 sequences (128 tokens):
    executed = 256 F (the scoring forward) + 128 (3T + 3 * 2hV) (a dense step on the kept), paper = 256 F +
    2 F 128; dense, of the 8 candidates, 62,914,560."""
    assert DENSE == 62_914_560
    _, dense = run(flags(tiny_corpus, "--selection", "none", "--train-iters", "1", "--lr-warmup-iters", "0"))
    assert dense[0]["executed_flops"] == dense[0]["paper_flops"] == DENSE
    _, eslm = run(flags(tiny_corpus, "--selection", "eslm", "--eslm-threshold", "exact", "--train-iters", "1", "--lr-warmup-iters", "0"))
    kept = eslm[0]["kept"]
    assert 0 < kept < TOKENS
    assert eslm[0]["executed_flops"] == TOKENS * (3 * T + HEAD) + 3 * HEAD * kept
    assert eslm[0]["paper_flops"] == TOKENS * F + 2 * F * kept
    _, lfr = run(flags(tiny_corpus, *SMALL, *LFR, "--train-iters", "4"))
    assert lfr[3]["samples_seen"] - lfr[2]["samples_seen"] > 8  # step 4 is a focus step that skipped
    assert lfr[3]["executed_flops"] == lfr[3]["paper_flops"] == DENSE
    _, sequence = run(flags(tiny_corpus, "--selection", "eslm", "--eslm-granularity", "sequence", "--train-iters", "1",
                            "--lr-warmup-iters", "0"))
    assert sequence[0]["executed_flops"] == TOKENS * F + 128 * (3 * T + 3 * HEAD) == 52_428_800
    assert sequence[0]["paper_flops"] == TOKENS * F + 2 * F * 128
    assert sequence[0]["dense_flops"] == DENSE


def test_sampler_without_skips_is_the_resumable_split():
    for rank in range(2):
        plain = list(ResumableBatchSampler(64, 8, 2, rank, 2))[:6]
        skipping = SkippingBatchSampler(40, 8, 2, 8, 1, 3, lambda step: None, rank, 2)
        assert list(skipping) == plain and skipping.position == 32


def test_sampler_revisits_blocks_and_passes_over_skipped_ones():
    skipped = [False] * 10
    skipped[1] = skipped[2] = True
    sampler = SkippingBatchSampler(10, 6, 2, 4, 5, 6, lambda step: skipped if step == 6 else None)
    assert list(sampler) == [[6, 7], [8, 9], [0, 3], [4, 5]] and sampler.position == 16


def counting(monkeypatch) -> list[int]:
    """Samples each training forward of the model is handed."""
    seen = []
    forward = GPTModel.forward

    def counted(self, tokens, *args, **kwargs):
        if self.training:
            seen.append(tokens.shape[0])
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(GPTModel, "forward", counted)
    return seen


@pytest.mark.slow
def test_focus_steps_train_no_skipped_block(tiny_corpus, monkeypatch):
    """Over 2 epochs' steps: every step hands the model 8 samples, none of them skipped; the
    sampler passed over exactly samples_seen - samples_trained blocks; tokens trained and executed FLOPs
    per step are dense's."""
    from megatron_eslm.eslm.lfr_skip import LFRSkipPolicy
    masks, loaded = {}, []
    skipped, getitem = LFRSkipPolicy.skipped, None

    def spy(self, step):
        mask = skipped(self, step)
        masks[step] = None if mask is None else mask.copy()
        return mask

    monkeypatch.setattr(LFRSkipPolicy, "skipped", spy)
    from megatron_eslm.data.gpt_dataset import GPTDataset
    getitem = GPTDataset.__getitem__
    monkeypatch.setattr(GPTDataset, "__getitem__", lambda self, i: loaded.append(int(i)) or getitem(self, i))
    seen = counting(monkeypatch)
    trainer, records = run(flags(tiny_corpus, *SMALL, *LFR, "--eval-iters", "0"))
    assert len(trainer.train_ds) == 24
    assert seen == [4, 4] * 6  # micro-batches of 4, every step a full global batch
    steps = [loaded[8 * k:8 * k + 8] for k in range(6)]
    passed = 0
    for step, blocks in enumerate(steps, 1):
        mask = masks.get(step)
        if mask is not None:
            assert not any(mask[b] for b in blocks)
            passed += int(mask.sum() > 0)
    assert passed > 0
    last = records[-1]
    skipped_blocks = last["samples_seen"] - last["samples_trained"]
    assert last["samples_trained"] == 48 and skipped_blocks > 0
    assert skipped_blocks == trainer.train_sampler.position - 48
    _, dense = run(flags(tiny_corpus, *SMALL, "--selection", "none", "--eval-iters", "0"))
    assert [r["tokens_trained"] for r in records] == [r["tokens_trained"] for r in dense]
    assert [r["executed_flops"] for r in records] == [r["executed_flops"] for r in dense]
    assert dense[-1]["samples_seen"] == dense[-1]["samples_trained"] == 48


def test_mask_mode_trains_every_sample_it_sees(tiny_corpus, monkeypatch):
    seen = counting(monkeypatch)
    _, records = run(flags(tiny_corpus, *SMALL, *LFR, "--lfr-mode", "mask", "--eval-iters", "0"))
    assert records[-1]["kept_fraction"] < 1.0  # its focus steps masked samples
    assert [r["samples_seen"] for r in records] == [r["samples_trained"] for r in records] == [8 * k for k in
                                                                                               range(1, 7)]
    assert sum(seen) == 48


@pytest.mark.slow
def test_resume_in_a_focus_phase_is_exact(tiny_corpus, tmp_path):
    """Saved at step 3 (the last learn step), resumed into the focus steps 4-6, which skip."""
    _, straight, resumed_trainer, resumed = straight_and_resumed(tiny_corpus, tmp_path, *SMALL, *LFR)
    assert straight[-1]["samples_seen"] > straight[-1]["samples_trained"]
    assert without_timing(resumed) == without_timing(straight[3:])


@pytest.mark.slow
def test_dp2_tp2_pp2_equal_one_process(tiny_corpus):
    """Two learn steps (one pass over the 24 blocks at 12 a step), then a focus step that skips: the same
    blocks on every layout (a global table), so the same losses, gradient norms and parameters."""
    import test_parallel_training as tpt
    records = tpt.equal_to_one_process(tiny_corpus, 2, tpt.TWO_RANK_BASICS,
                                       [*SMALL, "--selection", "lfr", "--lfr-learn-iters", "2", "--lfr-focus-iters",
                                        "1", "--lfr-review-iters", "1"])
    assert records[-1]["samples_seen"] > records[-1]["samples_trained"] == 36


@pytest.mark.slow
def test_blend_skips(two_corpora):
    """A blend's one pass is the blocks (each index one source window): learned in 6 steps; the focus steps
    7-11 reach the blocks learned last (the lowest recorded perplexities) and skip some of them."""
    (alpha, beta), tokenizer = two_corpora
    argv = flags((alpha, tokenizer), *SMALL, *LFR, "--eval-iters", "0", "--lfr-learn-iters", "6",
                 "--lfr-focus-iters", "5", "--train-iters", "11")
    argv[argv.index("--data-path") + 1:argv.index("--data-path") + 2] = ["0.5", alpha, "0.5", beta]
    trainer, records = run(argv)
    assert len(trainer.train_ds) == 48
    assert records[-1]["samples_seen"] > records[-1]["samples_trained"] == 88
