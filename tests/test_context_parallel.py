"""Context parallelism against one process, on gloo process groups (CPU), with test_parallel_training's
runs and checks: in float64, the logged numbers (the kept fraction exactly) and every parameter.

Layouts: CP2, and CP2 with selective recompute (2 ranks); CP2xDP2, CP2xTP2 (with sequence parallelism for
Llama) and CP2xPP2 (4 ranks), in the CPU's default all-gather form; the ring (--cp-comm-type p2p) at CP2
(GPT-2 ESLM; Llama dense with keyed dropout and selective recompute), CP4 (Llama ESLM and GPT-2 dense, keyed
dropout) and CP2xTP2+SP (GPT-2 dense, keyed dropout) (`test_ring`).
Selections: dense, ESLM by loss (sketch-exact threshold) and by entropy (exact threshold), the previous
step's threshold (--eslm-threshold-scope previous-step), eslm-is (its draws are keyed by the token's
global position) and Ada-ESLM; GPT-2 and Llama shapes. Besides: the
sharding and attention against their one-process forms, a checkpoint saved under CP2 resumes under CP1
and the other way round, bad sequence lengths fail in one line, and bench_comm's model equals the
counted collectives of CP2 runs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.context_parallel.sharding import chunk_ids, shard_sequence
from megatron_eslm.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_parallel_training as tpt  # noqa: E402  (its runs, spawn and checks)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_comm  # noqa: E402

DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--keyed-dropout"]
SELECTIONS = {
    "dense": ["--selection", "none"],
    "eslm-loss": ["--selection", "eslm", "--eslm-alpha", "0.6", "--eslm-score", "loss"],
    "eslm-entropy-exact": ["--selection", "eslm", "--eslm-alpha", "0.6", "--eslm-score", "entropy",
                           "--eslm-threshold", "exact"],
    "eslm-is": ["--selection", "eslm-is", "--eslm-alpha", "0.6", "--eslm-is-prob", "0.3"],
    "ada-eslm": tpt.LLAMA_SELECTIONS["ada-eslm"],
    # each step's threshold from the previous step's sketch, merged over the data x context group
    "eslm-previous-step": ["--selection", "eslm", "--eslm-alpha", "0.6", "--eslm-threshold-scope", "previous-step"],
    # hidden and attention dropout keyed by position: the one-process reference runs them too
    "eslm-loss-dropout": ["--selection", "eslm", "--eslm-alpha", "0.6", "--eslm-score", "loss", *DROPOUT],
    "dense-dropout": ["--selection", "none", *DROPOUT],
}
MODELS = {"gpt2": [], "llama": tpt.LLAMA_FLAGS}
# name -> (world, tp, pp, cp, sequence parallel)
LAYOUTS = {"cp2": (2, 1, 1, 2, False), "cp2-recompute": (2, 1, 1, 2, False), "cp2dp2": (4, 1, 1, 2, False),
           "cp2tp2": (4, 2, 1, 2, False), "cp2tp2-sp": (4, 2, 1, 2, True), "cp2pp2": (4, 1, 2, 2, False),
           "cp2-ring": (2, 1, 1, 2, False), "cp2-ring-recompute": (2, 1, 1, 2, False), "cp4-ring": (4, 1, 1, 4, False),
           "cp2tp2-sp-ring": (4, 2, 1, 2, True)}
RING = ["--cp-comm-type", "p2p", "--timing-log-level", "2"]  # and log the bytes of each kind of collective
# more flags of a layout: the attention core (and its gathered keys and values) recomputed in the backward;
# the ring (the CPU's default is the all-gather form)
LAYOUT_EXTRA = {"cp2-recompute": ["--recompute-granularity", "selective"], "cp2-ring": RING, "cp4-ring": RING,
                "cp2-ring-recompute": [*RING, "--recompute-granularity", "selective"], "cp2tp2-sp-ring": RING}
# (model, layout, selection) per world size
CASES = {
    2: [(model, "cp2", selection) for model in MODELS for selection in
        ("dense", "eslm-loss", "eslm-entropy-exact", "eslm-is" if model == "gpt2" else "ada-eslm")]
    + [("llama", "cp2-recompute", "eslm-loss"), ("gpt2", "cp2", "eslm-previous-step")],
    4: [*((model, "cp2dp2", selection) for model in MODELS
          for selection in ("dense", "eslm-loss", "eslm-entropy-exact")),
        ("gpt2", "cp2tp2", "eslm-loss"), ("gpt2", "cp2tp2", "eslm-is"),
        ("llama", "cp2tp2-sp", "eslm-entropy-exact"), ("llama", "cp2tp2-sp", "ada-eslm"),
        ("gpt2", "cp2pp2", "dense"), ("llama", "cp2pp2", "eslm-loss")],
}
# the ring (--cp-comm-type p2p), with keyed dropout, per world size
RING_CASES = {
    2: [("gpt2", "cp2-ring", "eslm-loss"), ("llama", "cp2-ring-recompute", "dense-dropout")],
    4: [("llama", "cp4-ring", "eslm-loss-dropout"), ("gpt2", "cp4-ring", "dense-dropout"),
        ("gpt2", "cp2tp2-sp-ring", "dense-dropout")],
}


def run_flags(corpus, micro_batch: int, model: str, selection: str, *extra: str) -> list[str]:
    return tpt.flags(corpus, micro_batch, *MODELS[model], *SELECTIONS[selection], *extra)


def layout_flags(layout: str) -> tuple[int, list[str]]:
    """(micro-batch size, flags) of a layout: DP x micro-batch = the reference's micro-batch."""
    world, tp, pp, cp, sp = LAYOUTS[layout]
    dp = world // (tp * pp * cp)
    return tpt.REFERENCE_MICRO_BATCH // dp, [*tpt.layout_flags(tp, pp, sp), "--context-parallel-size", str(cp),
                                             *LAYOUT_EXTRA.get(layout, [])]


