"""Tensor, sequence, pipeline and data parallelism against one process, on gloo process groups (CPU).

One job list per world size runs every model x layout x selection on the session's ranks inside one
process group (each trainer builds and drops its model-parallel groups); the parent runs the one-process
references on the same global batches, with DP x the micro-batch size. Both run in float64 and compare:

  per step lm_loss, kept_loss, threshold and grad_norm, and the validation loss, to LOGGED_TOLERANCE
  relative (1e-14); the kept fraction exactly;
  every parameter after the steps (TP shards concatenated, pipeline layers renumbered) to
  PARAMETER_TOLERANCE relative (5e-12).
  Float64 because Adam turns float32 round-off in (near-)zero gradients into full-size steps: the key
  bias's gradient is exactly zero, so both runs update it by normalised noise. One float64 run gives both
  checks (float32 twins of every case doubled the suite's multi-rank time; float32 parallel runs are the
  DeepSpeed table's, tests/test_deepspeed.py, and bf16 ones tests/test_bf16_activations.py's).

The models: GPT-2 shaped (every layout, dense and ESLM by loss and entropy) and Llama shaped (rope, RMSNorm,
SwiGLU, 2 key/value groups, untied output layer, no biases: TP2, PP2, DP2 and TP2xPP2+SP; dense, ESLM and
Ada-ESLM).

Besides: DP replicas, TP-replicated parameters and the two copies of the tied embedding stay bitwise
equal; dropout under the RNG tracker is reproducible and resumes exactly from a 4-rank checkpoint; the
bytes every collective moves match the model of tools/bench_comm.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_eslm import parallel_state
from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.errors import UserError
from megatron_eslm.eslm.policies import ESLMPolicy
from megatron_eslm.kernels import lm_head_triton
from megatron_eslm.model.lm_head import selective_lm_head_loss
from megatron_eslm.tensor_parallel import mappings
from megatron_eslm.tensor_parallel.lm_head import vocab_parallel_lm_head_loss
from megatron_eslm.tensor_parallel.random import get_rng_tracker, set_random_seeds
from megatron_eslm.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_comm  # noqa: E402
from helpers import TIMING  # noqa: E402  (the wall-clock record fields)
from rank_pool import run_on_ranks  # noqa: E402

GLOBAL_BATCH = 12
REFERENCE_MICRO_BATCH = 4  # = DP x micro-batch in every layout
STEPS = 3
SELECTIONS = {
    "dense": ["--selection", "none"],
    "eslm-loss": ["--selection", "eslm", "--eslm-alpha", "0.6", "--eslm-score", "loss"],
    "eslm-entropy": ["--selection", "eslm", "--eslm-alpha", "0.6", "--eslm-score", "entropy"],
}
LAYOUTS = {
    2: {"tp2": (2, 1, False), "pp2": (1, 2, False), "dp2": (1, 1, False), "tp2-sp": (2, 1, True)},
    4: {"tp2pp2": (2, 2, False), "tp2dp2": (2, 1, False), "pp2dp2": (1, 2, False), "tp2pp2-sp": (2, 2, True)},
}
TWO_RANK_BASICS = {name: LAYOUTS[2][name] for name in ("dp2", "tp2", "pp2")}  # for the policies' own checks
# A Llama-shaped model at the tests' hidden 32 and 4 heads (2 key/value groups: one per TP rank).
LLAMA_FLAGS = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--ffn-hidden-size", "48",
               "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
               "--disable-bias-linear"]
LLAMA_SELECTIONS = {
    "dense": SELECTIONS["dense"],
    "eslm-loss": SELECTIONS["eslm-loss"],
    # test_parallel_policies.py's: alpha moves from 0.1 every micro-batch
    "ada-eslm": ["--selection", "ada-eslm", "--eslm-alpha", "0.1", "--ada-eslm-budget", "0.2", "--ada-eslm-momentum",
                 "0.5"],
}
# model -> (its flags, selections, layouts checked per world size)
MODELS = {"gpt2": ([], SELECTIONS, {world: tuple(layouts) for world, layouts in LAYOUTS.items()}),
          "llama": (LLAMA_FLAGS, LLAMA_SELECTIONS, {2: ("tp2", "pp2", "dp2"), 4: ("tp2pp2-sp",)})}
COMPARED = ("lm_loss", "kept_loss", "threshold", "grad_norm")
DTYPE = torch.float64  # of the equivalence runs
# relative, measured (every layout, model and policy of the suite) at most 4.7e-16 and 5.1e-13
LOGGED_TOLERANCE, PARAMETER_TOLERANCE = 1e-14, 5e-12


def flags(corpus, micro_batch: int, *extra: str) -> list[str]:
    prefix, model = corpus
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", str(micro_batch), "--global-batch-size", str(GLOBAL_BATCH),
            "--train-iters", str(STEPS), "--lr", "3e-3", "--lr-warmup-iters", "1", "--data-path", prefix,
            "--tokenizer-model", model, "--split", "90,10,0", "--eval-interval", "1000", "--eval-iters", "1",
            "--log-interval", "1", "--num-workers", "0", "--seed", "7", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--make-vocab-size-divisible-by", "32", *extra]


def model_flags(corpus, micro_batch: int, model: str, selection: str, *extra: str) -> list[str]:
    model_extra, selections, _ = MODELS[model]
    return flags(corpus, micro_batch, *model_extra, *selections[selection], *extra)


def cases(world: int) -> list[tuple[str, str, str]]:
    """(model, layout, selection) run on `world` ranks."""
    return [(model, layout, selection) for model, (_, selections, layouts) in MODELS.items()
            for layout in layouts[world] for selection in selections]


def layout_flags(tp: int, pp: int, sp: bool) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            *(["--sequence-parallel"] if sp else [])]


def micro_batch(world: int, tp: int, pp: int) -> int:
    return REFERENCE_MICRO_BATCH // (world // (tp * pp))


# ----------------------------------------------------------------------------------------- runs

def shards(trainer: Trainer) -> dict:
    """This rank's parameters under their one-process names, with what is needed to put them together."""
    out = {}
    for name, param in trainer.model.named_parameters():
        name = re.sub(r"^layers\.(\d+)\.", lambda m: f"layers.{trainer.model.layer_numbers[int(m.group(1))]}.",
                      name)
        split = getattr(param, "partition_dim", None)
        out[name] = (param.detach().clone(), split, getattr(param, "tied_copy", False))
    return out


