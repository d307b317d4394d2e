#!/usr/bin/env python
"""Selection-policy study: every policy on the same data, model and seeds, at an equal budget of EXECUTED
FLOPs (--equal executed, the default), of the ESLM paper's FLOPs count (--equal paper: a forward charged to
every token, a backward to the kept ones; docs/selection.md, "FLOPs") or of trained tokens (--equal tokens),
with validation perplexity against executed FLOPs. The table shows every variant at equal executed and at
equal paper FLOPs (and at equal tokens with --equal tokens) side by side.

    python tools/selection_study.py --text stdlib --seeds 1 2 3
    python tools/selection_study.py --text stdlib my_corpus.txt ...   # two domains

Results go to --out-dir (default runs/selection_study/, which git ignores), the runs to --work-dir (default
<out-dir>/work). --out-dir must be absent, empty or an earlier study's output; anything else is refused
unless --force, and even then only selection_study.{csv,md,png} are replaced (each written under a temporary
name and renamed): `--out-dir docs --force` regenerates the committed results.

Several --text corpora (a file, or `stdlib`: the Python standard library's sources, which need no download)
make a multi-domain study: one tokenizer over their training documents, one dataset each, blended by size;
every tenth document of each corpus is held out for validation, and every evaluation reports each domain's
loss (`datasets` in the eval records), a column each. --heldout-text corpora are validated on and never
trained on (a domain no policy saw: a column and a plot panel of their own); the val ppl column is then the
training corpora's validation documents alone. Every table has the tail (val_cvar90, the mean of the worst
tenth of all the validation token losses) next to the perplexity, and the plot marks the unigram-entropy
level (the perplexity of predicting every token by its corpus frequency), the plateau a collapsed run sits on.

Two regimes: every training document (by default: one pass or less when the corpora are large), or
--passes P, the data-constrained one: the training data cut to its first documents so that dense's budget
passes over them P times, LFR's setting (the `epochs in budget` column shows what each run saw). Sizes:
one model a call (--num-layers, --hidden-size, ...); calls for several sizes and regimes can share a
--work-dir, whose file names carry the setting.

Steps: plain text -> JSONL documents (blank-line paragraphs, grouped) -> SentencePiece tokenizer ->
indexed datasets; the frozen models the variants read are trained once, seed 0, and their training is
reported, not charged to the runs (which are charged their forward passes): a dense reference of the same
size, longer trained (rho1's reference, eslm-kd's teacher), and the eslm-seq-proxy variants' proxy scorer
(half the layers and half the width: 1/8 of the non-embedding parameters); then every (variant, seed)
trains with the real trainer. A budget is what dense training spends in --dense-iters steps
(executed FLOPs, paper FLOPs, tokens_trained); each run gets enough steps to pass every budget its table
shows, evaluates at about dense's spacing in FLOPs, and its validation loss at exactly a budget is
interpolated (linearly in that measure) between the two evaluations around it. The learning rate is constant
after warmup, so a run's curve up to the budget does not depend on how long it was set to run.
Prints a line as each run starts and ends.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field

import numpy as np

from megatron_eslm.config import parse_args
from megatron_eslm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.output_dir import check_output_dir, mark
from megatron_eslm.quickstart import write_stdlib_corpus
from megatron_eslm.tokenizer.train import train_sentencepiece
from megatron_eslm.training.flops import forward_flops, micro_batch_flops
from megatron_eslm.training.trainer import Trainer


@dataclass
class Variant:
    name: str
    flags: list[str]
    min_keep: float  # lowest keep ratio the policy can reach: bounds its step count for the budget
    frozen_head_rows: float = -1.0  # reference/teacher LM-head rows per token (-1: no frozen model)
    kd_rows: float = 0.0  # distillation logits rows per token (lower bound)
    # a step trains min_keep of the global batch's sequences (a dense step on them), chosen by the "student"'s
    # or a "proxy"'s scores (--eslm-granularity sequence), or "unscored": drawn at random, or a smaller batch
    sequence: str = ""
    note: str = ""


def variants(args: argparse.Namespace) -> list[Variant]:
    a = args.alpha
    lfr = ["--lfr-learn-iters", str(args.dense_iters // 5), "--lfr-focus-iters", str(args.dense_iters // 10),
           "--lfr-review-iters", str(args.dense_iters // 20), "--lfr-drop-fraction", "0.3"]
    # the kept sequences are whole micro-batches at keep 1/2 and 1/4 (docs/selection.md)
    sequence_micro_batch = ["--micro-batch-size", str(max(1, args.global_batch_size // 4))]
    every = [
        Variant("dense", ["--selection", "none"], 1.0),
        Variant(f"eslm-loss-{a}", ["--selection", "eslm", "--eslm-score", "loss", "--eslm-alpha", str(a)], 1 - a),
        Variant(f"eslm-entropy-{a}", ["--selection", "eslm", "--eslm-score", "entropy", "--eslm-alpha", str(a)],
                1 - a),
        Variant(f"random-{a}", ["--selection", "random", "--eslm-alpha", str(a)], 1 - a),
        Variant(f"eslm-is-{a}", ["--selection", "eslm-is", "--eslm-alpha", str(a), "--eslm-is-prob",
                                 str(args.is_prob)], 1 - a + a * args.is_prob),
        Variant(f"eslm-loss-{a}-warmup", ["--selection", "eslm", "--eslm-alpha", str(a), "--selection-warmup-iters",
                                          str(args.dense_iters // 5)], 1 - a),
        Variant("ada-eslm-grad-mass", ["--selection", "ada-eslm", "--ada-eslm-rule", "grad-mass", "--eslm-alpha",
                                       "0", "--eslm-alpha-min", "0", "--eslm-alpha-max", str(args.alpha_max),
                                       "--ada-eslm-budget", str(args.ada_budget)], 1 - args.alpha_max),
        Variant("ada-eslm-cosine", ["--selection", "ada-eslm", "--ada-eslm-rule", "cosine", "--eslm-alpha-min", "0",
                                    "--eslm-alpha-max", str(a)], 1 - a),
        Variant(f"rho1-{a}", ["--selection", "rho1", "--eslm-alpha", str(a)], 1 - a, frozen_head_rows=1.0),
        Variant(f"eslm-kd-{a}", ["--selection", "eslm-kd", "--eslm-alpha", str(a), "--kd-alpha", "0.5",
                                 "--kd-temperature", "2"], 1 - a, frozen_head_rows=0.0, kd_rows=1 - a),
        Variant("lfr", ["--selection", "lfr", *lfr], 1.0),  # skip: every step a dense step on the blocks kept
        Variant("lfr-mask", ["--selection", "lfr", "--lfr-mode", "mask", *lfr], 0.7),
        *(Variant(f"eslm-seq-{alpha}", ["--selection", "eslm", "--eslm-granularity", "sequence", "--eslm-alpha",
                                        str(alpha), *sequence_micro_batch], 1 - alpha, sequence="student")
          for alpha in (a, args.seq_alpha)),
        *(Variant(f"eslm-seq-proxy-{alpha}", ["--selection", "eslm", "--eslm-granularity", "sequence",
                                              "--eslm-scorer", "proxy", "--eslm-alpha", str(alpha),
                                              *sequence_micro_batch], 1 - alpha, sequence="proxy")
          for alpha in (a, args.seq_alpha)),
        Variant(f"random-seq-{a}", ["--selection", "random", "--eslm-granularity", "sequence", "--eslm-alpha", str(a),
                                    *sequence_micro_batch], 1 - a, sequence="unscored"),
        # dense at the kept sequences' batch: the sequence variants' optimizer steps are that many sequences, so
        # twice (keep 1/2) as many steps at equal FLOPs; this separates the step count from the selection
        Variant("dense-half-batch", ["--selection", "none", "--global-batch-size", str(args.global_batch_size // 2),
                                     *sequence_micro_batch], 0.5, sequence="unscored"),
    ]
    chosen = [v for v in every if args.variants is None or v.name in args.variants]
    if args.variants and len(chosen) != len(args.variants):
        raise SystemExit(f"unknown variant in {args.variants}; choose from {[v.name for v in every]}")
    return chosen


# ----------------------------------------------------------------------------------------- data
def domain_name(text: str) -> str:
    return "stdlib" if text == "stdlib" else os.path.splitext(os.path.basename(text))[0]


def _write_documents(text: str, jsonl: str, stdlib_bytes: int) -> None:
    """A corpus as JSONL documents: the standard library's files, or ~2 KB groups of a text's paragraphs."""
    if text == "stdlib":
        write_stdlib_corpus(jsonl, stdlib_bytes)
        return
    with open(text, encoding="utf-8") as fh:
        paragraphs = [p.strip() for p in fh.read().split("\n\n") if p.strip()]
    with open(jsonl, "w") as out:  # whole paragraphs, in the text's order
        document: list[str] = []
        for paragraph in paragraphs:
            document.append(paragraph)
            if sum(map(len, document)) >= 2000:
                out.write(json.dumps({"text": "\n\n".join(document)}) + "\n")
                document = []
        if document:
            out.write(json.dumps({"text": "\n\n".join(document)}) + "\n")


def _split_documents(jsonl: str, train: str, valid: str) -> None:
    """Every tenth document (the 10th, 20th, ...) to `valid`, the others to `train`: both cover the whole
    corpus, and no validation document is ever trained on."""
    with open(jsonl) as fh, open(train, "w") as t, open(valid, "w") as v:
        for i, line in enumerate(fh, 1):
            (v if i % 10 == 0 else t).write(line)


def first_tokens(prefix: str, tokens: int, out: str) -> str:
    """The dataset `prefix`'s first `tokens` tokens (all of it when it has fewer; the last document cut
    there), as the dataset `out`: the data-constrained regime's small corpus."""
    dataset = IndexedDataset(prefix)
    tokens = min(tokens, dataset.num_tokens)
    offsets = dataset.document_offsets
    count = int(np.searchsorted(offsets[1:], tokens)) + 1  # the documents that start before the cut
    lengths = np.diff(np.minimum(offsets[: count + 1], tokens))
    with IndexedDatasetBuilder(get_bin_path(out), dataset.dtype) as builder:
        builder.add_documents(dataset.tokens(0, tokens), lengths)
        builder.finalize(get_idx_path(out))
    return out


