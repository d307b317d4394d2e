"""tools/selection_study.py's multi-domain mode, tiny: two corpora that need no download (the standard
library's sources and a generated text), per-domain and tail columns, the unigram-entropy level."""
from __future__ import annotations

import csv
import os
import random
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_multi_domain_study_reports_domains_and_tail(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "king", "sword", "night"]
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
                                for _ in range(600)))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "tools/selection_study.py", "--text", "stdlib", str(text), "--stdlib-mb",
                           "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out), "--seeds", "1",
                           "--variants", "dense", "eslm-is-0.5", "--dense-iters", "6", "--eval-interval", "3",
                           "--eval-iters", "1", "--vocab-size", "512", "--hidden-size", "32", "--seq-length", "32",
                           "--micro-batch-size", "4", "--global-batch-size", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    markdown = (out / "selection_study.md").read_text()
    assert "Corpora: stdlib, prose (blended with equal weights" in markdown and "Unigram-entropy level" in markdown
    assert "| exp(CVaR 0.9) | ppl stdlib | ppl prose |" in markdown
    rows = list(csv.DictReader(open(out / "selection_study.csv")))
    assert {"val_cvar90", "loss stdlib", "loss prose"} <= set(rows[0])
    assert {row["variant"] for row in rows} == {"dense", "eslm-is-0.5"}
    assert (out / "selection_study.png").stat().st_size > 0


@pytest.mark.slow
def test_sequence_variants_at_equal_paper_flops(tmp_path):
    """--equal paper with sequence ESLM (keep 1/2 and 1/4) and the sequence random control, tiny and in this
    process: the table compares every variant at equal executed and at equal paper FLOPs, the CSV has both
    cumulative counts, and the random control (k of dense under both counts) runs about twice dense's steps."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import selection_study
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "king", "sword", "night"]
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(300)))
    out = tmp_path / "out"
    selection_study.main(["--text", str(text), "--work-dir", str(tmp_path / "work"), "--out-dir", str(out), "--seeds",
                          "1", "--variants", "dense", "eslm-seq-0.5", "eslm-seq-0.75", "random-seq-0.5", "--equal",
                          "paper", "--dense-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--vocab-size",
                          "320", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "4",
                          "--global-batch-size", "4", "--threads", "1"])
    markdown = (out / "selection_study.md").read_text()
    assert ("| ppl / dense at equal executed FLOPs, same seed: mean (min–max) | ppl / dense at equal paper FLOPs, "
            "same seed: mean (min–max) |") in markdown
    assert "equal paper (val ppl and steps columns)" in markdown
    rows = list(csv.DictReader(open(out / "selection_study.csv")))
    assert {"executed_flops", "paper_flops", "tokens_trained"} <= set(rows[0])
    assert {row["variant"] for row in rows} == {"dense", "eslm-seq-0.5", "eslm-seq-0.75", "random-seq-0.5"}
    last = {row["variant"]: int(row["iteration"]) for row in rows}
    assert last["random-seq-0.5"] >= 2 * last["dense"] - 1