def train(argv: list[str], dtype: torch.dtype) -> dict:
    torch.set_default_dtype(dtype)
    try:
        trainer = Trainer(parse_args(argv), log=lambda *a: None)
        records = trainer.train()
        result = {"records": records, "val_loss": trainer.evaluate()["val_loss"], "params": shards(trainer),
                  "layout": parallel_state.layout()}
        trainer.close()
        return result
    finally:
        torch.set_default_dtype(torch.float32)


def resume(argv: list[str], save: str) -> tuple[list[dict], list[dict]]:
    """4 steps saving at 2, then a resumed run of steps 3-4 from that checkpoint."""
    _, straight = train_records([*argv, "--train-iters", "4", "--save", save, "--save-interval", "2"])
    if dist.get_rank() == 0:
        Path(save, "latest_checkpointed_iteration.txt").write_text("2\n")
    dist.barrier()
    _, resumed = train_records([*argv, "--train-iters", "4", "--load", save])
    return straight, resumed


def load_error(argv: list[str]) -> str:
    """The one line a resume on another layout stops with (on every rank)."""
    try:
        Trainer(parse_args(argv), log=lambda *a: None)
    except UserError as err:
        return str(err)
    return "no error"


def train_records(argv: list[str]) -> tuple[dict, list[dict]]:
    trainer = Trainer(parse_args(argv), log=lambda *a: None)
    records = trainer.train()
    params = shards(trainer)
    trainer.close()
    return params, records


def mapping_checks() -> dict:
    """Each tensor-parallel mapping's forward and backward on a small [b, s, h] tensor, world = TP = 2."""
    parallel_state.initialize_model_parallel(2, 1)
    rank = parallel_state.tensor_model_parallel_rank()
    x = (torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6) + 100 * rank).requires_grad_()
    out = {}
    for name in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                 "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
                 "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
                 "reduce_scatter_to_sequence_parallel_region"):
        x.grad = None
        y = getattr(mappings, name)(x * 1)  # a fresh non-leaf: the all-reduce works in place, as Megatron's
        grad = torch.full_like(y, 1.0 + rank)
        y.backward(grad)
        out[name] = (y.detach().clone(), x.grad.clone())
    set_random_seeds(7, torch.device("cpu"))
    with get_rng_tracker().fork():
        out["model-parallel draw"] = torch.rand(4)
    out["default draw"] = torch.rand(4)
    parallel_state.destroy_model_parallel()
    return out


