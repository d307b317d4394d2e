"""Smoke test: `python -m megatron_eslm.quickstart` end to end at a tiny size (seconds on 2 CPU cores)."""
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_eslm.output_dir import mark
from megatron_eslm.training.checkpointing import TRACKER

TINY = ["--train-iters", "4", "--log-interval", "3", "--corpus-mb", "0.3", "--vocab-size", "512",
        "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--batch-size", "4", "--eval-iters", "1", "--generate-tokens", "20"]
NUMBER = r"([0-9.]+(?:e[+-]\d+)?)"


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_summarises_every_iteration(tmp_path):
    """Into an earlier quickstart's output (its marker, a checkpoint of iteration 7): a re-run starts over, as
    it does for the corpus and the tokenizer; its checkpoints replace the earlier run's (--overwrite-save)
    instead of being refused or mixed with them."""
    out = tmp_path / "qs"
    checkpoints = out / "checkpoints"
    (checkpoints / "iter_0000007").mkdir(parents=True)
    (checkpoints / TRACKER).write_text("7\n")
    mark(str(out), "quickstart")
    proc = subprocess.run([sys.executable, "-m", "megatron_eslm.quickstart", "--output-dir", str(out), *TINY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "==== summary ====" in proc.stdout, proc.stdout
    summary = proc.stdout.split("==== summary ====", 1)[1]

    ppl = re.search(rf"validation perplexity: {NUMBER} before -> {NUMBER} after 4 iterations", summary)
    assert ppl, summary
    assert float(ppl[1]) > 1 and float(ppl[2]) > 1
    kept = re.search(rf"mean kept fraction {NUMBER} of tokens", summary)
    assert kept and 0 < float(kept[1]) < 1, summary
    flops = re.search(rf"executed FLOPs {NUMBER} vs dense {NUMBER} \({NUMBER}x, all 4 iterations\)", summary)
    assert flops, summary
    executed, dense = float(flops[1]), float(flops[2])
    assert 0 < executed < dense
    tok_s = re.search(rf"throughput: {NUMBER} tokens/s \(all iterations\)", summary)
    assert tok_s and float(tok_s[1]) > 0, summary

    metrics, tensorboard = out / "metrics.jsonl", out / "tensorboard"
    assert f"metrics: {metrics}  tensorboard: {tensorboard}" in summary
    assert f"checkpoint: {checkpoints}" in summary
    assert os.listdir(tensorboard)
    assert f"--overwrite-save: removed the earlier checkpoints under {checkpoints}" in proc.stdout, proc.stdout
    assert sorted(os.listdir(checkpoints)) == ["iter_0000004", TRACKER]
    generated = summary.split("generated text:\n", 1)[1].splitlines()
    assert generated and generated[0].startswith("  | def "), summary

    # --log-interval 3 logs iterations 3 and 4 only; the summary's totals still cover all four. Every step
    # has the same tokens, so its dense FLOPs are the same: the total is 4 steps' worth, not 2.
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if "split" not in r]
    assert [r["iteration"] for r in train] == [3, 4]
    assert dense == float(f"{4 * train[0]['dense_flops']:.3e}")
