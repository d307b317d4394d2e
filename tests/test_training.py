"""End-to-end training on one process: dense equivalence at alpha 0, learning, exact resume, CLI errors."""
import json
import os
import sys

import pytest
import torch

import forked
from helpers import flags, run, straight_and_resumed, without_timing
from megatron_eslm.config import parse_args
from megatron_eslm.data.builder import distinct_windows
from megatron_eslm.training.trainer import Trainer


@pytest.fixture
def float64():
    """Adam turns float32 round-off in near-zero gradients (the key bias) into visible updates; in float64
    the two paths must agree to round-off."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_alpha_zero_trains_like_dense(tiny_corpus, float64):
    dense, dense_records = run(flags(tiny_corpus, "--selection", "none"))
    eslm, eslm_records = run(flags(tiny_corpus, "--selection", "eslm", "--eslm-alpha", "0"))
    for d, e in zip(dense_records, eslm_records):
        assert e["kept_fraction"] == 1.0
        assert d["kept"] == e["kept"] == 8 * 32
        assert (d["threshold_bound"], d["threshold_bytes"], d["nonfinite"]) == (None, 0, 0)  # no threshold
        assert e["threshold_bound"] == 0 and e["threshold_bytes"] > 0
        assert e["lm_loss"] == pytest.approx(d["lm_loss"], rel=1e-12)
        assert e["grad_norm"] == pytest.approx(d["grad_norm"], rel=1e-10)
    for (name, p), q in zip(dense.model.named_parameters(), eslm.model.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)


def test_eslm_keeps_high_loss_tokens_and_logs_the_contract(tiny_corpus, tmp_path):
    metrics = tmp_path / "m.jsonl"
    _, records = run(flags(tiny_corpus, "--eslm-alpha", "0.6", "--metrics-file", str(metrics),
                           "--tensorboard-dir", str(tmp_path / "tb")))
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in lines if "split" not in r]
    valid = [r for r in lines if r.get("split") == "valid"]
    assert len(train) == 6 and len(valid) == 1
    assert set(train[0]) == {"iteration", "lm_loss", "kept_loss", "kept_fraction", "threshold", "lr", "grad_norm",
                             "tokens_per_sec", "iteration_time_ms", "executed_flops", "dense_flops",
                             "paper_flops", "consumed_samples", "samples_seen", "samples_trained", "tokens_trained",
                             "kept", "threshold_bound", "threshold_bytes", "nonfinite", "iterations",
                             "skipped_iterations", "consecutive_skips",
                             "tflops_per_gpu", "mfu", "max_memory_allocated"}
    assert set(valid[0]) == {"iteration", "split", "val_loss", "val_ppl", "samples", "val_cvar50", "val_cvar90",
                             "val_above_threshold"}
    for r in train:
        assert 0.35 <= r["kept_fraction"] <= 0.6
        assert r["kept"] == round(r["kept_fraction"] * 8 * 32)  # every token of a GPT sample is valid
        # default sketch-exact, m = 2048 >= 128 scores per micro-batch: the sketch is exact (E = 0), the
        # three counts settle x_(k), and each of the 2 micro-batches sends the sketch plus 3 int64 counts
        assert (r["threshold_bound"], r["nonfinite"]) == (0, 0)
        assert r["threshold_bytes"] == 2 * (4 * (2048 + 2) + 3 * 8)
        assert r["kept_loss"] > r["lm_loss"]  # kept tokens are the high-loss ones
        assert r["executed_flops"] < r["dense_flops"]
    assert train[-1]["consumed_samples"] == 48
    assert os.listdir(tmp_path / "tb")


def test_short_run_lowers_validation_loss(tiny_corpus):
    trainer = Trainer(parse_args(flags(tiny_corpus, "--train-iters", "40", "--eslm-alpha", "0.5")), log=lambda *a: None)
    before = trainer.evaluate()["val_loss"]
    trainer.train()
    after = trainer.evaluate()["val_loss"]
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("selection", ["eslm", "random"])
def test_resume_is_exact(tiny_corpus, tmp_path, selection):
    common = ["--selection", selection, "--eslm-alpha", "0.5", "--hidden-dropout", "0.1"]
    _, straight, _, resumed = straight_and_resumed(tiny_corpus, tmp_path, *common)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert without_timing(straight[3:]) == without_timing(resumed)


def cli(*argv):
    return forked.run([sys.executable, "-m", "megatron_eslm.pretrain", *argv])


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tiny_corpus, tmp_path):
    prefix, model = tiny_corpus
    missing = str(tmp_path / "nothing_text_document")
    proc = cli(*flags((missing, model)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nothing_text_document" in lines[0], proc.stderr
    proc = cli(*flags(tiny_corpus, "--eslm-alpha", "1.5"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --eslm-alpha must be in [0, 1), got 1.5"]


@pytest.mark.parametrize("blend", [False, True], ids=["one dataset", "blend"])
def test_validation_scores_each_window_once(tiny_corpus, blend):
    """--eval-iters x global batch far beyond the split: the validation set holds one pass over its
    documents (no window twice; a blend: none of its datasets twice), and the evaluation says how many."""
    prefix, _ = tiny_corpus
    data = ["--data-path", "0.3", prefix, "0.7", prefix] if blend else []
    lines = []
    trainer = Trainer(parse_args(flags(tiny_corpus, "--eval-iters", "1000", *data)), log=lines.append)
    valid = trainer.valid_ds
    parts = valid.datasets if blend else [valid]
    for part in parts:
        assert part.num_epochs == 1 and len(set(part.shuffle_index.tolist())) == len(part)
    if not blend:  # every window of the split's stream: the next one would wrap into a second pass
        assert len(part) == distinct_windows(
            part.indexed_dataset, (int(part.document_index.min()), int(part.document_index.max()) + 1), 32)
    record = trainer.evaluate()
    assert record["samples"] == len(valid) // 4 * 4  # whole micro-batches of 4
    assert any(f"validation: {len(valid)} distinct samples" in line
               and f"each evaluation scores {record['samples']} of them once" in line for line in lines)
    trainer.close()