def jobs_for(world: int, corpus, cases: dict = CASES) -> list[tuple]:
    jobs = []
    for model, layout, selection in cases[world]:
        micro, extra = layout_flags(layout)
        argv = run_flags(corpus, micro, model, selection, *extra)
        jobs.append(((model, layout, selection), "train", argv, tpt.DTYPE))
    return jobs


@pytest.fixture(scope="module")
def references(tiny_corpus):
    torch.set_num_threads(1)
    needed = {(model, selection) for table in (CASES, RING_CASES) for cases in table.values()
              for model, _, selection in cases}
    return {(model, selection): tpt.train(run_flags(tiny_corpus, tpt.REFERENCE_MICRO_BATCH, model, selection), tpt.DTYPE)
            for model, selection in sorted(needed)}


# ----------------------------------------------------------------------------------------- one process

def test_sharding_holds_chunks_r_and_2c_minus_1_minus_r():
    x = torch.arange(2 * 16).view(2, 16)
    assert [chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert shard_sequence(x, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15], [16, 17, 18, 19, 28, 29, 30, 31]]
    assert shard_sequence(x, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27]]
    every = torch.cat([shard_sequence(x, 4, r) for r in range(4)], 1).sort(1).values
    assert torch.equal(every, x)


def test_reordering_round_trips():
    """The all-gather's rank order -> sequence order, and the gradient's way back."""
    from megatron_eslm.context_parallel.attention import _to_global_order, _to_rank_order
    cp, full = 3, torch.randn(2, 2, 24, 1, 4)  # [k/v, b, s, groups, d]
    gathered = torch.stack([shard_sequence(full.flatten(0, 1), cp, r).unflatten(0, (2, 2)) for r in range(cp)])
    assert torch.equal(_to_global_order(gathered, cp), full)
    assert torch.equal(_to_rank_order(full, cp), gathered)


@pytest.mark.parametrize("length,cp", [(8, 2), (12, 3)])
def test_chunk_attention_equals_causal_attention(length, cp):
    """Each chunk's lower-right causal attention over the keys before it equals those rows of full causal
    attention (what `context_parallel_attention` computes from the gathered keys and values)."""
    from torch.nn.attention.bias import causal_lower_right
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    chunk = length // (2 * cp)
    for c in range(2 * cp):
        rows = slice(c * chunk, (c + 1) * chunk)
        seen = (c + 1) * chunk
        got = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, :seen], v[:, :, :seen],
                                             attn_mask=causal_lower_right(chunk, seen))
        torch.testing.assert_close(got, want[:, :, rows], rtol=1e-12, atol=1e-12)


