"""DeepSpeed ZeRO (`--deepspeed`, `--zero-stage`) against plain data parallelism and one process.

On the session's two gloo ranks (tests/rank_pool.py) with DeepSpeed's CPU accelerator, and once through the
real `deepspeed --module` launcher: ZeRO 1, 2 and 3 on
DP2, dense and ESLM, give the losses, kept fractions, thresholds and gradient norms of plain DP2 and of
one process on the same global batch (float32, 1e-5 relative where 1e-4 is asked); TP2 and PP2 with
ZeRO-1 (PP2 with the tied embedding's two copies), likewise; a DeepSpeed checkpoint resumes exactly
(ZeRO-3's partitioned parameters, the per-stage files of PP2, and ZeRO-1 under --bf16); `deepspeed
--module megatron_eslm.pretrain` itself trains and logs. Under --bf16, ZeRO 1, 2 and 3 accumulate the
micro-batches' gradients in fp32 and train close to the float32 run. ZeRO-3 with full activation recompute
trains like ZeRO-3 without. Context parallelism (CP2) under ZeRO-1 and ZeRO-3 equals one process.
Besides: the config that goes to DeepSpeed, and the one line each bad combination stops with.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_eslm.config import build_parser, parse_args, validate_layout
from megatron_eslm.errors import UserError
from megatron_eslm.generate import load_model
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.training import memory
from test_parallel_training import (COMPARED, GLOBAL_BATCH, LLAMA_FLAGS, REFERENCE_MICRO_BATCH, SELECTIONS, assemble,
                                    flags, layout_flags, micro_batch, relative, train, untimed)

# DeepSpeed takes seconds to import: this process needs it only for a few tests, the ranks run its jobs
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("DeepSpeed is not installed (pip install -e .[deepspeed])", allow_module_level=True)
from test_estimate_memory import DEEPSPEED, deepspeed_argv  # noqa: E402
from rank_pool import run_on_ranks  # noqa: E402

TESTS = Path(__file__).resolve().parent
WORLD = 2
TOLERANCE = 1e-5
COMPARED_SELECTIONS = ("dense", "eslm-loss")
# name -> (tensor, pipeline, zero stage or None for our own data parallelism)
LAYOUTS = {
    "dp2": (1, 1, None), "dp2 zero1": (1, 1, 1), "dp2 zero2": (1, 1, 2), "dp2 zero3": (1, 1, 3),
    "tp2 zero1": (2, 1, 1), "pp2 zero1": (1, 2, 1),
}
# resumed layouts: (tensor, pipeline, zero stage), extra flags (ZeRO-1 under --bf16 is DeepSpeed's BF16_Optimizer)
RESUMES = {"zero3": ((1, 1, 3), []), "pp2-zero1": ((1, 2, 1), []), "zero1-bf16": ((1, 1, 1), ["--bf16"]),
           "cp2-zero1": ((1, 1, 1), ["--context-parallel-size", "2", "--micro-batch-size", "4", "--hidden-dropout",
                                     "0", "--attention-dropout", "0"])}  # ZeRO-1 partitions over the CP pair
# --bf16 (DeepSpeed's bf16: bf16 parameters, fp32 master weights): name -> (tensor, pipeline, sequence
# parallel, zero stage), and the optimizer DeepSpeed picks at each stage. Compared with the float32 run of
# one process to BF16_TOLERANCE relative: a few bf16 roundings of every activation and gradient.
BF16_LAYOUTS = {"dp2 zero1": (1, 1, False, 1), "dp2 zero2": (1, 1, False, 2), "dp2 zero3": (1, 1, False, 3),
                "pp2 zero1": (1, 2, False, 1), "tp2-sp zero1": (2, 1, True, 1)}
BF16_OPTIMIZERS = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
BF16_TOLERANCE = 2e-2
# ZeRO-3 on DP2 built inside zero.Init: name -> extra flags
INITS = {"gpt": [], "gpt bf16": ["--bf16"], "llama": LLAMA_FLAGS}
# The Llama model trained under these ZeRO stages (None: our own data parallelism), ESLM, on DP2
LLAMA_STAGES = (None, 1, 3)
# Full activation recompute under ZeRO-3, whose module hooks must gather the parameters again for it
# Context parallelism under ZeRO: CP2 (DP 1: ZeRO partitions over the data x context ranks) at these stages
CONTEXT_STAGES = (1, 3)
# Checkpoints for the offline reader (megatron_eslm/checkpoint/deepspeed_reader.py), saved by the dense runs of
# these layouts (and of CP2 ZeRO-1): name -> layout
CHECKPOINTS = {"dp2": "dp2", "zero1": "dp2 zero1", "zero2": "dp2 zero2", "zero3": "dp2 zero3"}
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


def run_flags(corpus, tp: int, pp: int, stage: int | None, selection: str, sp: bool = False) -> list[str]:
    zero = [] if stage is None else ["--zero-stage", str(stage)]
    return flags(corpus, micro_batch(WORLD, tp, pp), *SELECTIONS[selection], *layout_flags(tp, pp, sp), *zero)


def launch(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 ...` on this machine's CPUs, with a fresh folder for torch's compiled
    extensions (TMP/extensions)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp / "extensions")}
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    port = str(29500 + os.getpid() % 2000)
    return subprocess.run([launcher, "--num_gpus", str(WORLD), "--master_port", port, *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tiny_corpus, tmp_path_factory):
    """Every job of the table in one call on the session's two ranks; returns the output folder and every
    rank's results."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    saved = {f"{layout} dense": name for name, layout in CHECKPOINTS.items()}
    jobs = [[f"{layout} {selection}", "params" if layout.startswith("dp2") else "train",
             [*run_flags(tiny_corpus, tp, pp, stage, selection),
              *(["--save", str(tmp / f"ckpt {saved[key]}")] if (key := f"{layout} {selection}") in saved else [])]]
            for layout, (tp, pp, stage) in LAYOUTS.items() for selection in COMPARED_SELECTIONS]
    jobs += [[f"resume {name}", "resume", [*run_flags(tiny_corpus, tp, pp, stage, "eslm-loss"), "--hidden-dropout",
                                            "0.1", "--attention-dropout", "0.1", *extra]]
             for name, ((tp, pp, stage), extra) in RESUMES.items()]
    jobs += [[f"{layout} bf16", "bf16", [*run_flags(tiny_corpus, tp, pp, stage, "dense", sp), "--bf16"]]
             for layout, (tp, pp, sp, stage) in BF16_LAYOUTS.items()]
    jobs += [[f"init {name}", "init", [*run_flags(tiny_corpus, 1, 1, 3, "dense"), *extra]]
             for name, extra in INITS.items()]
    jobs += [[f"llama zero{stage}", "train", [*run_flags(tiny_corpus, 1, 1, stage, "eslm-loss"), *LLAMA_FLAGS]]
             for stage in LLAMA_STAGES]
    jobs += [[f"cp2 zero{stage} {selection}", "train",
              [*flags(tiny_corpus, REFERENCE_MICRO_BATCH, *SELECTIONS[selection]), "--context-parallel-size", "2",
               "--zero-stage", str(stage),
               *(["--save", str(tmp / "ckpt cp2 zero1")] if (stage, selection) == (1, "dense") else [])]]
             for stage in CONTEXT_STAGES for selection in COMPARED_SELECTIONS]
    jobs.append(["dp2 zero3 recompute", "train", [*run_flags(tiny_corpus, 1, 1, 3, "eslm-loss"), *RECOMPUTE]])
    jobs.append(["ckpt failed write", "failed save", run_flags(tiny_corpus, 1, 1, 1, "dense")])
    from deepspeed_jobs import run_jobs

    return tmp, run_on_ranks(WORLD, run_jobs, jobs, str(tmp))


