"""Activation recompute (--recompute-granularity full with --recompute-method uniform or block, and selective)
trains exactly like the run without it, with dropout on (hidden and attention 0.1), so the recomputed
forward must draw the first one's masks from every stream: torch's default generator and the tensor-parallel
tracker's.

Each variant against no recompute on the same layout (one process, TP2 with sequence parallelism, PP2 with
1F1B, whose stages free the outputs they sent), dense and ESLM, in float64: the per-step losses, kept
fractions, thresholds and gradient norms, and every parameter after the steps, EXACTLY equal (the recompute
replays the same kernels on the same inputs; tests/test_parallel_training.py's harness and measures; the
layouts against one process are its business). 6 layers: uniform 2 is groups of 2 (on a PP2 stage of 3 layers, 2 and a shorter 1),
block 2 the first 2 layers of each stage.

Besides: under --bf16 too (the recompute runs under the forward's autocast); the recompute really runs (the
attention core twice per layer) and does not replay the LM head or its scoring pass; without the
tracker's replay the runs differ; the state dict is the same (a checkpoint saved without recompute resumes
with it exactly); fewer bytes are saved for the backward; the FLOPs model counts the recomputed matmuls;
no host sync is added; bad flag combinations stop in one line; every other selection policy (random,
Ada-ESLM, LFR, entropy scores, the exact and previous-step thresholds, eslm-kd, rho1) equals no
recompute on one process under full recompute. ZeRO-3 with full recompute:
tests/test_deepspeed.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
import torch

from megatron_eslm.config import ModelConfig, finalize_model, parse_args, validate_layout
from megatron_eslm.errors import UserError
from megatron_eslm.eslm.policies import ESLMPolicy
from megatron_eslm.model import gpt, transformer
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.tensor_parallel import random as tp_random
from megatron_eslm.tensor_parallel.random import set_random_seeds
from megatron_eslm.training.flops import micro_batch_flops, recompute_flops_per_token
from megatron_eslm.training.recompute import LayerGroup, layer_groups
from megatron_eslm.training.trainer import Trainer
from test_host_syncs import POLICIES, assert_within_budget, count_step_syncs
from test_llama import LLAMA, MatmulFlops
from helpers import flags as helper_flags, run
from test_parallel_training import (COMPARED, GLOBAL_BATCH, assemble, dropout_flags, layout_flags, record_difference, spawn,
                                    train, untimed)

LAYERS = 6
VARIANTS = {
    "none": [],
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
    "selective": ["--recompute-granularity", "selective"],
}
SELECTIONS = {"dense": ["--selection", "none"], "eslm": ["--selection", "eslm", "--eslm-alpha", "0.6"]}
LAYOUTS = {"tp2-sp": (2, 1, True), "pp2": (1, 2, False)}  # spawned on 2 ranks
DTYPES = (torch.float64,)  # float32 passed its 1e-6: float64's exact equality is the stricter check
LOGGED_TOLERANCE, PARAMETER_TOLERANCE = 0.0, 0.0  # measured: every variant, policy and layout is bit-exact
BF16_TOLERANCE = 1e-6  # bf16 runs: the logged numbers and parameters (relative)
TOKENS_PER_STEP = GLOBAL_BATCH * 32  # flags' --seq-length
SHAPES = {"gpt2": {}, "llama": {**LLAMA, "ffn_hidden_size": 48}}


def run_flags(corpus, variant: str, selection: str, *extra: str) -> list[str]:
    return [*dropout_flags(corpus, "--num-layers", str(LAYERS), *SELECTIONS[selection], *extra), *VARIANTS[variant]]


def cases() -> list[tuple[str, str, torch.dtype]]:
    return [(variant, selection, dtype) for variant in VARIANTS for selection in SELECTIONS for dtype in DTYPES]


def parameter_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest max|difference| / max|want| over the (assembled) parameters."""
    assert got.keys() == want.keys()
    return max(float((got[name] - want[name]).abs().max() / want[name].abs().max()) for name in want)


def check_against_none(corpus, results: dict[tuple, list[dict]], label: str, stages: int = 1) -> None:
    """`results[(variant, selection, dtype)]`: every rank's `train` result on one layout of `stages`
    pipeline stages; the logged numbers and the parameters. The logged FLOPs: the dense baseline's
    unchanged, the recompute's added."""
    for variant, selection, dtype in cases():
        if variant == "none":
            continue
        name = f"{label} {variant} {selection}"
        got, want = results[(variant, selection, dtype)][0], results[("none", selection, dtype)][0]
        logged = record_difference(got, want)
        recomputed = recompute_flops_per_token(parse_args(run_flags(corpus, variant, selection)).model, stages)
        for a, b in zip(got["records"], want["records"]):
            assert a["dense_flops"] == b["dense_flops"], name
            assert a["executed_flops"] - b["executed_flops"] == pytest.approx(recomputed * TOKENS_PER_STEP, rel=1e-9)
        params = parameter_difference(assemble(results[(variant, selection, dtype)]),
                                      assemble(results[("none", selection, dtype)]))
        print(f"| {name} | {logged:.1e} | {params:.1e} |")
        assert logged <= LOGGED_TOLERANCE, f"{name}: logged numbers differ by {logged:.2e}"
        assert params <= PARAMETER_TOLERANCE, f"{name}: float64 parameters differ by {params:.2e}"