def chunk_attention_errors(device: str, dtype: torch.dtype, b: int, heads: int, groups: int, length: int, d: int,
                           cp: int) -> list[float]:
    """Each chunk's lower-right causal attention with grouped queries (`heads` query heads over `groups`
    key/value heads) against full causal attention: the largest errors of the output and of the query,
    key and value gradients (the key/value ones summed over the chunks), each relative to the largest
    magnitude."""
    from megatron_eslm.context_parallel.attention import _lower_right
    wide = torch.promote_types(dtype, torch.float32)  # where the losses and errors are summed
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, heads, length, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, groups, length, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grads_want = torch.autograd.grad(want.to(wide).square().sum(), (q, k, v))
    chunk = length // (2 * cp)
    rows = []
    for c in range(2 * cp):
        seen = (c + 1) * chunk
        rows.append(F.scaled_dot_product_attention(q[:, :, c * chunk:seen], k[:, :, :seen], v[:, :, :seen],
                                                   attn_mask=_lower_right(chunk, seen), enable_gqa=True))
    got = torch.cat(rows, dim=2)
    grads_got = torch.autograd.grad(got.to(wide).square().sum(), (q, k, v))
    return [float((a.to(wide) - b_.to(wide)).abs().max() / b_.to(wide).abs().max())
            for a, b_ in ((got.detach(), want.detach()), *zip(grads_got, grads_want))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash / memory-efficient SDPA)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_chunk_attention_with_grouped_queries(dtype):
    """On CUDA the lower-right mask runs in the fused kernels, with grouped-query attention (the Llama
    shape: head dim 128, 4 queries per key/value head): each chunk's rows and the summed key/value
    gradients equal full causal attention's (bf16 to its rounding)."""
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5  # of the largest magnitude: bf16 rounds each sum
    assert max(chunk_attention_errors("cuda", dtype, b=2, heads=8, groups=2, length=1024, d=128, cp=4)) <= tolerance


def test_chunk_attention_with_grouped_queries_float64():
    """The CUDA test's twin on the CPU in float64, small: the same mask and grouping through the CPU's SDPA
    (an upper-left mask instead errs by 0.9 or more)."""
    errors = chunk_attention_errors("cpu", torch.float64, b=2, heads=4, groups=2, length=16, d=8, cp=2)
    assert max(errors) <= 1e-14, errors  # measured 1.0e-15 (the query gradient), of the largest magnitude


@pytest.mark.parametrize("world,extra,message", [
    (4, ["--context-parallel-size", "2", "--seq-length", "30"],
     "--context-parallel-size 2: --seq-length 30 is not divisible by 2 x 2"),
    (8, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "4", "--sequence-parallel",
         "--seq-length", "36"],
     "--sequence-parallel with --context-parallel-size 2: a rank's 18 tokens of --seq-length 36 are not divisible"),
    (6, ["--context-parallel-size", "4"],
     "world size 6 is not divisible by --tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1 x "
     "--context-parallel-size 4"),
    (2, ["--context-parallel-size", "2", "--hidden-dropout", "0.1"],
     "--context-parallel-size 2 with --hidden-dropout 0.1 and --attention-dropout 0.0 needs --keyed-dropout"),
    (2, ["--context-parallel-size", "2", "--attention-dropout", "0.1", "--keyed-dropout", "--cp-comm-type",
         "all_gather"],
     "--cp-comm-type all_gather with --attention-dropout 0.1: the keyed attention dropout runs in the ring"),
    (2, ["--context-parallel-size", "2", "--selection", "lfr"],
     "--selection lfr does not run with --context-parallel-size 2"),
])
def test_bad_context_parallel_layouts_fail_in_one_line(tiny_corpus, world, extra, message):
    cfg = parse_args(tpt.flags(tiny_corpus, 2, *extra))
    with pytest.raises(UserError, match=re.escape(message)):
        validate_layout(cfg, world)


def test_cp_comm_type_flag(tiny_corpus):
    """--cp-comm-type takes p2p or all_gather; unset, the all-gather form (the ring is opt-in)."""
    from megatron_eslm.config import ParallelConfig
    from megatron_eslm.config.parallel import cp_comm_type
    with pytest.raises(UserError, match=re.escape("--cp-comm-type must be one of p2p, all_gather, got 'ring'")):
        parse_args(tpt.flags(tiny_corpus, 2, "--cp-comm-type", "ring"))
    assert cp_comm_type(ParallelConfig()) == "all_gather"
    assert cp_comm_type(parse_args(tpt.flags(tiny_corpus, 2, "--cp-comm-type", "p2p")).parallel) == "p2p"


# ----------------------------------------------------------------------------------------- ranks

def resume_flags(corpus, save: str) -> list[str]:
    return [*run_flags(corpus, tpt.REFERENCE_MICRO_BATCH, "llama", "eslm-loss"), "--train-iters", "4",
            "--save", save, "--save-interval", "2"]