@pytest.fixture(scope="module")
def references(tiny_corpus):
    """One process, with the layouts' global micro-batch (DP x micro-batch = REFERENCE_MICRO_BATCH)."""
    torch.set_num_threads(1)
    return {selection: train(flags(tiny_corpus, REFERENCE_MICRO_BATCH, *SELECTIONS[selection]), torch.float32)
            for selection in COMPARED_SELECTIONS}


def difference(result: dict, want: dict) -> float:
    """Largest relative difference of the logged numbers; the kept fractions must be equal."""
    worst = relative(result["val_loss"], want["val_loss"])
    for got, ref in zip(result["records"], want["records"], strict=True):
        assert got["kept_fraction"] == ref["kept_fraction"]
        worst = max(worst, *(relative(got[key], ref[key]) for key in COMPARED))
    return worst


@pytest.mark.slow
def test_zero_stages_equal_plain_data_parallel_and_one_process(launched, references):
    _, (results, _) = launched
    table = {}
    for layout in LAYOUTS:
        for selection in COMPARED_SELECTIONS:
            label = f"{layout} {selection}"
            against_dp = difference(results[label], results[f"dp2 {selection}"])
            against_one = difference(results[label], references[selection])
            table[label] = (against_dp, against_one)
            assert against_dp <= TOLERANCE and against_one <= TOLERANCE, f"{label}: {against_dp:.1e} {against_one:.1e}"
    print("\n" + "\n".join(f"| {k} | {a:.1e} | {b:.1e} |" for k, (a, b) in table.items()))