def head_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 hidden [24, 16], weight [64, 16] and labels with some ignored: one LM head, two vocab shards."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 64, (24,), generator=gen)
    labels[::5] = -100
    return hidden, weight, labels


def head_implementations() -> list[str]:
    """torch, and triton where it can run (in its interpreter on CPU: see `_rank_main`)."""
    return ["torch", "triton"] if lm_head_triton.is_available() else ["torch"]


def run_head(hidden, weight, labels, select, impl, **kwargs) -> tuple[torch.Tensor, ...]:
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    head = vocab_parallel_lm_head_loss if "vocab_start" in kwargs else selective_lm_head_loss
    out = head(hidden, weight, labels, select, impl=impl, **kwargs)
    out.loss.backward()
    return out.loss.detach(), out.scores.loss, out.scores.entropy, out.selection.kept, hidden.grad, weight.grad


def head_checks() -> dict:
    """The vocab-parallel head on two TP ranks, dense and ESLM, with each kernel implementation."""
    parallel_state.initialize_model_parallel(2, 1)
    rank = parallel_state.tensor_model_parallel_rank()
    hidden, weight, labels = head_inputs()
    out = {(impl, selection): run_head(hidden, weight.chunk(2)[rank], labels,
                                       ESLMPolicy(0.5, "loss") if selection == "eslm" else None, impl,
                                       vocab_start=32 * rank)
           for impl in head_implementations() for selection in ("dense", "eslm")}
    parallel_state.destroy_model_parallel()
    return out


def run_jobs(jobs: list[tuple]) -> dict:
    """On every rank of a pool (tests/rank_pool.py): each job's result under its name."""
    kinds = {"train": train, "resume": resume, "mappings": mapping_checks, "head": head_checks,
             "comm": bench_comm.count_bytes, "load error": load_error}
    return {name: kinds[kind](*args) for name, kind, *args in jobs}


def spawn(world: int, jobs: list[tuple]) -> list[dict]:
    """`jobs` on the session's `world` gloo ranks (tests/rank_pool.py); every rank's results."""
    return run_on_ranks(world, run_jobs, jobs)


# ----------------------------------------------------------------------------------------- checks

def assemble(results: list[dict]) -> dict[str, torch.Tensor]:
    """The one-process parameters from every rank's shards, checking that copies are bitwise equal."""
    pieces: dict[str, dict[tuple[int, int], tuple]] = {}
    for result in results:
        layout = result["layout"]
        for name, (tensor, split, tied_copy) in result["params"].items():
            key = (layout.tp_rank, layout.dp_rank * layout.cp + layout.cp_rank)  # replicas: data x context
            if tied_copy:  # the last stage's copy of the tied embedding equals the first stage's
                pieces.setdefault(name + "@last", {})[key] = (tensor, split)
                continue
            pieces.setdefault(name, {})[key] = (tensor, split)
    full = {}
    for name, by_rank in pieces.items():
        tp = 1 + max(t for t, _ in by_rank)
        for (t, d), (tensor, _) in by_rank.items():  # data (and context) parallel replicas are identical
            assert torch.equal(tensor, by_rank[(t, 0)][0]), f"{name}: replica {d} differs"
        split = by_rank[(0, 0)][1]
        if split is None:  # replicated over TP: identical on every TP rank
            for t in range(tp):
                assert torch.equal(by_rank[(t, 0)][0], by_rank[(0, 0)][0]), f"{name}: TP rank {t} differs"
            full[name] = by_rank[(0, 0)][0]
        else:
            full[name] = torch.cat([by_rank[(t, 0)][0] for t in range(tp)], split)
    for name in [n for n in full if n.endswith("@last")]:
        assert torch.equal(full.pop(name), full[name.removesuffix("@last")]), f"{name}: tied copies differ"
    return full