def blend(prefixes: list[str]) -> list[str]:
    """One dataset as itself, several weighted by their token counts: a run passes over every corpus at the
    same rate, so "one pass" means one pass over each."""
    if len(prefixes) == 1:
        return prefixes
    return [x for prefix in prefixes for x in (str(IndexedDataset(prefix).num_tokens), prefix)]


@dataclass
class Data:
    train: list[str]  # --train-data-path
    valid: list[str]  # --valid-data-path: each corpus's validation documents, then the held-out corpora
    tokenizer: str  # the SentencePiece model, trained on the training documents only
    train_tokens: int  # in the training datasets, together
    heldout: list[str]  # the held-out corpora's names (validation only)


def prepare_data(texts: list[str], heldout: list[str], work: str, vocab_size: int, stdlib_bytes: int,
                 train_tokens: int | None = None) -> Data:
    """The datasets and tokenizer for the corpora `texts` (trained on, but for every tenth document, which
    validates) and `heldout` (validation only: a domain no policy trains on), built once under `work`; one
    tokenizer over the training documents. `train_tokens`: the training datasets cut to their first
    documents, that many tokens in all (equally from each corpus), the data-constrained regime."""
    names = [domain_name(text) for text in texts]
    held = [domain_name(text) for text in heldout]
    if len(set(names + held)) != len(names) + len(held):
        raise UserError(f"--text {' '.join(texts)} --heldout-text {' '.join(heldout)}: two corpora share the name "
                        "their file gives them")
    tokenizer = os.path.join(work, f"tok{vocab_size}")
    train = [os.path.join(work, f"{name}_train") for name in names]
    valid = [os.path.join(work, f"{name}_valid") for name in names] + [os.path.join(work, name) for name in held]
    if not all(os.path.exists(prefix + "_text_document.idx") for prefix in train + valid):
        jsonl = {prefix: prefix + ".jsonl" for prefix in train + valid}
        for name, text in zip(names + held, texts + heldout):
            whole = os.path.join(work, f"{name}.jsonl")
            _write_documents(text, whole, stdlib_bytes)
            if name in names:
                _split_documents(whole, jsonl[os.path.join(work, f"{name}_train")],
                                 jsonl[os.path.join(work, f"{name}_valid")])
        train_sentencepiece([jsonl[prefix] for prefix in train], vocab_size, tokenizer)
        for prefix in train + valid:
            preprocess(jsonl[prefix], prefix, tokenizer_type="SentencePieceTokenizer",
                       tokenizer_model=tokenizer + ".model", append_eod=True, workers=1)
    train = [prefix + "_text_document" for prefix in train]
    valid = [prefix + "_text_document" for prefix in valid]
    if train_tokens is not None:
        share = -(-train_tokens // len(train))
        train = [first_tokens(prefix, share, f"{prefix}_first{share}") for prefix in train]
    tokens = sum(IndexedDataset(prefix).num_tokens for prefix in train)
    return Data(blend(train), blend(valid), tokenizer + ".model", tokens, held)


def unigram_ppl(data_path: list[str]) -> float:
    """exp of the entropy of the blend's token frequencies: the perplexity of a model that predicts every
    token by its frequency alone (a blend: its corpora's frequencies, averaged with the blend's weights)."""
    prefixes = data_path if len(data_path) == 1 else data_path[1::2]
    weights = [1.0] if len(data_path) == 1 else [float(w) for w in data_path[::2]]
    mix = None
    for weight, prefix in zip(weights, prefixes):
        dataset = IndexedDataset(prefix)
        counts = np.bincount(dataset.tokens(0, dataset.num_tokens).astype(np.int64))
        freq = weight * counts / counts.sum()
        if mix is not None and len(freq) != len(mix):
            size = max(len(freq), len(mix))
            freq, mix = np.pad(freq, (0, size - len(freq))), np.pad(mix, (0, size - len(mix)))
        mix = freq if mix is None else mix + freq
    mix = mix / sum(weights)
    mix = mix[mix > 0]
    return float(np.exp(-(mix * np.log(mix)).sum()))


def common_flags(args: argparse.Namespace, data: Data, iters: int, seed: int,
                 size: tuple[int, int, int] | None = None) -> list[str]:
    """The flags every run shares; `size` (layers, hidden, heads) replaces the study's model (the proxy)."""
    layers, hidden, heads = size or (args.num_layers, args.hidden_size, args.num_attention_heads)
    return ["--num-layers", str(layers), "--hidden-size", str(hidden),
            "--num-attention-heads", str(heads), "--seq-length", str(args.seq_length),
            "--make-vocab-size-divisible-by", "128", "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(iters),
            "--lr", str(args.lr), "--lr-decay-style", "constant", "--lr-warmup-iters", str(args.dense_iters // 10),
            "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--train-data-path", *data.train,
            "--valid-data-path", *data.valid, "--tokenizer-model", data.tokenizer, "--eval-interval", str(args.eval_interval),
            "--eval-iters", str(args.eval_iters), "--log-interval", "1", "--num-workers", "0", "--seed", str(seed),
            *shlex.split(args.run_flags)]


# ----------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    variant: str
    seed: int
    iters: int
    seconds: float  # training steps only (evaluations excluded), from the logged step times
    curve: list[tuple[int, dict]] = field(default_factory=list)  # (iteration, eval record)
    spent: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MEASURES})  # per step
    dense: list[float] = field(default_factory=list)
    kept_fraction: list[float] = field(default_factory=list)
    samples_seen: int = 0  # at the last step

    @property
    def executed(self) -> list[float]:
        return self.spent["executed"]

    def cumulative(self, measure: str) -> list[float]:
        """`measure` spent after each iteration (index 0: before the first)."""
        return [0.0, *np.cumsum(self.spent[measure]).tolist()]