@pytest.mark.slow
def test_two_ranks(tiny_corpus, references, tmp_path):
    """CP2 equals one process; a CP2 checkpoint resumes under CP1 and a CP1 checkpoint under CP2."""
    cp1_save, cp2_save = str(tmp_path / "cp1"), str(tmp_path / "cp2")
    _, straight = tpt.train_records(resume_flags(tiny_corpus, cp1_save))  # one process: saves at 2 and 4
    Path(cp1_save, "latest_checkpointed_iteration.txt").write_text("2\n")
    cp2 = ["--context-parallel-size", "2"]
    jobs = [*jobs_for(2, tiny_corpus),
            ("cp2 straight", "train", [*resume_flags(tiny_corpus, cp2_save), *cp2], torch.float32),
            ("cp2 from cp1", "train", [*resume_flags(tiny_corpus, str(tmp_path / "unused")), *cp2, "--load", cp1_save],
             torch.float32)]
    setups = bench_comm.tiny(bench_comm.Setup(1, 1, 1, False, cp=2))
    prefix = str(tmp_path / "tokens")
    bench_comm.write_dataset(prefix, setups[0].vocab - 1)
    jobs.append(("comm", "comm", setups, prefix))
    per_rank = tpt.spawn(2, jobs)
    tpt.check_equivalence(CASES[2], per_rank, references)
    assert bench_comm.mismatches(setups, [r["comm"] for r in per_rank]) == []

    # CP2 -> CP1: the one process resumes CP2's checkpoint of iteration 2
    Path(cp2_save, "latest_checkpointed_iteration.txt").write_text("2\n")
    _, from_cp2 = tpt.train_records([*resume_flags(tiny_corpus, str(tmp_path / "unused1")), "--load", cp2_save])
    from_cp1 = per_rank[0]["cp2 from cp1"]["records"]
    assert [r["iteration"] for r in from_cp2] == [r["iteration"] for r in from_cp1] == [3, 4]
    for resumed in (from_cp2, from_cp1):
        for got, want in zip(resumed, straight[2:]):
            assert got["kept_fraction"] == want["kept_fraction"]
            assert max(tpt.relative(got[k], want[k]) for k in tpt.COMPARED) <= 1e-5
    assert sorted(p.name for p in Path(cp2_save, "iter_0000002").iterdir()) == \
        sorted(p.name for p in Path(cp1_save, "iter_0000002").iterdir()) == ["manifest.json", "mp_rank_00"]


@pytest.mark.slow
def test_four_ranks(tiny_corpus, references, tmp_path):
    """CP2xDP2, CP2xTP2 (and with SP), CP2xPP2 equal one process; bench_comm's model of CP2xDP2 and
    CP2xTP2xSP."""
    jobs = jobs_for(4, tiny_corpus)
    comm = {name: bench_comm.tiny(bench_comm.Setup(tp, pp, 4 // (tp * pp * cp), sp, cp=cp))
            for name, (_, tp, pp, cp, sp) in LAYOUTS.items() if name in ("cp2dp2", "cp2tp2-sp", "cp2pp2")}
    prefix = str(tmp_path / "tokens")
    bench_comm.write_dataset(prefix, bench_comm.tiny(bench_comm.Setup())[0].vocab - 1)
    jobs += [(("comm", name), "comm", setups, prefix) for name, setups in comm.items()]
    per_rank = tpt.spawn(4, jobs)
    tpt.check_equivalence(CASES[4], per_rank, references)
    for name, setups in comm.items():
        assert bench_comm.mismatches(setups, [r[("comm", name)] for r in per_rank]) == [], name


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring(tiny_corpus, references, world):
    """The ring (--cp-comm-type p2p) at CP2 and CP4 equals one process (and so the all-gather form, which
    equals it too), GPT-2 and Llama (grouped queries, rope), dense and ESLM, without and with keyed hidden
    and attention dropout (against one process with --keyed-dropout): under selective recompute, and with
    sequence parallelism's shards of the chunks."""
    per_rank = tpt.spawn(world, jobs_for(world, tiny_corpus, RING_CASES))
    tpt.check_equivalence(RING_CASES[world], per_rank, references)
    for model, layout, selection in RING_CASES[world]:
        if selection.endswith("-dropout"):  # dropout was on: the run differs from the one without
            without = references[(model, selection.removesuffix("-dropout"))]["records"]
            assert per_rank[0][(model, layout, selection)]["records"][-1]["lm_loss"] != without[-1]["lm_loss"]
        record = per_rank[0][(model, layout, selection)]["records"][-1]
        if "ring" in layout:  # the keys and values went round the ring, never all-gathered
            assert record["comm_bytes_cp_send"] > 0 and record["comm_bytes_cp_all_gather"] == 0