def relative(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        assert a is None and b is None
        return 0.0
    return abs(a - b) / max(abs(b), 1e-30)


def record_difference(result: dict, reference: dict) -> float:
    """Largest relative difference of the logged numbers; the kept fractions must be equal."""
    worst = relative(result["val_loss"], reference["val_loss"])
    assert len(result["records"]) == len(reference["records"]) == STEPS
    for got, want in zip(result["records"], reference["records"]):
        assert got["kept_fraction"] == want["kept_fraction"]
        worst = max(worst, *(relative(got[key], want[key]) for key in COMPARED))
    return worst


def parameter_difference(results: list[dict], reference: dict) -> float:
    """Largest max|difference| / max|reference| over the parameter tensors."""
    full = assemble(results)
    assert full.keys() == reference["params"].keys()
    return max(float((full[name] - want).abs().max() / want.abs().max())
               for name, (want, _, _) in reference["params"].items())


@pytest.fixture(scope="module")
def references(tiny_corpus):
    """One-process runs with the layouts' global micro-batch, per model and selection."""
    torch.set_num_threads(1)
    return {(model, selection): train(model_flags(tiny_corpus, REFERENCE_MICRO_BATCH, model, selection), DTYPE)
            for model, (_, selections, _) in MODELS.items() for selection in selections}


def equivalence_jobs(world: int, corpus) -> list[tuple]:
    jobs = []
    for model, layout, selection in cases(world):
        tp, pp, sp = LAYOUTS[world][layout]
        argv = model_flags(corpus, micro_batch(world, tp, pp), model, selection, *layout_flags(tp, pp, sp))
        jobs.append(((model, layout, selection), "train", argv, DTYPE))
    return jobs


def check_equivalence(checked: list[tuple[str, str, str]], per_rank: list[dict], references: dict) -> dict:
    """Each (model, layout, selection) of `checked`, run as `equivalence_jobs` names its results, against the
    one-process reference of its model and selection."""
    table = {}
    for model, layout, selection in checked:
        label = f"{model} {layout} {selection}"
        results = [r[(model, layout, selection)] for r in per_rank]
        logged = record_difference(results[0], references[(model, selection)])
        params = parameter_difference(results, references[(model, selection)])
        table[label] = (logged, params)
        assert logged <= LOGGED_TOLERANCE, f"{label}: logged numbers differ by {logged:.2e}"
        assert params <= PARAMETER_TOLERANCE, f"{label}: parameters differ by {params:.2e}"
    print("\n".join(f"| {k} | {a:.1e} | {b:.1e} |" for k, (a, b) in table.items()))
    return table


def equal_to_one_process(corpus, world: int, layouts: dict[str, tuple[int, int, bool]], selection: list[str],
                         model: str = "gpt2") -> list[dict]:
    """`selection`'s runs on the `world` ranks of each layout against one process, as `check_equivalence`
    compares them (logged numbers, kept fractions and parameters); the one-process records."""
    model_extra = MODELS[model][0]
    jobs = [((model, layout, "policy"), "train",
             flags(corpus, micro_batch(world, tp, pp), *model_extra, *selection, *layout_flags(tp, pp, sp)), DTYPE)
            for layout, (tp, pp, sp) in layouts.items()]
    references = {(model, "policy"): train(flags(corpus, REFERENCE_MICRO_BATCH, *model_extra, *selection), DTYPE)}
    check_equivalence([(model, layout, "policy") for layout in layouts], spawn(world, jobs), references)
    return references[(model, "policy")]["records"]


def dropout_flags(corpus, *extra: str) -> list[str]:
    return [*flags(corpus, REFERENCE_MICRO_BATCH, *extra), "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_two_ranks(tiny_corpus, references, tmp_path):
    """TP2, PP2, DP2 and TP2 with sequence parallelism; the mappings; dropout under TP is reproducible."""
    dropout = dropout_flags(tiny_corpus, *SELECTIONS["eslm-loss"], *layout_flags(2, 1, True))
    jobs = [*equivalence_jobs(2, tiny_corpus), ("mappings", "mappings"), ("head", "head"),
            ("dropout a", "train", dropout, DTYPE), ("dropout b", "train", dropout, DTYPE)]
    per_rank = spawn(2, jobs)
    check_equivalence(cases(2), per_rank, references)

    first, second = ([r[name] for r in per_rank] for name in ("dropout a", "dropout b"))
    assert untimed(first[0]["records"]) == untimed(second[0]["records"])
    first_params, second_params = assemble(first), assemble(second)  # replicated ones: equal on both TP ranks
    assert all(torch.equal(first_params[name], second_params[name]) for name in first_params)
    without = per_rank[0][("gpt2", "tp2-sp", "eslm-loss")]["records"]
    assert first[0]["records"][-1]["lm_loss"] != without[-1]["lm_loss"]  # dropout was on

    maps = [r["mappings"] for r in per_rank]
    x = [torch.arange(48, dtype=torch.float32).view(2, 4, 6) + 100 * r for r in range(2)]
    ones = [torch.full((1,), 1.0 + r) for r in range(2)]
    for r in range(2):
        y, g = maps[r]["copy_to_tensor_model_parallel_region"]
        assert torch.equal(y, x[r]) and torch.equal(g, torch.full_like(g, 3.0))
        y, g = maps[r]["reduce_from_tensor_model_parallel_region"]
        assert torch.equal(y, x[0] + x[1]) and torch.equal(g, ones[r].expand_as(g))
        y, g = maps[r]["scatter_to_tensor_model_parallel_region"]
        assert torch.equal(y, x[r][..., 3 * r:3 * r + 3])
        assert torch.equal(g, torch.cat([torch.full((2, 4, 3), 1.0), torch.full((2, 4, 3), 2.0)], -1))
        y, g = maps[r]["gather_from_tensor_model_parallel_region"]
        assert torch.equal(y, torch.cat(x, -1)) and torch.equal(g, ones[r].expand_as(g))
        y, g = maps[r]["scatter_to_sequence_parallel_region"]
        assert torch.equal(y, x[r][:, 2 * r:2 * r + 2])
        assert torch.equal(g, torch.cat([torch.full((2, 2, 6), 1.0), torch.full((2, 2, 6), 2.0)], 1))
        y, g = maps[r]["gather_from_sequence_parallel_region"]
        assert torch.equal(y, torch.cat(x, 1)) and torch.equal(g, torch.full_like(g, 3.0))
        y, g = maps[r]["reduce_scatter_to_sequence_parallel_region"]
        assert torch.equal(y, (x[0] + x[1])[:, 2 * r:2 * r + 2])
        assert torch.equal(g, torch.cat([torch.full((2, 2, 6), 1.0), torch.full((2, 2, 6), 2.0)], 1))
    assert not torch.equal(maps[0]["model-parallel draw"], maps[1]["model-parallel draw"])
    assert torch.equal(maps[0]["default draw"], maps[1]["default draw"])

    hidden, weight, labels = head_inputs()
    heads = [r["head"] for r in per_rank]
    assert {impl for impl, _ in heads[0]} == ({"torch", "triton"} if importlib.util.find_spec("triton") else {"torch"})
    for (impl, selection), first in heads[0].items():
        second = heads[1][(impl, selection)]
        want = run_head(hidden, weight, labels, ESLMPolicy(0.5, "loss") if selection == "eslm" else None, "torch")
        for got in (first, second):
            for a, b in zip((*got[:5], torch.cat([first[5], second[5]])), want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{impl} {selection}")


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["dense", "eslm-loss"])
def test_four_deep_layouts(tiny_corpus, selection):
    """PP4 (4 layers, one a stage; 6 micro-batches: stage 0 warms up with 3 forwards before its first
    backward, the middle stages receive and send both ways) and TP4 (one attention head a rank, the
    vocabulary in quarters: divisible by 16 x 4 leaves the 320 rows unpadded) against one process."""
    deep = ["--num-layers", "4", "--micro-batch-size", "2", "--make-vocab-size-divisible-by", "16"]
    layouts = {"pp4": (1, 4, False), "tp4": (4, 1, False)}
    records = equal_to_one_process(tiny_corpus, 4, layouts, [*SELECTIONS[selection], *deep])
    assert len(records) == STEPS


@pytest.mark.slow
def test_four_ranks(tiny_corpus, references, tmp_path):
    """TP2xPP2, TP2xDP2, PP2xDP2 and TP2xPP2 with sequence parallelism; exact resume with dropout on
    TP2xPP2 (per-stage checkpoint directories, the tracker's streams) and TP2xDP2 with random selection
    (every replica's RNG state); a resume on another layout stops in one line; bench_comm's model."""
    jobs = [*equivalence_jobs(4, tiny_corpus),
            ("resume tp2pp2", "resume", dropout_flags(tiny_corpus, "--selection", "eslm", *layout_flags(2, 2, True)),
             str(tmp_path / "ckpt-a")),
            ("resume tp2dp2", "resume", [*dropout_flags(tiny_corpus, "--selection", "random", *layout_flags(2, 1, False)),
                                         "--micro-batch-size", "2"], str(tmp_path / "ckpt-b"))]
    comm = {name: bench_comm.tiny(bench_comm.Setup(tp, pp, 4 // (tp * pp), sp))
            for name, (tp, pp, sp) in LAYOUTS[4].items()}
    prefix = str(tmp_path / "tokens")
    bench_comm.write_dataset(prefix, bench_comm.tiny(bench_comm.Setup())[0].vocab - 1)
    jobs += [(("comm", name), "comm", setups, prefix) for name, setups in comm.items()]
    jobs.append(("other layout", "load error", [*flags(tiny_corpus, 2, *layout_flags(2, 1, False)),
                                               "--load", str(tmp_path / "ckpt-a")]))
    per_rank = spawn(4, jobs)
    check_equivalence(cases(4), per_rank, references)
    for name, setups in comm.items():  # the communication model of tools/bench_comm.py, kind by kind
        assert bench_comm.mismatches(setups, [r[("comm", name)] for r in per_rank]) == [], name
    for name in ("resume tp2pp2", "resume tp2dp2"):
        straight, resumed = per_rank[0][name]
        assert [r["iteration"] for r in resumed] == [3, 4]
        assert untimed(straight[2:]) == untimed(resumed)
    assert sorted(os.listdir(tmp_path / "ckpt-a" / "iter_0000002")) == [
        "manifest.json", "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert sorted(os.listdir(tmp_path / "ckpt-b" / "iter_0000004")) == ["manifest.json", "mp_rank_00", "mp_rank_01"]
    assert all(r["other layout"].endswith("(saved with another parallel layout?)") for r in per_rank)


# ----------------------------------------------------------------------------------------- bad layouts

@pytest.mark.parametrize("world,extra,message", [
    (3, ["--tensor-model-parallel-size", "2"],
     "world size 3 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1"),
    (4, ["--pipeline-model-parallel-size", "4", "--num-layers", "2"],
     "--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
    (4, ["--tensor-model-parallel-size", "4", "--num-attention-heads", "2", "--hidden-size", "32"],
     "--num-attention-heads 2 is not divisible by --tensor-model-parallel-size 4"),
    (4, ["--tensor-model-parallel-size", "4", "--ffn-hidden-size", "30"],
     "--ffn-hidden-size 30 is not divisible by --tensor-model-parallel-size 4"),
    (4, ["--global-batch-size", "12", "--micro-batch-size", "4"],
     "--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 4"),
    (1, ["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
])
def test_bad_layouts_fail_in_one_line(tiny_corpus, world, extra, message):
    cfg = parse_args(flags(tiny_corpus, REFERENCE_MICRO_BATCH, *extra))
    with pytest.raises(UserError, match=re.escape(message)):
        validate_layout(cfg, world)


@pytest.mark.slow
def test_bad_layout_stops_before_any_collective(tiny_corpus):
    """Every rank of a launched job exits with code 2, without waiting for the others; rank 0 alone prints
    the one line (test_bad_layouts_fail_in_one_line checks it), so a rank other than 0 exits in silence."""
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_eslm.pretrain",
                           *flags(tiny_corpus, 2, "--tensor-model-parallel-size", "2")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == ""


@pytest.mark.slow
def test_torchrun_launch(tiny_corpus, tmp_path):
    """torchrun's environment is all a run needs: two processes join over env://, train TP2, and rank 0
    alone writes the metrics."""
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "megatron_eslm.pretrain",
                           *flags(tiny_corpus, REFERENCE_MICRO_BATCH, "--tensor-model-parallel-size", "2",
                                  "--train-iters", "2", "--metrics-file", str(metrics))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 2] and records[-1]["split"] == "valid"
