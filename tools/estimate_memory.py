#!/usr/bin/env python
"""Per-GPU memory of a pretraining run, computed, not measured: parameters, gradients, optimizer states
(our data parallelism or DeepSpeed ZeRO 1-3 under --bf16), transient buffers and the activations autograd
saves (under the run's activation recompute), for the largest pipeline stage and per stage.

    python tools/estimate_memory.py --config examples/llama_1b/pretrain.json \\
        --deepspeed-config examples/llama_1b/ds_config.json --world-size 8 --vocab-size 32000

Every other flag is a pretrain flag (`python -m megatron_eslm.pretrain --help`) and overrides the config,
e.g. --micro-batch-size 2 --seq-length 4096 --tensor-model-parallel-size 4 --zero-stage 3, or the recompute
flags: --recompute-granularity full --recompute-method uniform --recompute-num-layers 1. The layout is
checked as every rank would check it at that world size. The arithmetic, and what it leaves out, is in
megatron_eslm/training/memory.py; tests/test_estimate_memory.py checks it against tiny CPU runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from megatron_eslm.config import Config, parse_args
from megatron_eslm.config.parser import OneLineParser  # bad flags: one line
from megatron_eslm.errors import UserError, exit_on_user_error, read_json_object
from megatron_eslm.training import memory
from megatron_eslm.training.memory import Estimate, estimate

GIB = 2 ** 30
ROWS = ("parameters", "gradients", "optimizer", "buffers")
ROW_NAMES = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer states",
             "buffers": "buffers (transient)"}
DEEPSPEED_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config")


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The tool's own flags, and the pretrain flags (with --deepspeed implied by a DeepSpeed config)."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--world-size", type=int, required=True, help="GPUs of the run (TP x PP x DP)")
    parser.add_argument("--vocab-size", type=int,
                        help="the tokenizer's vocabulary, before padding (SentencePiece: its --vocab-size); "
                             "default: read from --tokenizer-model")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    own, rest = parser.parse_known_args(argv)
    for value, flag in ((own.world_size, "--world-size"), (own.vocab_size, "--vocab-size")):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    rest = recipe_folder(rest)
    if own.vocab_size is None:
        own.vocab_size = tokenizer_vocab(rest)
    if any(arg.split("=")[0] in DEEPSPEED_CONFIG_FLAGS for arg in rest) and "--deepspeed" not in rest:
        rest = ["--deepspeed", *rest]
    return own, rest


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to `flag` (as `--flag V` or `--flag=V`)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def recipe_folder(argv: list[str]) -> list[str]:
    """--config RECIPE_DIR as the launch scripts take it: its pretrain.json, and its ds_config.json unless a
    DeepSpeed config is given."""
    recipe = _flag_value(argv, "--config")
    if recipe is None or not os.path.isdir(recipe):
        return argv
    pretrain_json, ds_config = os.path.join(recipe, "pretrain.json"), os.path.join(recipe, "ds_config.json")
    if not os.path.isfile(pretrain_json):
        raise UserError(f"--config {recipe}: a folder without pretrain.json (give a recipe folder or a JSON file)")
    argv = [pretrain_json if arg == recipe else arg.replace(f"={recipe}", f"={pretrain_json}") for arg in argv]
    if os.path.isfile(ds_config) and not any(arg.split("=")[0] in DEEPSPEED_CONFIG_FLAGS for arg in argv):
        argv += ["--deepspeed-config", ds_config]
    return argv


def tokenizer_vocab(argv: list[str]) -> int:
    """The vocabulary of the tokenizer the flags or the --config recipe name, or one line saying how to give it."""
    from megatron_eslm.tokenizer import build_tokenizer

    config_path = _flag_value(argv, "--config")
    recipe = read_json_object(config_path, "--config") if config_path else {}
    model = _flag_value(argv, "--tokenizer-model") or recipe.get("tokenizer-model")
    kind = _flag_value(argv, "--tokenizer-type") or recipe.get("tokenizer-type", "SentencePieceTokenizer")
    if not model:
        raise UserError("--vocab-size: not given, and no --tokenizer-model to read it from (the recipes name "
                        "none): give --vocab-size V (e.g. the --vocab-size of tools/train_tokenizer.py) or "
                        "--tokenizer-model FILE")
    return build_tokenizer(kind, model).vocab_size


def load_config(pretrain_argv: list[str], vocab_size: int) -> Config:
    """The run's config through pretrain's own parser, with the paths the launch scripts add stubbed:
    the estimate reads no data or tokenizer (the vocabulary is --vocab-size) and writes no checkpoint."""
    return parse_args([*pretrain_argv, "--data-path", "unused", "--tokenizer-type", "NullTokenizer",
                       "--vocab-size", str(vocab_size), "--save", "unused"])


def describe(cfg: Config, est: Estimate, world_size: int, vocab_size: int) -> list[str]:
    m, t, lay = cfg.model, cfg.training, est.layout
    heads = f"{m.num_attention_heads} heads"
    if m.num_query_groups != m.num_attention_heads:
        heads += f" ({m.num_query_groups} query groups)"
    parts = [f"{m.num_layers} layers", f"hidden {m.hidden_size}", heads, f"head dim {m.kv_channels}",
             f"ffn {m.ffn_hidden_size}{' SwiGLU' if m.swiglu else ''}", m.normalization, m.position_embedding_type,
             "untied head" if m.untie_embeddings_and_output_weights else "tied head",
             "no linear biases" if m.disable_bias_linear else "linear biases"]
    optimizer = f"DeepSpeed ZeRO-{est.zero_stage}" if cfg.deepspeed.deepspeed else "our data parallelism (no ZeRO)"
    return [
        f"model:  {', '.join(parts)}; vocabulary {vocab_size} padded to {est.vocab_size}",
        f"layout: {world_size} GPUs = {lay.describe()}; {optimizer}; "
        f"{'bf16' if t.bf16 else 'fp32'}; micro-batch {t.micro_batch_size} x {m.seq_length} tokens"
        f"{f' ({m.seq_length // lay.cp} per rank)' if lay.cp > 1 else ''}, "
        f"{est.micro_batches} micro-batches per step; recompute: {est.recompute}",
    ]


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)  # noqa: E731
                                 for i, (cell, w) in enumerate(zip(row, widths)))
    return [line(header), *map(line, rows)]


def render(cfg: Config, est: Estimate, world_size: int, vocab_size: int) -> str:
    stages = est.stages
    header = ["GiB per GPU", *[f"stage {s.stage}" for s in stages]]
    rows = [["parameters (millions)", *[f"{s.parameters / 1e6:.1f}" for s in stages]]]
    rows += [[ROW_NAMES[name], *[_gib(getattr(s.states, name)) for s in stages]] for name in ROWS]
    rows.append(["activations", *[_gib(s.activations.total) for s in stages]])
    rows.append(["  micro-batches in flight", *[str(s.activations.in_flight) for s in stages]])
    if any(s.activations.recomputed for s in stages):
        rows.append(["  of which one recompute", *[_gib(s.activations.recomputed) for s in stages]])
    rows.append(["total", *[_gib(s.total) for s in stages]])
    out = ["Per-GPU memory, computed, not measured (megatron_eslm/training/memory.py)",
           *describe(cfg, est, world_size, vocab_size), "", *_table(header, rows)]
    if len(stages) > 1:
        out.append(f"largest: stage {est.largest.stage}, {_gib(est.largest.total)} GiB")
    out += ["", f"Model states of stage {est.largest.stage} by ZeRO stage (GiB per GPU; activations as above):",
            *_table(["ZeRO", *[ROW_NAMES[name] for name in ROWS], "total"],
                    [[_zero_name(cfg, stage), *[_gib(getattr(states, name)) for name in ROWS], _gib(states.total)]
                     for stage, states in est.by_zero_stage.items()])]
    if not est.bf16:
        out.append("(DeepSpeed's stages are estimated under --bf16 only)")
    out.append("ZeRO-2's gradient sums: " + ("the rank's partition (DeepSpeed 0.19.8 on)"
                                              if memory.zero2_sums_the_partition() else
                                              "whole parameters overlapping the partition (DeepSpeed before 0.19.8)"))
    return "\n".join(out)


def _zero_name(cfg: Config, stage: int) -> str:
    name = "0 (ours)" if stage == 0 else str(stage)
    refused = stage >= 2 and (cfg.parallel.pipeline_model_parallel_size > 1 or cfg.parallel.sequence_parallel)
    return name + (" (refused with PP/SP)" if refused else "")


def as_json(est: Estimate) -> str:
    def stage(s) -> dict:
        return {"stage": s.stage, "parameters": s.parameters, **{k: v for k, v in asdict(s.states).items()},
                "activations": s.activations.total, "activation_parts": asdict(s.activations), "total": s.total}

    return json.dumps({
        "layout": asdict(est.layout), "padded_vocab_size": est.vocab_size, "zero_stage": est.zero_stage,
        "bf16": est.bf16, "micro_batches": est.micro_batches, "recompute": est.recompute,
        "stages": [stage(s) for s in est.stages], "largest_stage": est.largest.stage,
        "by_zero_stage": {str(k): {**asdict(v), "total": v.total} for k, v in est.by_zero_stage.items()},
    }, indent=2)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    own, pretrain_argv = split_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(pretrain_argv, own.vocab_size)
    est = estimate(cfg, own.vocab_size, own.world_size)
    print(as_json(est) if own.json else render(cfg, est, own.world_size, own.vocab_size))


if __name__ == "__main__":
    main()
