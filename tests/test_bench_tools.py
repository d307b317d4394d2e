"""Smoke tests of the benchmark tools a GPU session runs first (tools/device_check.sh): each row kind of
tools/bench_train_step.py at a tiny shape, its presets against the recipes they copy, and the device
check's dry run. The numbers are not checked: on this CPU they only have to exist."""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_eslm.config import parse_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_lm_head_triton  # noqa: E402
import bench_train_step  # noqa: E402

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--vocab-size", "128", "--micro-batch-size", "2", "--steps", "1", "--threads", "1", "--device", "cpu"]
RECIPES = {"gpt2-124m": "gpt2_124m", "llama-1b": "llama_1b"}


def table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table's header, and its rows by variant name (the cells after the name)."""
    lines = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    cells = [[cell.strip() for cell in line] for line in lines if "---" not in line[0]]
    return cells[0][1:], {row[0]: row[1:] for row in cells[1:]}


def test_train_step_rows(capsys):
    """Every row kind, each ratio to the dense row of the same run; --peak-tflops gives the MFU column."""
    bench_train_step.main([*TINY, "--alphas", "0.7", "--peak-tflops", "1.0"])
    header, rows = table(capsys.readouterr().out)
    assert list(rows) == ["dense", "eslm a=0.7 sketch-exact", "random a=0.7", "eslm sequence a=0.5",
                          "random sequence a=0.5", "dense, optimizer fused",
                          "dense, optimizer foreach", "dense, optimizer loop", "dense, recompute selective",
                          "dense, recompute full uniform 1"]
    column = {name: [cells[i] for cells in rows.values()] for i, name in enumerate(header)}
    assert column["time vs dense"][0] == column["optimizer vs dense"][0] == "1.000"
    assert float(column["kept"][1]) < 0.5 and float(column["executed FLOPs vs dense"][1]) < 1.0  # keep 0.3
    assert column["kept"][3:5] == ["0.500", "0.500"]  # sequences: scored (1/3 + 1/2 of dense) or drawn (1/2)
    assert column["executed FLOPs vs dense"][3:5] == ["0.833", "0.500"]
    # three significant digits, not three decimals: a tiny model on a slow CPU must not print 0.000
    assert all(float(mfu) == pytest.approx(float(achieved), rel=1e-2)
               for mfu, achieved in zip(column["MFU"], column["TFLOP/s per device"]))
    assert set(column["peak GiB"]) == {"-"}  # CUDA only


def test_train_step_llama_preset_at_a_tiny_shape(capsys):
    """The llama-1b preset keeps its Llama options under smaller sizes; no MFU without a known peak."""
    bench_train_step.main([*TINY, "--preset", "llama-1b", "--num-query-groups", "2", "--ffn-hidden-size", "64",
                           "--alphas", "--optimizer-impls", "--recompute", "full"])
    out = capsys.readouterr().out
    assert "heads 4 (2 query groups), ffn 64, Llama (rope, RMSNorm, SwiGLU, untied head, no biases)" in out
    header, rows = table(out)
    assert list(rows) == ["dense", "dense, recompute full uniform 1"]
    assert rows["dense"][header.index("MFU")] == "-"


@pytest.mark.parametrize("preset", sorted(bench_train_step.PRESETS))
def test_presets_match_the_recipes(preset):
    """A preset's model and micro-batch are its recipe's (dropout aside: the bench runs without)."""
    recipe = parse_args(["--config", str(REPO / "examples" / RECIPES[preset] / "pretrain.json"), "--data-path", "x",
                         "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--save", "x"])
    args = bench_train_step.parse(["--preset", preset])
    ours = dataclasses.asdict(bench_train_step.model_config(args))
    theirs = dataclasses.asdict(recipe.model)
    for values in (ours, theirs):
        del values["hidden_dropout"], values["attention_dropout"]
    assert ours == theirs
    assert args.micro_batch_size == recipe.training.micro_batch_size