@pytest.mark.slow
def test_one_process_equals_no_recompute(tiny_corpus):
    """And dropout was on: the same run without it differs."""
    torch.set_num_threads(1)
    results = {case: [train(run_flags(tiny_corpus, case[0], case[1]), case[2])] for case in cases()}
    check_against_none(tiny_corpus, results, "one process")
    no_dropout = train([*run_flags(tiny_corpus, "none", "dense"), "--hidden-dropout", "0", "--attention-dropout", "0"],
                       *DTYPES)
    with_dropout = results[("none", "dense", *DTYPES)][0]
    assert no_dropout["records"][-1]["lm_loss"] != with_dropout["records"][-1]["lm_loss"]


@pytest.mark.slow
def test_bf16_recompute_runs_under_the_forwards_autocast(tiny_corpus):
    """Under --bf16 the recompute must compute in bf16 as the forward did, or the gradients would differ."""
    torch.set_num_threads(1)
    runs = {variant: train(run_flags(tiny_corpus, variant, "eslm", "--bf16"), torch.float32) for variant in VARIANTS}
    for variant, result in runs.items():
        assert record_difference(result, runs["none"]) <= BF16_TOLERANCE, variant
        assert parameter_difference(assemble([result]), assemble([runs["none"]])) <= BF16_TOLERANCE, variant


@pytest.mark.slow
def test_two_ranks_equal_no_recompute(tiny_corpus, tmp_path):
    """TP2 with sequence parallelism (the tracker's streams draw the attention and sequence-shard dropout)
    and PP2 under 1F1B, in one job list."""
    jobs = [((layout, *case), "train", run_flags(tiny_corpus, case[0], case[1], *layout_flags(tp, pp, sp)), case[2])
            for layout, (tp, pp, sp) in LAYOUTS.items() for case in cases()]
    per_rank = spawn(2, jobs)
    for layout in LAYOUTS:
        check_against_none(tiny_corpus, {case: [r[(layout, *case)] for r in per_rank] for case in cases()}, layout,
                           LAYOUTS[layout][1])


# Every other policy, the frozen-model ones included (their teacher or reference runs without gradients, so
# outside any recomputed region): full recompute, which replays the most, against none on one process.
OTHER_POLICIES = {name: argv for name, argv in POLICIES.items() if name not in ("dense", "eslm-sketch-exact")}


@pytest.fixture(scope="module")
def frozen_checkpoint(tiny_corpus, tmp_path_factory) -> str:
    """A one-step checkpoint of this file's model: the teacher of eslm-kd and the reference of rho1."""
    save = str(tmp_path_factory.mktemp("frozen") / "ckpt")
    run([*dropout_flags(tiny_corpus, "--num-layers", str(LAYERS), "--selection", "none"), "--train-iters", "1",
         "--lr-warmup-iters", "0", "--save", save])
    return save