def train(argv: list[str], metrics: str, iters: int, reuse: bool) -> None:
    """One run of the real trainer; with `reuse`, a metrics file that already reaches `iters` stands."""
    if reuse and os.path.exists(metrics) and _last_iteration(metrics) == iters:
        return
    if os.path.exists(metrics):
        os.remove(metrics)
    trainer = Trainer(parse_args([*argv, "--metrics-file", metrics]), log=lambda *a: None)
    trainer.train()
    trainer.close()


def _last_iteration(metrics: str) -> int:
    with open(metrics) as fh:
        return max((json.loads(line)["iteration"] for line in fh), default=0)


def read_run(variant: str, seed: int, iters: int, metrics: str, heldout: tuple[str, ...] = ()) -> Run:
    """A run's records; with `heldout` domains in the validation blend, its evaluations' val_loss is that of
    the training domains' validation documents alone (the held-out domains keep their own columns)."""
    run = Run(variant, seed, iters, 0.0)
    tokens = 0
    with open(metrics) as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("split") == "valid":
                if heldout:
                    inside = [d for name, d in r["datasets"].items() if domain_of(name) not in heldout]
                    r["val_loss"] = sum(d["val_loss"] * d["tokens"] for d in inside) / sum(d["tokens"] for d in inside)
                run.curve.append((r["iteration"], r))
            else:
                run.spent["executed"].append(r["executed_flops"])
                run.spent["paper"].append(r["paper_flops"])
                run.spent["tokens"].append(r["tokens_trained"] - tokens)
                tokens = r["tokens_trained"]
                run.dense.append(r["dense_flops"])
                run.kept_fraction.append(r["kept_fraction"])
                run.seconds += r["iteration_time_ms"] / 1000
                run.samples_seen = r["samples_seen"]
    return run


