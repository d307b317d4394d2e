"""--compile (megatron_eslm/compiled_regions.py): each transformer layer compiled, the collectives, the
attention core, dropout, the LM head and the selection eager between the regions. A compiled run equals the
eager one in float32 over 5 steps: the logged numbers and every parameter within 1e-5 relative, the kept
fractions exactly; with one process under inductor's C++ backend (dense, ESLM by loss, sequence ESLM, full
recompute), with TP2 + sequence parallelism and PP2 on two gloo ranks under
aot_eager (the same regions, graph breaks and collectives, the graphs run by eager kernels: a cold inductor
compile costs a process some 20 s of CPU, and its kernels are the one-process test's). The compile time is logged once, and sequence selection's
scoring pass compiles once, not every step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_eslm import compiled_regions, parallel_state
from megatron_eslm.config import parse_args
from megatron_eslm.training.trainer import Trainer
from rank_pool import run_on_ranks
from test_parallel_training import SELECTIONS, assemble, flags, layout_flags, relative, shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_train_step  # noqa: E402

STEPS = 5
TOLERANCE = 1e-5  # float32 round-off over 5 steps (measured: inductor 1.0e-7 logged, 1.9e-6 parameters; aot_eager 0)
COMPARED = ("lm_loss", "kept_loss", "threshold", "grad_norm")
SEQUENCE = ["--selection", "eslm", "--eslm-granularity", "sequence", "--eslm-alpha", "0.34"]  # keeps 8 of 12
ONE_PROCESS = {
    "dense": SELECTIONS["dense"],
    "eslm-loss": SELECTIONS["eslm-loss"],
    "eslm-sequence": SEQUENCE,
    # the layer's regions compiled inside its checkpoint (selective recompute's core is eager either way)
    "recompute full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
}
# name -> (micro-batch, flags): 4 a step on one data-parallel rank, 2 on each of two
TWO_RANKS = {"tp2-sp": (4, layout_flags(2, 1, True)), "pp2": (4, layout_flags(1, 2, False))}


def run(argv: list[str]) -> dict:
    """One float32 run of `argv`: its records, final validation loss, parameters (shards), layout, and with
    --compile the lines that name it and the graphs built after the first iteration."""
    lines: list[str] = []
    trainer = Trainer(parse_args(argv), log=lambda line: lines.append(line))
    records = trainer.train()
    result = {"records": records, "val_loss": trainer.evaluate()["val_loss"], "params": shards(trainer),
              "layout": parallel_state.layout(), "compile_lines": [line for line in lines if "--compile" in line]}
    if trainer.compile_clock is not None:
        result["graphs_after_training"] = trainer.compile_clock.since_start()[0]
    trainer.close()
    return result


def eager_and_compiled(cases: dict[str, list[str]], backend: str) -> dict:
    """Each case eager, then with --compile under `backend` (on every rank of a pool, or in this process)."""
    default = compiled_regions.BACKEND
    compiled_regions.BACKEND = backend
    try:
        return {(name, compiled): run([*argv, *(["--compile"] if compiled else [])])
                for name, argv in cases.items() for compiled in (False, True)}
    finally:
        compiled_regions.BACKEND = default


def difference(eager: list[dict], compiled: list[dict]) -> tuple[float, float]:
    """(largest relative difference of the logged numbers, largest |compiled - eager| / (1 + |eager|) of the
    parameters); the kept fractions must be equal. The parameters' is absolute near zero: the key bias's
    gradient is zero in exact arithmetic (softmax ignores a shift shared by a query's scores), so both runs
    step it by Adam-normalised round-off, about 1e-6 apart next to values of 1e-6."""
    logged = relative(compiled[0]["val_loss"], eager[0]["val_loss"])
    assert len(eager[0]["records"]) == len(compiled[0]["records"]) == STEPS
    for got, want in zip(compiled[0]["records"], eager[0]["records"]):
        assert got["kept_fraction"] == want["kept_fraction"]
        logged = max(logged, *(relative(got[key], want[key]) for key in COMPARED))
    want, got = assemble(eager), assemble(compiled)
    params = max(float(((got[name] - w).abs() / (1 + w.abs())).max()) for name, w in want.items())
    return logged, params


def check(cases: dict[str, list[str]], per_rank: list[dict]) -> None:
    """Each case compiled against eager; the first built graphs (the later ones may reuse them: the cache
    is the process's)."""
    assert per_rank[0][(next(iter(cases)), True)]["graphs_after_training"] > 0
    for name in cases:
        eager, compiled = ([r[(name, c)] for r in per_rank] for c in (False, True))
        logged, params = difference(eager, compiled)
        print(f"| {name} | {logged:.1e} | {params:.1e} |")
        assert logged <= TOLERANCE and params <= TOLERANCE, f"{name}: {logged:.1e} logged, {params:.1e} parameters"
        assert not eager[0]["compile_lines"]
        line, = compiled[0]["compile_lines"]  # once
        assert "graphs compiled in" in line


def case_flags(corpus, micro_batch: int, extra: list[str]) -> list[str]:
    return [*flags(corpus, micro_batch, *extra), "--train-iters", str(STEPS), "--eval-iters", "1"]


@pytest.mark.slow
def test_one_process_compiled_equals_eager(tiny_corpus):
    """inductor (C++ on CPU) against eager: dense, ESLM, sequence ESLM, full recompute. The
    layers' graphs of the first case serve the others, and sequence ESLM's scoring pass (no autograd, eval)
    compiles in its first step only: no graph is built after it."""
    torch.set_num_threads(1)
    cases = {name: case_flags(tiny_corpus, 4, extra) for name, extra in ONE_PROCESS.items()}
    results = eager_and_compiled(cases, "inductor")
    check(cases, [results])
    sequence = results[("eslm-sequence", True)]
    built_in_first_step = int(sequence["compile_lines"][0].split(" graphs")[0].rsplit(" ", 1)[-1])
    assert sequence["graphs_after_training"] == built_in_first_step  # --eval-iters 1: scored as the step's pass


@pytest.mark.slow
def test_two_ranks_compiled_equal_eager(tiny_corpus):
    """TP2 with sequence parallelism (the collectives between the regions), PP2 (a stage's layers compiled,
    the sends and receives between them), compiled against eager, same layout."""
    cases = {name: case_flags(tiny_corpus, micro_batch, [*SELECTIONS["eslm-loss"], *extra])
             for name, (micro_batch, extra) in TWO_RANKS.items()}
    check(cases, run_on_ranks(2, eager_and_compiled, cases, "aot_eager"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (tools/device_check.sh: cuda_tests)")
def test_compiled_bf16_step_on_cuda(tiny_corpus):
    """On a GPU (inductor's Triton kernels) under --bf16, dense and ESLM: compiled equals eager within bf16
    round-off (the kernels fuse differently, so not within float32's)."""
    cases = {name: [*case_flags(tiny_corpus, 4, SELECTIONS[name]), "--bf16"] for name in ("dense", "eslm-loss")}
    results = eager_and_compiled(cases, "inductor")
    for name in cases:
        eager, compiled = results[(name, False)], results[(name, True)]
        for got, want in zip(compiled["records"], eager["records"]):
            assert relative(got["lm_loss"], want["lm_loss"]) < 2e-2, name


def test_bench_compiled_rows():
    """tools/bench_train_step.py --compile adds the dense and the first ESLM row, compiled."""
    args = bench_train_step.parse(["--alphas", "0.7", "--optimizer-impls", "--recompute", "--compile"])
    rows = bench_train_step.variants(args)
    assert [(row.name, row.compiled) for row in rows if row.compiled] == [
        ("dense, compiled", True), ("eslm a=0.7 sketch-exact, compiled", True)]


def test_compile_flag(tmp_path):
    """--compile parses into the training section (off by default)."""
    (tmp_path / "tok.model").write_text("x")
    base = ["--data-path", str(tmp_path / "corpus"), "--tokenizer-model", str(tmp_path / "tok.model")]
    assert parse_args([*base, "--compile"]).training.compile
    assert not parse_args(base).training.compile