@pytest.mark.slow
@pytest.mark.parametrize("policy", [*OTHER_POLICIES, "eslm-kd", "rho1"])
def test_every_policy_equals_no_recompute(tiny_corpus, frozen_checkpoint, policy):
    """Logged numbers and parameters exactly equal, in float64, dropout on (the policy's own
    passes, e.g. LFR's table or Ada-ESLM's alpha, see the same scores with and without recompute)."""
    torch.set_num_threads(1)
    selection = OTHER_POLICIES.get(policy) or ["--selection", policy, "--teacher-load" if policy == "eslm-kd"
                                                else "--reference-load", frozen_checkpoint]
    results = {variant: train([*dropout_flags(tiny_corpus, "--num-layers", str(LAYERS), *selection),
                               *VARIANTS[variant]], torch.float64)
               for variant in ("none", "full-uniform")}
    logged = record_difference(results["full-uniform"], results["none"])
    params = parameter_difference(assemble([results["full-uniform"]]), assemble([results["none"]]))
    assert logged <= LOGGED_TOLERANCE and params <= PARAMETER_TOLERANCE, (policy, logged, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA RNG replay (philox dropout in the fused "
                    "attention kernels) needs a GPU")
@pytest.mark.parametrize("variant", ["full-uniform", "selective"])
def test_cuda_recompute_equals_none(tiny_corpus, variant):
    """On a GPU in bf16 with dropout on (tools/device_check.sh runs this): torch restores the CUDA generator
    and the tracker's CUDA streams for the recompute, so the fused attention kernels draw the same masks."""
    runs = {name: train(run_flags(tiny_corpus, name, "eslm", "--bf16"), torch.float32) for name in ("none", variant)}
    assert record_difference(runs[variant], runs["none"]) <= BF16_TOLERANCE
    assert parameter_difference(assemble([runs[variant]]), assemble([runs["none"]])) <= BF16_TOLERANCE


# ----------------------------------------------------------------------------------------- what runs

@contextlib.contextmanager
def counted(monkeypatch, owner, name: str):
    """Counts the calls of `owner.name` made with gradients enabled (training, not evaluation)."""
    calls = {"n": 0}
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    yield calls
    monkeypatch.setattr(owner, name, original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_recompute_runs_and_the_head_runs_once(tiny_corpus, monkeypatch, variant):
    """The attention core runs twice per layer and micro-batch wherever a layer is recomputed; the LM head's
    scoring pass (with ESLM's selection) once per micro-batch whatever the variant."""
    torch.set_num_threads(1)
    trainer = Trainer(parse_args(run_flags(tiny_corpus, variant, "eslm", "--train-iters", "2")), log=lambda *a: None)
    with counted(monkeypatch, gpt, "selective_lm_head_loss") as head, \
            counted(monkeypatch, transformer.CoreAttention, "forward") as core:
        trainer.train()
    trainer.close()
    micro_batches = 2 * trainer.num_micro_batches
    recomputed = {"none": 0, "full-uniform": LAYERS, "full-block": 2, "selective": LAYERS}[variant]
    assert head["n"] == micro_batches
    assert core["n"] == (LAYERS + recomputed) * micro_batches


def test_the_tracker_replay_is_what_makes_it_exact(tiny_corpus, monkeypatch):
    """Without replaying the tracker's streams the recomputed attention dropout draws other masks (torch's
    own `preserve_rng_state` restores only the default generators)."""
    torch.set_num_threads(1)
    argv = run_flags(tiny_corpus, "selective", "dense", "--train-iters", "1")
    replayed = train(argv, torch.float32)
    monkeypatch.setattr(tp_random, "_replay_contexts", lambda: (contextlib.nullcontext(), contextlib.nullcontext()))
    assert untimed(train(argv, torch.float32)["records"]) != untimed(replayed["records"])


def tiny_model(variant: str, **overrides) -> GPTModel:
    values = {**dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.1,
                     attention_dropout=0.1), **overrides}
    flags = dict(zip(VARIANTS[variant][::2], VARIANTS[variant][1::2]))
    layers = flags.get("--recompute-num-layers")
    values.update(recompute_granularity=flags.get("--recompute-granularity"),
                  recompute_method=flags.get("--recompute-method"),
                  recompute_num_layers=None if layers is None else int(layers))
    set_random_seeds(3, torch.device("cpu"))
    return GPTModel(finalize_model(ModelConfig(**values)), 64, init_seed=1)


@pytest.mark.parametrize("variant", ["full-uniform", "selective"])
def test_a_retained_graph_recomputes_again(variant):
    """A second backward through a graph kept with retain_graph recomputes again, with the same masks: the
    gradients double exactly (the replay context is entered once per recompute)."""
    model = tiny_model(variant)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = model(tokens)
    hidden.square().sum().backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    hidden.square().sum().backward()
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(model.parameters(), once))


def test_checkpoint_saved_without_recompute_resumes_with_it(tiny_corpus, tmp_path):
    """The state dict is the same, so a run saved without recompute resumes with it and goes on as it
    would have without (tests/helpers.py's 6 steps, dropout on, resumed from step 3)."""
    save = str(tmp_path / "ckpt")
    _, straight = run(helper_flags(tiny_corpus, "--save", save, "--save-interval", "3"))
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3\n")
    _, resumed = run(helper_flags(tiny_corpus, "--load", save, "--recompute-granularity", "full", "--recompute-method",
                                  "uniform", "--recompute-num-layers", "1"))
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [{k: r[k] for k in COMPARED} for r in straight[3:]] == [{k: r[k] for k in COMPARED} for r in resumed]


