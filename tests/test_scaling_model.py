"""tools/scaling_model.py: its communication bytes are the code's (a real gloo run of TP2, PP2 and DP2,
dense and ESLM, counted by megatron_eslm.distributed.collectives through bench_comm's machinery), its
projection moves the right way on simple cases, and `fit` recovers the rates records were made from."""
from __future__ import annotations

import datetime
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_eslm.config import ModelConfig, parse_args
from megatron_eslm.config.model import finalize_model
from megatron_eslm.distributed import collectives as c
from megatron_eslm.training.flops import micro_batch_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_comm  # noqa: E402
import scaling_model as sm  # noqa: E402

LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}


def _count_rank(rank: int, tmp: str, setups: list[bench_comm.Setup]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.save(bench_comm.count_bytes(setups, f"{tmp}/tokens"), f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_comm_bytes_equal_counted(tmp_path):
    """The points are built from the parsed flags of the runs (Point.from_config), not from bench_comm's
    Setup, so the layout, model, vocabulary padding and threshold settings are carried over as a study
    would carry them."""
    setups = [s for layout in LAYOUTS.values() for s in bench_comm.tiny(bench_comm.Setup(*layout))]
    prefix = str(tmp_path / "tokens")
    bench_comm.write_dataset(prefix, setups[0].vocab - 1)
    mp.spawn(_count_rank, args=(str(tmp_path), setups), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for i, setup in enumerate(setups):
        cfg = parse_args(bench_comm.check_flags(setup, prefix))
        point = sm.Point.from_config(cfg, 2, setup.vocab)  # NullTokenizer: --vocab-size + 1 (end of document)
        for rank, results in enumerate(per_rank):
            stage, counted = results[i]
            predicted = sm.comm_bytes(point, stage)
            assert {k: predicted[k] for k in c.KINDS} == {k: counted[k] for k in c.KINDS}, (setup, rank)
            assert sum(counted.values()) > 0


def model(layers: int = 24, hidden: int = 2048) -> ModelConfig:
    return finalize_model(ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=16, seq_length=2048))


def point(world: int, tp: int = 1, pp: int = 1, **kw) -> sm.Point:
    defaults = dict(zero_stage=0, micro_batch_size=2, global_batch_size=256, selection="none", model=model(),
                    vocab_size=50304)
    return sm.Point(world, tp, pp, world // (tp * pp), **{**defaults, **kw})


CALIBRATION = sm.Calibration(seconds_per_flop=1 / 400e12, data_seconds_per_micro_batch=1e-4,
                             optimizer_seconds_per_parameter=1e-10, threshold_seconds_per_row=1e-8, points=())
H100 = sm.NETWORKS["h100-nvlink-ib"]


def test_projection_is_sane():
    one, eight = sm.predict(point(8), CALIBRATION, H100), sm.predict(point(64), CALIBRATION, H100)
    assert eight["compute_ms"] == pytest.approx(one["compute_ms"] / 8)  # 8x DP: 1/8 of the micro-batches
    assert eight["dp_comm_ms"] > one["dp_comm_ms"] > 0  # the all-reduce leaves the node
    assert one["step_ms"] == pytest.approx(sum(v for k, v in one.items() if k.endswith("_ms") and k not in (
        "step_ms", "forward_backward_ms", "grads_reduce_ms")))
    # TP 8 inside a node against TP 8 split over two 4-GPU nodes: the same bytes, a slower link
    node4 = replace(H100, gpus_per_node=4)
    intra, inter = (sm.predict(point(8, tp=8), CALIBRATION, net)["tp_comm_ms"] for net in (H100, node4))
    assert inter > intra > 0
    # PP: the bubble is (PP - 1) / micro-batches of the stage time; more micro-batches shrink its share
    few, many = (sm.predict(point(4, pp=4, global_batch_size=gb), CALIBRATION, H100) for gb in (16, 256))
    assert few["bubble_ms"] / few["compute_ms"] > many["bubble_ms"] / many["compute_ms"] > 0
    # overlapping the reduction hides part of it; ZeRO-3's parameter gathers cost more than ZeRO-1
    dp = point(64)
    assert (sm.predict(replace(dp, overlap_grad_reduce=True), CALIBRATION, H100)["dp_comm_ms"]
            < sm.predict(dp, CALIBRATION, H100)["dp_comm_ms"])
    assert (sm.predict(replace(dp, zero_stage=3), CALIBRATION, H100)["dp_comm_ms"]
            > sm.predict(replace(dp, zero_stage=1), CALIBRATION, H100)["dp_comm_ms"])
    # ESLM: a threshold and a cheaper head backward than dense training's 6hV-per-row unfused one at TP 2
    dense, eslm = (sm.predict(point(2, tp=2, selection=sel), CALIBRATION, H100) for sel in ("none", "eslm:0.5"))
    assert eslm["compute_ms"] < dense["compute_ms"] and eslm["threshold_ms"] > dense["threshold_ms"] == 0


def synthetic_record(p: sm.Point, network: sm.Network) -> dict:
    """The phase times `predict` gives under CALIBRATION, as a metrics record (compute alone in
    forward_backward: no communication there in the points fitted)."""
    ms = sm.predict(p, CALIBRATION, network)
    return {"time_forward_backward_ms": ms["compute_ms"], "time_data_ms": ms["data_ms"],
            "time_optimizer_ms": ms["optimizer_ms"], "time_threshold_ms": ms["threshold_ms"],
            "time_threshold_comm_ms": 0.0, "executed_flops": sm.rank_flops(p) * p.tp * p.dp}


def test_fit_recovers_rates():
    """Records made from known rates give them back: from the one-rank points (a TP2 point calibrates
    nothing), and from a 2-rank DP point oversubscribing one compute slot, whose 2x is divided out."""
    net = replace(sm.NETWORKS["cpu-gloo"], compute_slots=1)
    small = dict(model=model(2, 64), vocab_size=256, micro_batch_size=2, global_batch_size=8)
    points = [point(1, **small), point(1, **small, selection="eslm:0.5"), point(2, tp=2, **small)]
    fitted = sm.fit([(p, synthetic_record(p, net)) for p in points], net)
    assert fitted.points == ("world 1 tp1pp1dp1 none", "world 1 tp1pp1dp1 eslm:0.5")
    two = point(2, **small)
    assert sm.slowdown(two, net) == 2
    for calibration in (fitted, sm.fit([(two, synthetic_record(two, net))], net)):
        for field in ("seconds_per_flop", "data_seconds_per_micro_batch", "optimizer_seconds_per_parameter"):
            assert getattr(calibration, field) == pytest.approx(getattr(CALIBRATION, field), rel=1e-9), field
    assert fitted.threshold_seconds_per_row == pytest.approx(CALIBRATION.threshold_seconds_per_row, rel=1e-9)


@pytest.mark.parametrize("tp,pp,selection,recompute", [(1, 1, "none", False), (2, 1, "none", False),
                                                      (1, 2, "eslm:0.5", False), (2, 1, "eslm:0.5", True)])
def test_stage_flops_add_up_to_the_trainers_count(tp, pp, selection, recompute):
    """Every rank's executed FLOPs together are what the trainer logs (`flops.micro_batch_flops` over the
    step's tokens; no process group: one pipeline stage, hence recompute only without PP)."""
    cfg = model(4, 64)
    if recompute:
        cfg = replace(cfg, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    p = point(tp * pp * 2, tp, pp, model=cfg, vocab_size=256, global_batch_size=16, selection=selection)
    s = p.setup()
    tokens = s.tokens * s.micro_batches * p.dp
    kept = s.kept_rows * s.micro_batches * p.dp
    logged = micro_batch_flops(cfg, p.vocab_size, tokens, tokens, kept, selection != "none", fused_dense=tp == 1)
    assert sum(sm.stage_flops(p, stage) for stage in range(pp)) * tp * p.dp == pytest.approx(logged.executed)
