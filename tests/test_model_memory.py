"""Building the model: the numbers of one whole draw, on the training device, and no rank holding the whole.

Values: a weight drawn in blocks of rows (`tensor_parallel/initialization.py`) equals one draw of the whole
bit for bit and leaves its generator in the same state, in float32 and float64, for shapes whose rows are
not a multiple of 16 elements and blocks of a few elements; the shards put together are the whole weight.

Memory: a GPT of a few hundred MB (hidden 768, 16 layers, vocabulary 32768, float32) is built with
`build_model`, as the trainer builds it, on 2 gloo ranks spawned for each layout, so each rank's peak is its
own: the peak resident memory that construction adds (VmHWM, reset before, minus VmRSS before; a tiny model
is built first so that code and allocator warm-up are not counted) stays below 0.6x the whole model's
parameter bytes on every rank, with TP2 (628 MiB, untied) and under ZeRO-3 on DP2 (532 MiB, tied; built
inside deepspeed.zero.Init). Measured: 0.51x both. Drawing each weight whole and sharding it, as before,
peaks at 0.66x on TP2; building the whole model before partitioning it, 1.02x under ZeRO-3.

The ranks run with glibc's mmap threshold fixed at its default (MALLOC_MMAP_THRESHOLD_): by default glibc
raises it to the largest block freed so far, and then keeps the whole weights ZeRO-3 frees after
partitioning them as holes in the heap between the partitions, free for later allocations but resident
(0.58-0.60x in all under ZeRO-3 then; TP2's 1 MiB blocks leave none: 0.50x).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_eslm import parallel_state
from megatron_eslm.config import parse_args
from megatron_eslm.distributed import deepspeed_config
from megatron_eslm.tensor_parallel import initialization
from megatron_eslm.tensor_parallel.initialization import normal_chunk
from megatron_eslm.training.trainer import build_model

pytestmark = pytest.mark.slow  # the whole file (pytest.ini)

WORLD = 2
LIMIT = 0.6  # of the whole model's parameter bytes, per rank
VOCAB = 32768
# layout -> (tensor-parallel size, ZeRO stage or None, model flags). TP2 builds the untied output layer, the
# largest weight and the last one built: drawn whole, it would add its 0.15x to the shards. ZeRO-3 holds the
# whole of the module being built (zero.Init partitions it when its __init__ returns): the tied GPT, whose
# largest weight is built first.
LAYOUTS = {"tp2": (2, None, ["--untie-embeddings-and-output-weights"]), "zero3-dp2": (1, 3, [])}


def whole_draw(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw of the whole weight, as the model drew it before, and the generator's state after it."""
    gen = torch.Generator().manual_seed(11)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen), gen.get_state()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 40, 1000, 1 << 20])
def test_blocks_draw_the_numbers_of_one_draw(monkeypatch, dtype, block):
    monkeypatch.setattr(initialization, "BLOCK_ELEMENTS", block)
    torch.set_default_dtype(dtype)
    try:
        for shape in [(5, 3), (33, 5), (257, 31), (96, 48), (1000, 3), (7, 3, 5), (40,)]:
            want, state = whole_draw(shape, dtype)
            gen = torch.Generator().manual_seed(11)
            got = normal_chunk(shape, 0.02, gen, 0, 1, 0)
            assert got.dtype == dtype and torch.equal(got, want), shape
            assert torch.equal(gen.get_state(), state), shape
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("partition_dim,parts", [(0, 2), (0, 4), (1, 2), (1, 4)])
def test_shards_put_together_are_the_whole_weight(monkeypatch, partition_dim, parts):
    monkeypatch.setattr(initialization, "BLOCK_ELEMENTS", 100)
    want, state = whole_draw((36, 20), torch.float32)
    shards = []
    for index in range(parts):
        gen = torch.Generator().manual_seed(11)
        shards.append(normal_chunk((36, 20), 0.02, gen, partition_dim, parts, index))
        assert torch.equal(gen.get_state(), state)  # the next weight of the layer draws the same numbers
    assert torch.equal(torch.cat(shards, partition_dim), want)


def test_uneven_shards_fail_in_one_line():
    with pytest.raises(ValueError, match=r"cannot split dimension 1 of a \(4, 6\) weight into 4 equal shards"):
        normal_chunk((4, 6), 0.02, torch.Generator(), 1, 4, 0)


def test_parameters_are_made_on_the_training_device():
    """`build_model` makes each parameter on the device it is given (meta: no storage anywhere), drawing
    only the blocks on the CPU."""
    model = build_model(parse_args(model_flags(96, 2, 1, None, [])), 128, torch.device("meta"), None)
    assert {param.device.type for param in model.parameters()} == {"meta"}


# ----------------------------------------------------------------------------------------- memory

def model_flags(hidden: int, layers: int, tp: int, stage: int | None, extra: list[str]) -> list[str]:
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", "12",
            "--seq-length", "1024", "--micro-batch-size", "1", "--global-batch-size", str(WORLD // tp),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--train-data-path", "unused",
            "--tensor-model-parallel-size", str(tp), *(["--zero-stage", str(stage)] if stage else []), *extra]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def construction_peak(cfg, tp: int, stage: int | None) -> tuple[int, int]:
    """(peak bytes building the model added to this process, the whole model's parameter bytes)."""
    ds_config = deepspeed_config.resolve(cfg, WORLD // tp) if stage else None
    try:  # the peak so far, reset to the current size (Linux >= 4.0); else the peak stays, which only adds
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = status_kib("VmRSS")
    model = build_model(cfg, VOCAB, torch.device("cpu"), ds_config)
    peak = (status_kib("VmHWM") - before) * 1024
    return peak, sum(whole_bytes(param, tp) for param in model.parameters())


def whole_bytes(param: torch.nn.Parameter, tp: int) -> int:
    """The bytes of the one-process parameter this rank holds a part of (ZeRO-3 keeps its numel)."""
    shards = tp if getattr(param, "tensor_model_parallel", False) else 1
    return getattr(param, "ds_numel", param.numel()) * param.element_size() * shards


def _rank_main(rank: int, layout: str, tmp: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # zero.Init's device: this process's memory
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=5))

    tp, stage, extra = LAYOUTS[layout]
    parallel_state.initialize_model_parallel(tp, 1)
    if stage:
        import deepspeed  # noqa: F401  (imported before the baseline: not construction)
    construction_peak(parse_args(model_flags(96, 1, tp, stage, extra)), tp, stage)  # warm-up
    peak, whole = construction_peak(parse_args(model_flags(768, 16, tp, stage, extra)), tp, stage)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps({"peak": peak, "whole": whole}))
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_rank_holds_the_whole_model_while_building_it(tmp_path, monkeypatch, layout):
    if LAYOUTS[layout][1] and importlib.util.find_spec("deepspeed") is None:  # found, not imported: the ranks do
        pytest.skip("DeepSpeed is not installed (pip install -e .[deepspeed])")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # glibc's default, kept fixed: see the docstring
    mp.spawn(_rank_main, args=(layout, str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    whole = results[0]["whole"]
    assert whole > 500e6 and all(r["whole"] == whole for r in results)
    ratios = [r["peak"] / whole for r in results]
    print(f"\n{layout}: whole model {whole / 2**20:.0f} MiB, construction peak per rank "
          + ", ".join(f"{r['peak'] / 2**20:.0f} MiB ({ratio:.2f}x)" for r, ratio in zip(results, ratios)))
    assert max(ratios) < LIMIT, f"{layout}: {ratios}"
