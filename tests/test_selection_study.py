"""tools/selection_study.py's multi-domain mode, tiny: two corpora that need no download (the standard
library's sources and a generated text), per-domain and tail columns, the unigram-entropy level."""
from __future__ import annotations

import csv
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