@pytest.mark.slow
def test_zero_stages_hold_the_parameters_of_one_process(launched, references):
    """Every parameter after the steps, ZeRO 1-3 (and our DP2) against one process, in float32, both ranks
    holding the same gathered parameters. Not in float64 as the TP/PP tests: DeepSpeed keeps float32 master
    weights (measured with float64 parameters: ZeRO-2 7e-7 apart, ZeRO-3 turns them into float32, and
    ZeRO-1 trains them wrongly, 1.6 relative). So float32 round-off bounds the difference, and Adam turns
    it into full-size steps where the gradient is exactly zero, the key part of the QKV bias
    (test_parallel_training's reason for float64): measured at most 6.4e-5 there (our DP2: 5.1e-5) and
    9.2e-7 in every other tensor; the bounds leave about 10x."""
    _, (results, other) = launched
    table = {}
    for layout in (name for name in LAYOUTS if name.startswith("dp2")):
        for selection in COMPARED_SELECTIONS:
            label = f"{layout} {selection}"
            got, want = results[label]["params"], references[selection]["params"]
            assert got.keys() == want.keys(), label
            assert all(torch.equal(got[name], other[label]["params"][name]) for name in got), f"{label}: ranks differ"
            worst = {name: float((got[name] - ref).abs().max() / ref.abs().max()) for name, (ref, _, _) in want.items()}
            table[label] = (max(v for name, v in worst.items() if not name.endswith("query_key_value.bias")),
                            max(v for name, v in worst.items() if name.endswith("query_key_value.bias")))
    print("\n" + "\n".join(f"| {k} | {a:.1e} | {b:.1e} |" for k, (a, b) in table.items()))
    assert all(a <= 1e-5 and b <= 6e-4 for a, b in table.values()), table


@pytest.mark.slow
def test_context_parallel_under_zero_equals_one_process(launched, references):
    """CP2 under ZeRO-1 and ZeRO-3: DeepSpeed reduces and partitions over the data x context ranks (its
    "sequence data parallel" group), the batch stays divided over data parallelism alone."""
    _, (results, _) = launched
    for stage in CONTEXT_STAGES:
        for selection in COMPARED_SELECTIONS:
            worst = difference(results[f"cp2 zero{stage} {selection}"], references[selection])
            assert worst <= TOLERANCE, f"cp2 zero{stage} {selection}: {worst:.1e}"


@pytest.mark.slow
def test_llama_under_zero_equals_plain_data_parallel(launched):
    """The Llama model (rope, RMSNorm, SwiGLU, GQA, untied head, no biases) under ZeRO-1 and ZeRO-3 (built
    inside zero.Init) trains like our own data parallelism, ESLM on the loss."""
    _, (results, _) = launched
    for stage in LLAMA_STAGES[1:]:
        worst = difference(results[f"llama zero{stage}"], results["llama zeroNone"])
        assert worst <= TOLERANCE, f"llama zero{stage}: {worst:.1e}"


@pytest.mark.slow
def test_zero3_with_full_recompute_equals_zero3(launched):
    """torch's non-reentrant checkpoint under ZeRO-3: the recompute in the backward runs the layers' forward
    hooks again, which gather the partitioned parameters it needs; the run equals the one without."""
    _, (results, _) = launched
    worst = difference(results["dp2 zero3 recompute"], results["dp2 zero3 eslm-loss"])
    assert worst <= TOLERANCE, f"zero3 recompute: {worst:.1e}"


