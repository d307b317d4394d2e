"""tools/selection_study.py, tiny: its multi-domain mode on two corpora that need no download (the standard
library's sources and a generated text) with a held-out domain and the data-constrained regime (per-domain,
held-out and tail columns, the unigram-entropy level, epochs); the sequence variants (student and proxy
scorer) at equal paper FLOPs."""
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
    heldout = tmp_path / "letters.txt"
    heldout.write_text("\n\n".join(" ".join("".join(rng.choice("xyzw") for _ in range(5)) for _ in range(30))
                                   for _ in range(40)))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "tools/selection_study.py", "--text", "stdlib", str(text), "--stdlib-mb",
                           "1", "--heldout-text", str(heldout), "--passes", "2", "--work-dir", str(tmp_path / "work"),
                           "--out-dir", str(out), "--seeds", "1",
                           "--variants", "dense", "eslm-is-0.5", "--dense-iters", "6", "--eval-interval", "3",
                           "--eval-iters", "1", "--vocab-size", "512", "--hidden-size", "32", "--seq-length", "32",
                           "--micro-batch-size", "4", "--global-batch-size", "4", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    markdown = (out / "selection_study.md").read_text()
    assert "Corpora: stdlib, prose (blended by size" in markdown and "Unigram-entropy level" in markdown
    # dense's budget, 6 steps of 4 x 32 tokens, passes twice over the cut training data
    assert "384 training tokens, cut so that dense's budget passes over them 2 times" in markdown
    assert "held-out domain (validation only, never trained on): letters" in markdown
    assert "| exp(CVaR 0.9) | ppl stdlib | ppl prose | ppl letters | steps in budget | epochs in budget |" in markdown
    dense = next(line for line in markdown.splitlines() if line.startswith("| dense |")).split(" | ")
    assert dense[-4] == "2.00"  # epochs in budget
    rows = list(csv.DictReader(open(out / "selection_study.csv")))
    assert {"val_cvar90", "loss stdlib", "loss prose", "loss letters"} <= set(rows[0])
    # val_loss is the training corpora's validation documents alone: between their two losses
    for row in rows:
        assert min(float(row["loss stdlib"]), float(row["loss prose"])) <= float(row["val_loss"]) \
            <= max(float(row["loss stdlib"]), float(row["loss prose"]))
    assert {row["variant"] for row in rows} == {"dense", "eslm-is-0.5"}
    assert (out / "selection_study.png").stat().st_size > 0


@pytest.mark.slow
def test_sequence_variants_at_equal_paper_flops(tmp_path, capsys):
    """--equal paper with sequence ESLM (keep 1/2 and 1/4, and keep 1/2 scored by a proxy), the sequence
    random control and dense at half the batch, tiny and in this process: the table compares every variant at
    equal executed and at equal paper FLOPs, the CSV has both cumulative counts, the two controls (k of dense
    under both counts) run about twice dense's steps, and the proxy (1/8 of the model) is trained once and
    reported."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import selection_study
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "king", "sword", "night"]
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(300)))
    out = tmp_path / "out"
    selection_study.main(["--text", str(text), "--work-dir", str(tmp_path / "work"), "--out-dir", str(out), "--seeds",
                          "1", "--variants", "dense", "eslm-seq-0.5", "eslm-seq-0.75", "random-seq-0.5",
                          "eslm-seq-proxy-0.5", "dense-half-batch", "--proxy-iters", "2", "--equal", "paper", "--dense-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--vocab-size",
                          "320", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "4",
                          "--global-batch-size", "4", "--threads", "1"])
    markdown = (out / "selection_study.md").read_text()
    assert ("| ppl / dense at equal executed FLOPs, same seed: mean (min–max) | ppl / dense at equal paper FLOPs, "
            "same seed: mean (min–max) |") in markdown
    assert "equal paper (val ppl and steps columns)" in markdown
    rows = list(csv.DictReader(open(out / "selection_study.csv")))
    assert {"executed_flops", "paper_flops", "tokens_trained"} <= set(rows[0])
    assert {row["variant"] for row in rows} == {"dense", "eslm-seq-0.5", "eslm-seq-0.75", "random-seq-0.5",
                                               "eslm-seq-proxy-0.5", "dense-half-batch"}
    assert "The proxy scorer of eslm-seq-proxy (1 layers, hidden 16) is a dense model trained for 2 steps" in markdown

    # tools/selection_study_summary.py over it: the ratios the study's own table has, at equal executed FLOPs
    import selection_study_summary
    capsys.readouterr()
    selection_study_summary.main([str(out)])
    summary = {line.split(" | ")[0][2:]: line.split(" | ")[1].removesuffix(" |")
               for line in capsys.readouterr().out.splitlines()[2:]}
    assert summary["dense"] == "1.000 (1.00–1.00) [1.000]"
    table = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in markdown.splitlines()
             if line.startswith("| ") and "seq" in line}
    for variant in ("eslm-seq-0.5", "eslm-seq-0.75", "random-seq-0.5", "eslm-seq-proxy-0.5"):  # CSV rounding aside
        assert float(summary[variant][:5]) == pytest.approx(float(table[variant][:5]), abs=2e-3), variant
    last = {row["variant"]: int(row["iteration"]) for row in rows}
    assert last["random-seq-0.5"] >= 2 * last["dense"] - 1 and last["dense-half-batch"] >= 2 * last["dense"] - 1


@pytest.mark.slow
def test_threshold_scope_study_runs_on_generated_text(tmp_path, capsys):
    """tools/threshold_scope_study.py shares prepare_data: a tiny run to its table (a change of that
    function's signature once broke it silently)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import threshold_scope_study
    threshold_scope_study.main(["--work-dir", str(tmp_path / "work"), "--iters", "3", "--alphas", "0.5",
                                "--vocab-size", "400", "--hidden-size", "32", "--seq-length", "32",
                                "--micro-batch-size", "4", "--global-batch-size", "8"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.5 |")]
    # rows from step 2 and from step iters // 2 + 1 (both 2 here), each scope
    assert [line.split(" | ")[1:3] for line in table] == [["2-3", "micro-batch"], ["2-3", "previous-step"]] * 2


def test_summary_best_is_the_lowest_evaluation_up_to_the_budget():
    """selection_study_summary --best: a run stopped at its best evaluation before the budget, or at the
    budget itself (interpolated), never at an evaluation past it."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from selection_study_summary import best_until, ratios
    run = [{"executed_flops": str(f), "val_loss": str(loss)} for f, loss in [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0)]]
    assert best_until(run, 3.0, "executed", "val_loss") == 4.0
    assert best_until(run, 3.5, "executed", "val_loss") == 3.75  # between 4.5 and 3.0: lower than every earlier one
    rows = [{**r, "variant": "dense", "seed": "1", "paper_flops": r["executed_flops"]} for r in run]
    rows += [{"variant": "v", "seed": "1", "executed_flops": str(f), "paper_flops": str(f), "val_loss": str(loss)}
             for f, loss in [(1, 4.2), (3, 4.4)]]
    best = ratios(rows, {"executed": 3.0}, "val_loss", "dense", best_until)["v"]["executed"]
    assert best == [pytest.approx(1.2214, 1e-4)]  # exp(4.2 - 4.0)