def domain_of(dataset: str) -> str:
    """The corpus a validation dataset's name comes from (prepare_data's naming)."""
    return dataset.removesuffix("_text_document").removesuffix("_valid")


def measures(record: dict) -> dict[str, float]:
    """What the study reads of an evaluation: the validation loss, each domain's, and the tail."""
    out = {"val_loss": record["val_loss"], "val_cvar90": record["val_cvar90"]}
    out.update({f"loss {domain_of(name)}": d["val_loss"] for name, d in record.get("datasets", {}).items()})
    return out


def value_at(run: Run, budget: float, key: str, measure: str) -> float:
    """`key` of `measures` at exactly `budget` of `measure` spent, linear between the evaluations around it."""
    spent = run.cumulative(measure)
    points = [(0.0, math.nan)] + [(spent[iteration], measures(record)[key]) for iteration, record in run.curve]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= budget <= f1:
            return l1 if math.isnan(l0) or f1 == f0 else l0 + (l1 - l0) * (budget - f0) / (f1 - f0)
    raise RuntimeError(f"{run.variant} seed {run.seed} stopped at {points[-1][0]:.3g} {measure}, "
                       f"before the budget {budget:.3g}")


def steps_for_budget(args: argparse.Namespace, variant: Variant, model_cfg, vocab: int, frozen_cfg, proxy_cfg) -> int:
    """Enough steps to pass every budget the table shows: the policy's cheapest possible step under each
    measure, from its lowest keep ratio, against dense's. `frozen_cfg`: the reference/teacher model,
    `proxy_cfg`: the proxy scorer."""
    tokens = args.global_batch_size * args.seq_length
    dense = micro_batch_flops(model_cfg, vocab, tokens, tokens, tokens, False)
    kept = round(variant.min_keep * tokens)
    trained = kept if variant.sequence else tokens
    if variant.sequence:  # a dense step on the kept sequences
        cheapest = micro_batch_flops(model_cfg, vocab, kept, kept, kept, False)
        if variant.sequence == "student":  # after the student's forward over every candidate
            cheapest.executed += forward_flops(model_cfg, vocab, tokens, tokens)
            cheapest.paper += forward_flops(model_cfg, vocab, tokens - kept, tokens - kept)
        elif variant.sequence == "proxy":  # the proxy's forward: executed, not in the paper's count
            cheapest.executed += forward_flops(proxy_cfg, vocab, tokens, tokens)
    else:
        cheapest = micro_batch_flops(model_cfg, vocab, tokens, tokens, kept, variant.name != "dense")
    if variant.frozen_head_rows >= 0:
        cheapest.executed += forward_flops(frozen_cfg, vocab, tokens, round(variant.frozen_head_rows * tokens))
        cheapest.executed += 2.0 * variant.kd_rows * tokens * vocab * (3 * model_cfg.hidden_size + frozen_cfg.hidden_size)
    ratios = {"executed": dense.dense / cheapest.executed, "paper": dense.paper / cheapest.paper,
              "tokens": tokens / trained}
    return math.ceil(args.dense_iters * max(ratios[m] for m in shown(args.equal))) + 1