@pytest.mark.slow
def test_deepspeed_checkpoints_resume_exactly(launched):
    tmp, (results, _) = launched
    for name in RESUMES:
        straight, resumed = results[f"resume {name}"]
        assert [r["iteration"] for r in resumed] == [3, 4]
        assert untimed(straight[2:]) == untimed(resumed), name
    zero3 = tmp / "resume zero3-ckpt"
    assert (zero3 / "latest").read_text() == "iter_0000004"
    files = sorted(os.listdir(zero3 / "iter_0000002"))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    stages = sorted(f for f in os.listdir(tmp / "resume pp2-zero1-ckpt" / "iter_0000002") if f.endswith("model_states.pt"))
    assert stages == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]  # one file per pipeline stage


@pytest.mark.slow
def test_failed_deepspeed_write_is_one_line_on_every_rank(launched):
    """Rank 1's DeepSpeed write fails (a full disk): it runs DeepSpeed's remaining collectives before the
    outcome exchange, so every rank raises the error (rank 0 repeating it) instead of one rank waiting in the
    exchange while the others wait in DeepSpeed's barrier."""
    _, per_rank = launched
    failed, other = per_rank[1]["ckpt failed write"], per_rank[0]["ckpt failed write"]
    assert failed.startswith("OSError: [Errno 28] No space left on device"), failed
    assert other.startswith("UserError: rank 1: OSError: [Errno 28] No space left on device"), other


