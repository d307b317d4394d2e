#!/usr/bin/env python
"""One table over several selection studies (tools/selection_study.py outputs: model sizes, regimes): per
variant and study, its validation perplexity over dense's with the same seed (or --baseline's: e.g.
dense-half-batch, dense at the sequence variants' batch), at dense's budget of executed FLOPs and (in
brackets) of the paper's FLOPs count, on the training corpora's validation documents and on each held-out
domain: mean over seeds, min-max.

    python tools/selection_study_summary.py docs/selection_study/L2-H128-one-pass docs/selection_study/L2-H128-passes8

--best compares early-stopped runs instead: each run's lowest value at an evaluation up to the budget (or at
the budget itself), over the baseline's lowest. Where the data repeats, dense's validation curve flattens or
turns up before the budget, and a policy that only trains less (or slower) would look better at the budget
than dense does there; against the best checkpoint it would not.

Each study folder holds selection_study.md (whose header gives the budgets) and selection_study.csv (every
evaluation of every run, with the cumulative FLOPs); the loss at a budget is interpolated linearly between
the two evaluations around it, as the study's own table does.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
from typing import Callable

from megatron_eslm.errors import UserError, exit_on_user_error

BUDGETS = re.compile(r"Budgets \(dense, (\d+) steps\)")
HELD_OUT = re.compile(r"held-out domains? \(validation only, never trained on\): ([^.]+)\.")
MODEL = re.compile(r"Model: (\d+) layers, hidden (\d+)")
REGIME = re.compile(r"cut so that dense's budget passes over them (\S+) times")


def read_study(folder: str) -> tuple[str, dict[str, float], list[str], list[dict]]:
    """(label, budgets by measure, held-out domains, CSV rows) of one study folder."""
    paths = [os.path.join(folder, name) for name in ("selection_study.md", "selection_study.csv")]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{folder}: no {os.path.basename(path)} (give folders a selection study wrote)")
    header = open(paths[0]).read()
    budgets, model = BUDGETS.search(header), MODEL.search(header)
    if not budgets or not model:
        raise UserError(f"{paths[0]}: no budgets or model line (written by an older selection_study.py?)")
    regime = REGIME.search(header)
    label = f"{model[1]} layers, hidden {model[2]}, " + (f"{regime[1]} passes" if regime else "one pass")
    held = HELD_OUT.search(header)
    heldout = [name.strip() for name in held[1].split(",")] if held else []
    with open(paths[1]) as fh:
        rows = list(csv.DictReader(fh))
    # the header rounds the budgets: dense's FLOPs per step (the same every step) times its steps, exactly
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    if dense is None:
        raise UserError(f"{paths[1]}: no dense run (the budgets are dense's)")
    steps = int(budgets[1]) / int(dense["iteration"])
    return label, {m: float(dense[f"{m}_flops"]) * steps for m in ("executed", "paper")}, heldout, rows


def loss_at(rows: list[dict], budget: float, measure: str, key: str) -> float:
    """`key` of one run's evaluations at `budget` of `measure` (cumulative), linear between evaluations."""
    points = [(float(r[f"{measure}_flops"]), float(r[key])) for r in rows]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= budget <= f1:
            return l0 + (l1 - l0) * (budget - f0) / (f1 - f0) if f1 > f0 else l1
    if points and points[0][0] >= budget:  # the first evaluation is already past the budget
        return points[0][1]
    raise UserError(f"a run stops at {points[-1][0]:.3g} {measure} FLOPs, before the budget {budget:.3g}")


def best_until(rows: list[dict], budget: float, measure: str, key: str) -> float:
    """The lowest `key` of one run's evaluations up to `budget` of `measure`, and at the budget itself: the
    run stopped early at its best evaluation."""
    before = [float(r[key]) for r in rows if float(r[f"{measure}_flops"]) <= budget]
    return min([*before, loss_at(rows, budget, measure, key)])


def ratios(rows: list[dict], budgets: dict[str, float], key: str, baseline: str,
           at: Callable[[list[dict], float, str, str], float] = loss_at) -> dict[str, dict[str, list[float]]]:
    """variant -> measure -> [perplexity over `baseline`'s, per seed] of `key` at each budget (`at`: the
    value at the budget, or `best_until` it)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        runs.setdefault((row["variant"], row["seed"]), []).append(row)
    out: dict[str, dict[str, list[float]]] = {}
    for (variant, seed), run in runs.items():
        for measure, budget in budgets.items():
            if (baseline, seed) not in runs:
                raise UserError(f"--baseline {baseline}: no run of it with seed {seed} in the study")
            dense = at(runs[(baseline, seed)], budget, measure, key)
            out.setdefault(variant, {}).setdefault(measure, []).append(math.exp(at(run, budget, measure, key) - dense))
    return out


def cell(values: dict[str, list[float]]) -> str:
    executed, paper = values["executed"], values["paper"]
    return (f"{statistics.mean(executed):.3f} ({min(executed):.2f}–{max(executed):.2f}) "
            f"[{statistics.mean(paper):.3f}]")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="selection study output folders (--out-dir of selection_study.py)")
    p.add_argument("--baseline", default="dense", help="the variant the perplexities are divided by (same seed)")
    p.add_argument("--best", action="store_true",
                   help="each run's lowest perplexity up to the budget (early stopping), not its perplexity there")
    args = p.parse_args(argv)
    at = best_until if args.best else loss_at
    studies = [read_study(folder) for folder in args.folders]
    columns = []  # (title, study index, CSV key)
    for i, (label, _, heldout, _) in enumerate(studies):
        columns.append((f"{label}: validation documents", i, "val_loss"))
        columns += [(f"{label}: held-out {name}", i, f"loss {name}") for name in heldout]
    tables = [{key: ratios(rows, budgets, key, args.baseline, at) for _, j, key in columns if j == i}
              for i, (_, budgets, _, rows) in enumerate(studies)]
    variants = list(dict.fromkeys(row["variant"] for *_, rows in studies for row in rows))
    print("| variant | " + " | ".join(title for title, _, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for variant in variants:
        cells = [cell(tables[i][key][variant]) if variant in tables[i][key] else "–" for _, i, key in columns]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