MEASURES = ("executed", "paper", "tokens")
MEASURE_TITLES = {"executed": "executed FLOPs", "paper": "paper FLOPs", "tokens": "tokens trained"}


def shown(equal: str) -> tuple[str, ...]:
    """The measures the table compares at: executed and paper FLOPs always, tokens when equalised."""
    return ("executed", "paper") + (("tokens",) if equal == "tokens" else ())


# ----------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[Run], budgets: dict[str, float], equal: str, seq_length: int,
              train_tokens: int) -> list[dict]:
    """Per variant, at the `equal` budget; `paired` is its perplexity over dense's for the same seed (same
    initial weights, data order and validation batches), the comparison with the least noise, and
    `paired_at` the same at each measure's budget the table shows. `extra`: the tail and each domain's
    loss, as perplexities (exp of the loss / of the CVaR), mean over seeds; `epochs`: the passes over the
    training tokens its candidates made (samples seen, skipped ones included)."""
    def final(run: Run, key: str, measure: str = equal) -> float:
        return math.exp(value_at(run, budgets[measure], key, measure))

    def paired(group: list[Run], measure: str) -> tuple[float, float, float]:
        dense = {r.seed: final(r, "val_loss", measure) for r in runs if r.variant == "dense"}
        ratios = [final(r, "val_loss", measure) / dense[r.seed] for r in group]
        return statistics.mean(ratios), min(ratios), max(ratios)

    keys = [k for k in measures(runs[0].curve[-1][1]) if k != "val_loss"]
    rows = []
    for name in dict.fromkeys(r.variant for r in runs):
        group = [r for r in runs if r.variant == name]
        ppl = [final(r, "val_loss") for r in group]
        rows.append({
            "variant": name, "seeds": len(group),
            "val_ppl": mean_std(ppl), "ppl_range": (min(ppl), max(ppl)),
            "paired": paired(group, equal),
            "paired_at": {measure: paired(group, measure) for measure in shown(equal)},
            "extra": {key: statistics.mean(final(r, key) for r in group) for key in keys},
            "steps": statistics.mean(_steps_within(r, budgets[equal], equal) for r in group),
            "flops_per_step_vs_dense": statistics.mean(sum(r.executed) / sum(r.dense) for r in group),
            "kept_fraction": statistics.mean(statistics.mean(r.kept_fraction) for r in group),
            "epochs": statistics.mean(r.samples_seen * seq_length / train_tokens * _steps_within(
                r, budgets[equal], equal) / r.iters for r in group),
            "minutes": sum(r.seconds for r in group) / 60,
        })
    return rows


def _steps_within(run: Run, budget: float, measure: str) -> float:
    """Steps (fractional at the end) whose `measure` fits in the budget."""
    spent, steps = 0.0, 0.0
    for flops in run.spent[measure]:
        if spent + flops > budget:
            return steps + (budget - spent) / flops
        spent += flops
        steps += 1
    return steps


def write_csv(runs: list[Run], path: str) -> None:
    keys = list(measures(runs[0].curve[-1][1]))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seed", "iteration", "executed_flops", "paper_flops", "tokens_trained", *keys,
                    "val_ppl"])
        for r in runs:
            spent = {measure: r.cumulative(measure) for measure in MEASURES}
            for iteration, record in r.curve:
                values = measures(record)
                w.writerow([r.variant, r.seed, iteration, f"{spent['executed'][iteration]:.6e}",
                            f"{spent['paper'][iteration]:.6e}", round(spent["tokens"][iteration]),
                            *(f"{values[k]:.5f}" for k in keys), f"{math.exp(values['val_loss']):.4f}"])