def test_state_dict_and_saved_bytes():
    """Same state dict keys (checkpoints load with or without recompute); each variant saves fewer
    activation bytes for the backward than none (selective: the [b, heads, s, s] attention probabilities)."""
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    keys, saved = {}, {}
    for variant in VARIANTS:
        model = tiny_model(variant)
        keys[variant] = list(model.state_dict())
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model(tokens)
        hidden.square().mean().backward()
        saved[variant] = sum(storages.values())
    assert all(k == keys["none"] for k in keys.values())
    assert all(saved[variant] < saved["none"] for variant in VARIANTS if variant != "none"), saved
    assert saved["full-uniform"] < saved["full-block"], saved  # every layer against the first 2 of 4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", ["gpt2", "llama"])
@pytest.mark.parametrize("hidden_dropout", [0.0, 0.1])
def test_flops_count_the_recomputed_forward(variant, shape, hidden_dropout):
    """micro_batch_flops' executed FLOPs equal the matmuls a training micro-batch runs, recompute included
    (tests/test_llama.py's counter; without hidden dropout torch skips each recomputed group's last
    down-projection); the dense baseline leaves recompute out. Attention dropout 0: the CPU's math kernel,
    which runs under attention dropout, saves nothing that needs AV's output, so torch would skip that too."""
    model = tiny_model(variant, hidden_dropout=hidden_dropout, attention_dropout=0.0, **SHAPES[shape])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with MatmulFlops() as step:
        out = model.loss(model(ids), ids, ESLMPolicy(0.5, "loss"))
        out.loss.backward()
    kept = int(out.selection.kept.sum())
    flops = micro_batch_flops(model.cfg, 64, ids.numel(), ids.numel(), kept, True)
    assert step.flops == flops.executed
    without = dataclasses.replace(model.cfg, recompute_granularity=None, recompute_method=None,
                                  recompute_num_layers=None)
    assert flops.dense == micro_batch_flops(without, 64, ids.numel(), ids.numel(), kept, True).dense


@pytest.mark.parametrize("variant", ["full-uniform", "selective"])
@pytest.mark.parametrize("policy", ["dense", "eslm-sketch"])
def test_no_host_syncs_added(tiny_corpus, variant, policy):
    syncs, micro_batches = count_step_syncs(run_flags(tiny_corpus, variant, "dense", "--log-interval", "100",
                                                      *POLICIES[policy]))
    assert_within_budget(policy, syncs, micro_batches)


# ----------------------------------------------------------------------------------------- config

def test_layer_groups():
    def groups(method: str, n: int, layers: int) -> list[tuple[list[int], bool]]:
        cfg = ModelConfig(recompute_granularity="full", recompute_method=method, recompute_num_layers=n)
        return [(list(g.layers), g.recomputed) for g in layer_groups(cfg, layers)]

    assert groups("uniform", 2, 5) == [([0, 1], True), ([2, 3], True), ([4], True)]
    assert groups("uniform", 3, 3) == [([0, 1, 2], True)]
    assert groups("block", 2, 5) == [([0], True), ([1], True), ([2, 3, 4], False)]
    assert groups("block", 3, 3) == [([0], True), ([1], True), ([2], True)]
    assert layer_groups(ModelConfig(recompute_granularity="selective"), 4) == (LayerGroup(range(4), False),)


@pytest.mark.parametrize("extra,message", [
    (["--recompute-granularity", "everything"],
     "--recompute-granularity must be one of full, selective, got 'everything'"),
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method (uniform or block)"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform"],
     "--recompute-granularity full needs --recompute-num-layers"),
    (["--recompute-granularity", "full", "--recompute-method", "some", "--recompute-num-layers", "1"],
     "--recompute-method must be one of uniform, block, got 'some'"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "0"],
     "--recompute-num-layers must be positive, got 0"),
    (["--recompute-granularity", "selective", "--recompute-method", "uniform"],
     "--recompute-method is not supported with --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-num-layers is not supported with --recompute-granularity selective"),
    (["--recompute-method", "block"], "--recompute-method needs --recompute-granularity full"),
    (["--recompute-num-layers", "2"], "--recompute-num-layers needs --recompute-granularity full"),
])
def test_bad_flags_fail_in_one_line(tiny_corpus, extra, message):
    with pytest.raises(UserError) as err:
        parse_args(run_flags(tiny_corpus, "none", "dense", *extra))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["uniform", "block"])
def test_more_layers_than_a_stage_fail_in_one_line(tiny_corpus, method):
    cfg = parse_args(run_flags(tiny_corpus, "none", "dense", "--recompute-granularity", "full", "--recompute-method",
                               method, "--recompute-num-layers", "4", "--pipeline-model-parallel-size", "2"))
    with pytest.raises(UserError, match=re.escape("--recompute-num-layers 4 exceeds the 3 layers of a pipeline stage")):
        validate_layout(cfg, 2)
    fits = parse_args(run_flags(tiny_corpus, "full-uniform", "dense", "--pipeline-model-parallel-size", "2"))
    assert validate_layout(fits, 2) == 1