@pytest.mark.slow
def test_reader_consolidates_zero_checkpoints(launched):
    """The offline reader's whole tensors of a ZeRO 1-3 checkpoint (weights and AdamW moments, from the
    data-parallel partitions; for CP2 the partitions of the context pair) equal those of the same training
    under our own data parallelism, whose checkpoint holds them whole; the ZeRO-3 one exports to
    transformers with the same logits."""
    from megatron_eslm.checkpoint.reader import read_checkpoint

    tmp, _ = launched
    plain = read_checkpoint(str(tmp / "ckpt dp2"))
    for name in ("zero1", "zero2", "zero3", "cp2 zero1"):
        zero = read_checkpoint(str(tmp / f"ckpt {name}"))
        assert zero.model.keys() == plain.model.keys() and zero.optimizer_step == plain.optimizer_step
        for key, value in plain.model.items():
            torch.testing.assert_close(zero.model[key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(zero.moments[key][moment], plain.moments[key][moment], rtol=1e-4,
                                           atol=1e-9, msg=f"{name} {key} {moment}")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(TESTS.parent / "tools"))
    import export_hf

    export_hf.main(["--load", str(tmp / "ckpt zero3"), "--output", str(tmp / "hf zero3")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf zero3")).eval()
    ours, full = load_model(str(tmp / "ckpt zero3"), None, "cpu")
    tokens = torch.randint(0, full.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours.logits(ours(tokens))[..., :full.vocab_size] - theirs(tokens).logits).abs().max().item()
    assert difference < 1e-5


@pytest.mark.slow
def test_bf16_accumulates_in_fp32_and_trains_like_fp32(launched, references):
    """--bf16 with 3 micro-batches per step: DeepSpeed holds bf16 parameters, and the step's gradients sum
    in fp32 at every stage; the losses and gradient norms stay near the float32 run's, the loss falls,
    and the tensor- and pipeline-shared gradients were summed (the replicas and the tied embedding's two
    copies stay bitwise equal, which they would not if stage 1 summed other tensors than it reduces)."""
    _, ranks = launched
    for layout, (_, _, _, stage) in BF16_LAYOUTS.items():
        result = ranks[0][f"{layout} bf16"]
        assert result["optimizer"] == BF16_OPTIMIZERS[stage], layout
        assert result["param_dtypes"] == {"torch.bfloat16"} and result["accumulators"] == {"torch.float32"}, layout
        records = result["records"]
        assert records[-1]["lm_loss"] < records[0]["lm_loss"], layout
        worst = relative(result["val_loss"], references["dense"]["val_loss"])
        for got, want in zip(records, references["dense"]["records"], strict=True):
            worst = max(worst, relative(got["lm_loss"], want["lm_loss"]), relative(got["grad_norm"], want["grad_norm"]))
        assert worst <= BF16_TOLERANCE, f"{layout}: {worst:.1e}"
        assemble([ranks[rank][f"{layout} bf16"] for rank in range(WORLD)])


@pytest.mark.slow
def test_zero3_builds_the_parameters_of_one_process(launched):
    """Built inside zero.Init (a rank holds 1/DP of every parameter from the start: test_model_memory.py),
    the parameters gathered are bit for bit those of the model built without DeepSpeed (cast to bf16 under
    --bf16, as DeepSpeed casts it), and the optimizer decays the same ones."""
    _, ranks = launched
    for name in INITS:
        for result in (rank[f"init {name}"] for rank in ranks):
            built, plain = result["built"], result["plain"]
            assert built.keys() == plain.keys(), name
            for key, param in built.items():
                assert torch.equal(param, plain[key].to(param.dtype)), f"{name}: {key}"
            assert result["decayed"] == result["plain_decayed"], name


@pytest.mark.slow
def test_deepspeed_module_launch(tiny_corpus, references, tmp_path):
    """What users type: `deepspeed --module megatron_eslm.pretrain` with a ds_config file, ZeRO-2. Nothing
    is compiled: on the CPU accelerator the run skips the shared-memory op of DeepSpeed's comm layer
    (`deepspeed_engine.import_deepspeed`), which training never calls and which took 100 CPU-seconds to build."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"train_batch_size": GLOBAL_BATCH, "zero_optimization": {"stage": 2}}))
    metrics = tmp_path / "metrics.jsonl"
    proc = launch(["--module", "megatron_eslm.pretrain",
                   *run_flags(tiny_corpus, 1, 1, None, "eslm-loss"), "--deepspeed", "--deepspeed_config",
                   str(ds_config), "--metrics-file", str(metrics)], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not (tmp_path / "extensions").exists() and "built successfully" not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["split"] == "valid"
    result = {"records": records[:-1], "val_loss": records[-1]["val_loss"]}
    assert difference(result, references["eslm-loss"]) <= TOLERANCE


# --------------------------------------------------------------------------------------- config

@pytest.mark.slow
def test_engine_holds_the_memory_estimate(tiny_corpus, tmp_path):
    """Parameters, gradient sums and optimizer state on each rank equal the memory estimate's (the larger of
    the two ranks' at ZeRO-2, whose gradient sums hold whole parameters), ZeRO-3's bucket as well
    (test_estimate_memory.py's DeepSpeed cases: here, where the ranks already run DeepSpeed)."""
    jobs = [[name, deepspeed_argv(tiny_corpus, tmp_path, name)] for name in DEEPSPEED]
    from deepspeed_memory_jobs import held_bytes

    ranks = run_on_ranks(2, held_bytes, jobs)
    for name, argv in jobs:
        cfg = parse_args(argv)
        vocab = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, cfg.data.vocab_size).vocab_size
        states = memory.estimate(cfg, vocab, 2, memory.CPU).largest.states
        got = {key: max(rank[name][key] for rank in ranks) for key in ranks[0][name]}
        stage = DEEPSPEED[name][1]["stage"]
        assert got == {"parameters": states.parameters, "gradients": states.gradients,
                       "optimizer": states.optimizer, "buffers": states.buffers if stage == 3 else 0}, name


def test_reader_names_a_folder_without_deepspeed_states(tmp_path):
    from megatron_eslm.checkpoint.deepspeed_reader import read_deepspeed_shards
    with pytest.raises(UserError, match="no DeepSpeed model states of model-parallel rank 0"):
        read_deepspeed_shards(str(tmp_path))


def test_flags_are_deepspeeds_own():
    """--deepspeed and --deepspeed_config parse as DeepSpeed's `add_config_arguments` defines them."""
    import deepspeed

    theirs = {a.dest: a for a in deepspeed.add_config_arguments(argparse.ArgumentParser())._actions}
    ours = {a.dest: a for a in build_parser()._actions}
    for dest in ("deepspeed", "deepspeed_config"):
        assert "--" + dest in ours[dest].option_strings
        assert (ours[dest].default, ours[dest].type, ours[dest].nargs, ours[dest].const) == \
            (theirs[dest].default, theirs[dest].type, theirs[dest].nargs, theirs[dest].const)


def resolve(corpus, extra: list[str], world: int = 2) -> dict:
    from megatron_eslm.distributed import deepspeed_config
    cfg = parse_args(flags(corpus, 2, *extra))
    return deepspeed_config.resolve(cfg, validate_layout(cfg, world))


def test_config_from_flags(tiny_corpus):
    ds = resolve(tiny_corpus, ["--zero-stage", "2", "--clip-grad", "0.5", "--bf16"])
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (GLOBAL_BATCH, 2, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # DeepSpeed's default would be bf16


@pytest.mark.parametrize("accum", ["auto", "float32"])
def test_config_file_accumulates_in_fp32(tiny_corpus, tmp_path, accum):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": accum}}))
    ds = resolve(tiny_corpus, ["--deepspeed", "--deepspeed_config", str(path), "--bf16"])
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_config_file_filled_and_stage_overridden(tiny_corpus, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    ds = resolve(tiny_corpus, ["--deepspeed", "--deepspeed_config", str(path)])
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["memory_efficient_linear"] is False  # zero.Init leaves F.linear alone
    ds = resolve(tiny_corpus, ["--deepspeed", "--deepspeed_config", str(path), "--zero-stage", "1"])
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("content,extra,message", [
    ({"gradient_accumulation_steps": 2}, [], "gradient_accumulation_steps is 2 but --global-batch-size / "
     "(--micro-batch-size x data-parallel size 2) gives 3; make them agree"),
    ({"train_batch_size": 16}, [], "train_batch_size is 16 but --global-batch-size gives 12"),
    ({"gradient_clipping": 0.3}, [], "gradient_clipping is 0.3 but --clip-grad gives 1.0"),
    ({"bf16": {"enabled": True}}, [], "bf16.enabled is True but --bf16 is off"),
    ({"fp16": {"enabled": True}}, [], "fp16 is not supported; use --bf16"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, ["--bf16"], "data_types.grad_accum_dtype is bf16, but gradients "
     "must accumulate in fp32 over micro-batches"),
    ({"optimizer": {"type": "Adam"}}, [], "remove the 'optimizer' block"),
    ({"zero_optimization": {"stage": 0}}, [], "zero_optimization.stage must be 1, 2 or 3, got 0"),
    ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, [], "overlap_comm must be false with stage 1"),
    ({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}, [],
     "zero_optimization.memory_efficient_linear must be false: zero.Init would replace torch.nn.functional.linear"),
    ({}, ["--zero-stage", "2", "--pipeline-model-parallel-size", "2"],
     "ZeRO stage 2 cannot run with --pipeline-model-parallel-size 2"),
    ({}, ["--zero-stage", "3", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "ZeRO stage 3 cannot run with --sequence-parallel"),
])
def test_bad_deepspeed_configs_fail_in_one_line(tiny_corpus, tmp_path, content, extra, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **content}))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve(tiny_corpus, ["--deepspeed", "--deepspeed_config", str(path), *extra])


@pytest.mark.parametrize("extra,message", [
    (["--deepspeed_config", "ds.json"], "--deepspeed_config needs --deepspeed (or --zero-stage)"),
    (["--deepspeed", "--deepspeed_config", "/nonexistent/ds.json"], "--deepspeed_config /nonexistent/ds.json: file not found"),
    (["--zero-stage", "4"], "--zero-stage must be one of 1, 2, 3, got 4"),
])
def test_bad_deepspeed_flags_fail_in_one_line(tiny_corpus, extra, message):
    with pytest.raises(UserError) as err:
        parse_args(flags(tiny_corpus, 2, *extra))
    assert str(err.value).startswith(message)


def test_cluster_check_on_two_gloo_ranks():
    """tools/cluster_check.py at a tiny size: the all-reduce's and every ring link's numbers, on rank 0. (Here
    rather than with the other tools' tests: this file's jobs have started the two-rank pool already.)"""
    import cluster_check  # tools/ is on the path (test_parallel_training)
    per_rank = run_on_ranks(WORLD, cluster_check.check, 0.2, 4096)
    report = per_rank[0]
    assert report["links"] == per_rank[1]["links"]
    assert report["all_reduce"]["backend"] == "gloo" and report["all_reduce"]["bytes"] == 4096
    assert all(latency > 0 and bandwidth > 0 for _, latency, bandwidth in report["links"])
    lines = report["text"].splitlines()
    assert lines[0] == "cluster check: 2 ranks on 1 host(s); default group gloo, host group gloo"
    assert lines[1].startswith("all-reduce (gloo, 4096 bytes, ") and "busbw" in lines[1]
    assert lines[4].startswith("rank 0 (") and "-> rank 1 (" in lines[4] and lines[6].startswith("slowest link: ")