def test_device_check_dry_run(tmp_path):
    """The device check's steps, each with its timeout within the budget, into a report, running nothing."""
    env = {**os.environ, "DEVICE_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    subprocess.run(["bash", str(REPO / "tools" / "device_check.sh")], env=env, check=True, capture_output=True)
    report = (tmp_path / "report.md").read_text()
    steps = re.findall(r"^\| (\w+) \| dry run \(timeout (\d+) s\)", report, re.M)
    fp8_steps = ("fp8_tests", "llama_fp8_step", "fp8_loss")  # dry runs with torchao, else skipped and named
    assert [name for name, _ in steps if name not in fp8_steps] == [
        "env", "install", "wheels", "nccl_faults", "cuda_tests", "cp_attention", "pp4_bubble", "attention_tests",
        "triton_tests", "lm_head_bench", "gpt2_step_triton", "gpt2_step_torch", "llama_step", "compile_gpt2",
        "compile_llama", "llama_memory", "save_bench", "peers",
        "quickstart", "quickstart_bf16", "selection_study"]
    assert "tests/test_lm_head_triton.py" in report and "tests/test_host_syncs.py" in report
    assert [re.search(rf"^\| {name} \| (dry run|skipped: needs python module\(s\) torchao)", report, re.M) is not None
            for name in fp8_steps] == [True] * 3
    # the study's flags parse (a GPU session cannot afford to find a typo there)
    import selection_study
    study = re.search(r"`\S+ tools/selection_study.py (.*?)` \(", report).group(1)
    args = selection_study.parse(shlex.split(study))
    assert (args.num_layers, args.hidden_size, args.seq_length, args.run_flags) == (12, 768, 1024, "--bf16")
    assert args.variants == ["dense", "eslm-seq-0.5", "lfr-mask"]
    # issue 31's bubble: PP4 on the machine's CPU cores, the GPU hidden from the ranks
    assert re.search(r"CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 \S+ tools/bench_pipeline_bubble.py --pp 4 ", report)
    assert (tmp_path / "logs.tar.gz").exists()


def test_lm_head_bench_rows_of_the_published_fused_losses(monkeypatch):
    """The GPU benchmark's Liger and Cut Cross-Entropy rows, with stand-ins for the packages (which this CPU
    lacks): each row calls its package as documented (weight and hidden in its order), none without it, and
    a CCE without ``cce_exact`` (its PyPI release 25.1.1) gets its unfiltered ``cce`` instead."""
    calls = []

    def mean_loss(hidden, weight, labels):
        return F.cross_entropy(hidden @ weight.t(), labels)  # shapes [N, H] and [V, H]: no swap goes unnoticed

    class Liger(torch.nn.Module):
        def forward(self, lin_weight, _input, target):
            calls.append("liger")
            return mean_loss(_input, lin_weight, target)

    def linear_cross_entropy(e, c, targets, impl, **options):
        calls.append((impl, options))
        return mean_loss(e, c, targets)

    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    labels = torch.randint(0, 10, (6,))
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    assert list(bench_lm_head_triton.baselines(hidden, weight, labels, False)) == ["eager"]
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers",
                        types.SimpleNamespace(LigerFusedLinearCrossEntropyLoss=Liger))
    rows = {}
    for release, impls in (("github", ["CCE", "CCE_EXACT"]), ("25.1.1", ["CCE"])):
        cce = types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy,
                                    LinearCrossEntropyImpl=types.SimpleNamespace(**dict.fromkeys(impls)))
        monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce)
        steps = bench_lm_head_triton.baselines(hidden, weight, labels, False)
        rows[release] = list(steps)
        for step in steps.values():
            step()
    assert rows == {"github": ["eager", "liger fused CE", "cce", "cce_exact"],
                    "25.1.1": ["eager", "liger fused CE", "cce", "cce filter_eps=None"]}
    assert calls == ["liger", ("cce", {}), ("cce_exact", {}), "liger", ("cce", {}), ("cce", {"filter_eps": None})]
    assert torch.allclose(weight.grad, 8 * torch.autograd.grad(mean_loss(hidden, weight, labels), weight)[0])