def verdicts(rows: list[dict]) -> list[str]:
    """Each variant against dense with the same seed: better only if it is better on every seed, worse
    only if it is worse on every seed."""
    out = []
    for r in rows:
        if r["variant"] == "dense":
            continue
        mean, low, high = r["paired"]
        change = f"{100 * (mean - 1):+.1f}% perplexity on average, {100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}%"
        if high < 1:
            out.append(f"- **{r['variant']} beats dense** on every seed ({change}).")
        elif low > 1:
            out.append(f"- **{r['variant']} loses to dense** on every seed ({change}).")
        else:
            out.append(f"- {r['variant']}: mixed, better on some seeds and worse on others ({change}).")
    return out


def write_markdown(rows: list[dict], path: str, header: str, command: str) -> None:
    extra = list(rows[0]["extra"])  # exp(val_cvar90) and each domain's perplexity
    measured = list(rows[0]["paired_at"])
    titles = ["exp(CVaR 0.9)" if key == "val_cvar90" else f"ppl {key[len('loss '):]}" for key in extra]
    lines = ["# Selection study (generated by tools/selection_study.py)", "", header, "", "```", command, "```", "",
             "| variant | val ppl (mean ± std) | min–max over seeds | "
             + "".join(f"ppl / dense at equal {MEASURE_TITLES[m]}, same seed: mean (min–max) | " for m in measured)
             + "".join(f"{title} | " for title in titles)
             + "steps in budget | epochs in budget | executed FLOPs/step vs dense | kept fraction | train min (all seeds) |",
             "|---|---|---|" + "---|" * (len(measured) + len(titles)) + "---|---|---|---|---|"]
    for r in rows:
        mean, std = r["val_ppl"]
        paired = "".join("{:.3f} ({:.3f}–{:.3f}) | ".format(*r["paired_at"][m]) for m in measured)
        lines.append(f"| {r['variant']} | {mean:.2f} ± {std:.2f} | {r['ppl_range'][0]:.2f}–{r['ppl_range'][1]:.2f} "
                     f"| {paired}" + "".join(f"{r['extra'][key]:.2f} | " for key in extra)
                     + f"{r['steps']:.1f} | {r['epochs']:.2f} | {r['flops_per_step_vs_dense']:.3f} | "
                     f"{r['kept_fraction']:.2f} | {r['minutes']:.1f} |")
    lines += ["", "Against dense with the same seed:", "", *verdicts(rows), "",
              "Curves: `selection_study.png` (validation perplexity against cumulative executed FLOPs); "
              "every evaluation of every run: `selection_study.csv`. Discussion: docs/selection.md."]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(runs: list[Run], budget: float | None, unigram: float, path: str, heldout: list[str]) -> bool:
    """Validation perplexity against cumulative executed FLOPs, one line per variant (mean over seeds, band
    min-max): the training domains' validation documents, and each held-out domain in a panel of its own.
    False without matplotlib (a GPU machine's image may lack it: the table and CSV still stand)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_loss", "validation documents of the training corpora")]
    panels += [(f"loss {name}", f"held-out domain {name} (never trained on)") for name in heldout]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name in dict.fromkeys(r.variant for r in runs):
            group = [r for r in runs if r.variant == name]
            n = min(len(r.curve) for r in group)
            x = [statistics.mean(r.cumulative("executed")[r.curve[i][0]] for r in group) for i in range(n)]
            ppl = [[math.exp(measures(r.curve[i][1])[key]) for r in group] for i in range(n)]
            line, = ax.plot(x, [statistics.mean(p) for p in ppl], marker=".", label=name,
                            linestyle="--" if name == "dense" else "-")
            ax.fill_between(x, [min(p) for p in ppl], [max(p) for p in ppl], color=line.get_color(), alpha=0.15)
        if budget:
            ax.axvline(budget, color="grey", linewidth=0.8, linestyle=":")
        if key == "val_loss":
            ax.axhline(unigram, color="black", linewidth=0.8, linestyle="-.",
                       label=f"unigram entropy level ({unigram:.0f})")
        ax.set_xlabel("executed FLOPs (cumulative)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(f"{title}: mean over seeds, band = min-max", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------------------- main
TOOL = "selection_study"
OUTPUTS = ("selection_study.csv", "selection_study.md", "selection_study.png")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, nargs="+",
                   help="plain-text corpora (files, or `stdlib`, which needs no download); several: a "
                        "multi-domain study")
    p.add_argument("--heldout-text", nargs="*", default=[],
                   help="corpora (files, or `stdlib`) only validated on: a domain no policy trains on, a panel and "
                        "a column of its own; the val ppl column is then the training corpora's validation documents")
    p.add_argument("--passes", type=float, default=0,
                   help="the data-constrained regime: the training data cut to its first documents, so that dense's "
                        "budget passes over them this many times (default 0: every training document)")
    p.add_argument("--stdlib-mb", type=int, default=1, help="megabytes of the standard library's sources for `stdlib`")
    p.add_argument("--is-prob", type=float, default=0.1, help="eslm-is: --eslm-is-prob")
    p.add_argument("--out-dir", default=os.path.join("runs", "selection_study"),
                   help="where selection_study.{csv,md,png} are written (default: untracked by git)")
    p.add_argument("--work-dir", help="tokenizer, dataset, checkpoints and metrics go here; default: <out-dir>/work")
    p.add_argument("--force", action="store_true",
                   help="write into --out-dir although it holds other files (only selection_study.* are replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", help="subset of the variants (default: all)")
    p.add_argument("--equal", choices=MEASURES, default="executed",
                   help="the budget the runs are compared at (dense's in --dense-iters steps): executed FLOPs, the "
                        "ESLM paper's FLOPs count, or tokens trained; the table shows executed and paper side by side")
    p.add_argument("--dense-iters", type=int, default=150, help="dense steps that define the budget")
    p.add_argument("--reference-iters", type=int, default=300, help="steps of the dense reference/teacher")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha of the fixed-alpha variants")
    p.add_argument("--seq-alpha", type=float, default=0.75,
                   help="eslm-seq: the second alpha of sequence ESLM (the first is --alpha)")
    p.add_argument("--alpha-max", type=float, default=0.8, help="ada-eslm grad-mass: --eslm-alpha-max")
    p.add_argument("--ada-budget", type=float, default=0.3, help="ada-eslm grad-mass: --ada-eslm-budget")
    p.add_argument("--proxy-iters", type=int, default=300, help="steps of the eslm-seq-proxy variants' proxy")
    p.add_argument("--proxy-num-layers", type=int, help="the proxy's layers (default: half the model's, at least 1)")
    p.add_argument("--proxy-hidden-size", type=int, help="the proxy's hidden size (default: half the model's)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-interval", type=int, default=15)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run-flags", default="", help="pretrain flags every run gets, e.g. \"--bf16\" on a GPU")
    p.add_argument("--prepare-only", action="store_true",
                   help="build the tokenizer and datasets in --work-dir and stop (data for a machine without "
                        "network: carry --work-dir there and give the same corpus flags)")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs whose metrics file in --work-dir is complete (re-report without retraining)")
    args = p.parse_args(argv)
    if args.work_dir is None:
        args.work_dir = os.path.join(args.out_dir, "work")
    # half the layers and half the width: 1/8 of the model's non-embedding parameters, heads of the same size
    args.proxy_num_layers = args.proxy_num_layers or max(1, args.num_layers // 2)
    args.proxy_hidden_size = args.proxy_hidden_size or args.hidden_size // 2
    args.proxy_num_attention_heads = max(1, args.num_attention_heads * args.proxy_hidden_size // args.hidden_size)
    if args.passes < 0:
        raise UserError(f"--passes {args.passes:g}: give a positive number of passes, or 0 for every document")
    return args


def check_texts(texts: list[str]) -> None:
    """Every --text is `stdlib` or a readable file, else one line (a fresh clone has no shared data)."""
    for text in texts:
        if text != "stdlib" and not os.path.isfile(text):
            raise UserError(f"--text {text}: no such file (`--text stdlib` is a corpus that needs no download)")


def setting(args: argparse.Namespace) -> str:
    """The model and regime in a run's file names: studies of several sizes and regimes share a --work-dir
    (and its tokenizer and datasets)."""
    return f"L{args.num_layers}-H{args.hidden_size}" + (f"-passes{args.passes:g}" if args.passes else "")


def train_frozen(args: argparse.Namespace, data: Data, name: str, iters: int, size: tuple[int, int, int]) -> tuple[str, str]:
    """A dense model the runs read but do not train (rho1's reference and eslm-kd's teacher, the sequence
    proxy), trained once (seed 0) into <work-dir>/<name>; (its checkpoint, a line on what it cost, which is
    not charged to the runs: they are charged only its forward passes). A study run again trains it afresh
    (unless --reuse keeps it) over its earlier checkpoint there: hence --overwrite-save."""
    save = os.path.join(args.work_dir, f"{setting(args)}-{name}")
    metrics = save + ".jsonl"
    print(f"{name}: training {iters} steps ...", flush=True)
    train(common_flags(args, data, iters, 0, size) + ["--selection", "none", "--save", save, "--overwrite-save"],
          metrics, iters, args.reuse)
    run = read_run(name, 0, iters, metrics, tuple(data.heldout))
    return save, (f"The {name} ({size[0]} layers, hidden {size[1]}) is a dense model trained for {iters} steps "
                  f"(seed 0): {sum(run.executed):.3g} FLOPs, {run.seconds / 60:.1f} min, final val ppl "
                  f"{math.exp(run.curve[-1][1]['val_loss']):.2f}; that cost is NOT charged to the runs.")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    ours = check_output_dir(args.out_dir, TOOL, "--out-dir", args.force)
    check_texts(args.text + args.heldout_text)
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    if ours:
        mark(args.out_dir, TOOL)
    budget_tokens = args.dense_iters * args.global_batch_size * args.seq_length
    data = prepare_data(args.text, args.heldout_text, args.work_dir, args.vocab_size, args.stdlib_mb << 20,
                        math.ceil(budget_tokens / args.passes) if args.passes else None)
    if args.prepare_only:
        print(f"data in {args.work_dir}: {data.train_tokens} training tokens; tokenizer {data.tokenizer}")
        return
    unigram = unigram_ppl(data.train)

    chosen = variants(args)
    size = (args.num_layers, args.hidden_size, args.num_attention_heads)
    proxy_size = (args.proxy_num_layers, args.proxy_hidden_size, args.proxy_num_attention_heads)
    frozen, notes = {}, []
    if any(v.frozen_head_rows >= 0 for v in chosen):
        frozen["reference"], note = train_frozen(args, data, "reference", args.reference_iters, size)
        notes.append(note.replace("The reference", "The rho1 reference and eslm-kd teacher"))
    if any(v.sequence == "proxy" for v in chosen):
        frozen["proxy"], note = train_frozen(args, data, "proxy", args.proxy_iters, proxy_size)
        notes.append(note.replace("The proxy", "The proxy scorer of eslm-seq-proxy"))
    model_cfg = parse_args(common_flags(args, data, args.dense_iters, 0)).model
    proxy_cfg = parse_args(common_flags(args, data, args.dense_iters, 0, proxy_size)).model
    vocab = -(-_tokenizer_vocab(data.tokenizer) // 128) * 128  # as the trainer pads it
    runs: list[Run] = []
    budgets = None
    for variant in chosen:
        extra = []
        if variant.name.startswith("rho1"):
            extra = ["--reference-load", frozen["reference"]]
        elif variant.name.startswith("eslm-kd"):
            extra = ["--teacher-load", frozen["reference"]]
        elif variant.sequence == "proxy":
            extra = ["--proxy-load", frozen["proxy"]]
        iters = steps_for_budget(args, variant, model_cfg, vocab, model_cfg, proxy_cfg)
        # evaluations at about the same spacing in FLOPs as dense's, however many steps the policy takes
        extra += ["--eval-interval", str(max(1, round(args.eval_interval * iters / args.dense_iters)))]
        for seed in args.seeds:
            print(f"{variant.name} seed {seed}: training {iters} steps ...", flush=True)
            metrics = os.path.join(args.work_dir, f"{setting(args)}-{variant.name}-seed{seed}.jsonl")
            flags = common_flags(args, data, iters, seed) + variant.flags + extra
            train(flags, metrics, iters, args.reuse)
            run = read_run(variant.name, seed, iters, metrics, tuple(data.heldout))
            runs.append(run)
            if budgets is None and variant.name == "dense":
                budgets = {measure: sum(run.spent[measure][: args.dense_iters]) for measure in MEASURES}
            print(f"{variant.name} seed {seed}: {iters} steps, {run.seconds:.0f} s, "
                  f"final val ppl {math.exp(run.curve[-1][1]['val_loss']):.2f}", flush=True)
    if budgets is None:
        raise SystemExit("the dense variant defines the budget: include it")
    rows = summarize(runs, budgets, args.equal, args.seq_length, data.train_tokens)
    domains = ", ".join(domain_name(text) for text in args.text)
    held = ", ".join(data.heldout)
    regime = (f"{data.train_tokens} training tokens, cut so that dense's budget passes over them {args.passes:g} "
              "times (the data-constrained regime)" if args.passes else f"{data.train_tokens} training tokens")
    header = (f"Model: {args.num_layers} layers, hidden {args.hidden_size}, sequence {args.seq_length}, global "
              f"batch {args.global_batch_size}. Corpora: {domains}"
              + (" (blended by size; per-domain columns)" if len(args.text) > 1 else "")
              + f", {regime}; every tenth document of each is held out for validation"
              + (f"; held-out domain{'s' if len(data.heldout) > 1 else ''} (validation only, never trained on): "
                 f"{held}" if held else "") + f". Budgets (dense, {args.dense_iters} steps): "
              f"{budgets['executed']:.3g} executed FLOPs, {budgets['paper']:.3g} paper FLOPs, "
              f"{budgets['tokens']:.0f} tokens per run; equal {args.equal} (val ppl and steps columns); seeds "
              f"{args.seeds}. Unigram-entropy level of the training data (the perplexity of "
              f"predicting each token by its frequency): {unigram:.1f}. exp(CVaR 0.9): exp of the mean of the "
              f"worst tenth of the validation token losses. " + " ".join(notes))
    csv_path, md_path, png_path = (os.path.join(args.out_dir, name) for name in OUTPUTS)
    write_csv(runs, csv_path + ".tmp")
    command = "python tools/selection_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_markdown(rows, md_path + ".tmp", header, command)
    plotted = plot(runs, budgets["executed"], unigram, png_path + ".tmp.png", data.heldout)
    for tmp, path in ((csv_path + ".tmp", csv_path), (md_path + ".tmp", md_path),
                      *(((png_path + ".tmp.png", png_path),) if plotted else ())):
        os.replace(tmp, path)
    print(open(md_path).read())


def _tokenizer_vocab(model: str) -> int:
    from megatron_eslm.tokenizer import build_tokenizer
    return build_tokenizer("SentencePieceTokenizer", model).vocab_size


if __name__ == "__main__":
    main()
