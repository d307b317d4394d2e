"""tools/scaling_model.py: its communication bytes are the code's (a real gloo run of TP2, CP2, PP2 and
DP2, dense and ESLM, counted by megatron_eslm.distributed.collectives through bench_comm's machinery), its
projection moves the right way on simple cases, and `fit` recovers the rates records were made from."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_eslm.config import ModelConfig, parse_args
from megatron_eslm.config.model import finalize_model
from megatron_eslm.distributed import collectives as c
from megatron_eslm.training.flops import micro_batch_flops
from rank_pool import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_comm  # noqa: E402
import scaling_model as sm  # noqa: E402

LAYOUTS = {"tp2": dict(tp=2, pp=1, dp=1), "cp2": dict(tp=1, pp=1, dp=1, cp=2), "pp2": dict(tp=1, pp=2, dp=1),
           "dp2": dict(tp=1, pp=1, dp=2)}


@pytest.mark.slow
def test_comm_bytes_equal_counted(tmp_path):
    """The points are built from the parsed flags of the runs (Point.from_config), not from bench_comm's
    Setup, so the layout, model, vocabulary padding and threshold settings are carried over as a study
    would carry them."""
    setups = [s for layout in LAYOUTS.values() for s in bench_comm.tiny(bench_comm.Setup(**layout))]
    prefix = str(tmp_path / "tokens")
    bench_comm.write_dataset(prefix, setups[0].vocab - 1)
    per_rank = run_on_ranks(2, bench_comm.count_bytes, setups, prefix)
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


def point(world: int, tp: int = 1, pp: int = 1, cp: int = 1, **kw) -> sm.Point:
    defaults = dict(zero_stage=0, micro_batch_size=2, global_batch_size=256, selection="none", model=model(),
                    vocab_size=50304)
    return sm.Point(world, tp, pp, world // (tp * cp * pp), cp=cp, **{**defaults, **kw})


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
            "time_threshold_comm_ms": 0.0, "executed_flops": sm.rank_flops(p) * p.tp * p.data_context}


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
    context = point(2, cp=2, **small)  # its attention's collectives run inside forward_backward
    with pytest.raises(ValueError, match="CP 1"):
        sm.fit([(context, synthetic_record(context, net))], net)


@pytest.mark.parametrize("tp,pp,cp,selection,recompute", [
    (1, 1, 1, "none", False), (2, 1, 1, "none", False), (1, 2, 1, "eslm:0.5", False), (2, 1, 1, "eslm:0.5", True),
    (1, 1, 2, "eslm:0.5", False), (2, 1, 2, "none", False)])
def test_stage_flops_add_up_to_the_trainers_count(tp, pp, cp, selection, recompute):
    """Every rank's executed FLOPs together are what the trainer logs (`flops.micro_batch_flops` over the
    step's tokens, summed over the data x context ranks: hence `fit`'s executed / (DP x CP) at TP 1, PP 1;
    no process group: one pipeline stage, hence recompute only without PP)."""
    cfg = model(4, 64)
    if recompute:
        cfg = replace(cfg, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    p = point(tp * cp * pp * 2, tp, pp, cp, model=cfg, vocab_size=256, global_batch_size=16, selection=selection)
    s = p.setup()
    tokens = s.tokens * s.micro_batches * p.data_context
    kept = s.kept_rows * s.micro_batches * p.data_context
    logged = micro_batch_flops(cfg, p.vocab_size, tokens, tokens, kept, selection != "none", fused_dense=tp == 1)
    assert tokens == p.global_batch_size * cfg.seq_length
    executed = sum(sm.stage_flops(p, stage) for stage in range(pp)) * tp * p.data_context
    assert executed == pytest.approx(logged.executed)


def test_from_config_of_a_context_parallel_run():
    """A parsed CP2 x TP2 x DP2 run (grouped-query attention: the key/value bytes follow the groups) is the
    Setup it was written from, so its bytes are bench_comm's with CP."""
    for s in bench_comm.tiny(bench_comm.Setup(tp=2, pp=1, dp=2, cp=2)):
        s = replace(s, query_groups=2)
        p = sm.Point.from_config(parse_args(bench_comm.check_flags(s, "x")), 8, s.vocab)
        assert (p.cp, p.dp, p.data_context, p.split) == (2, 2, 4, "tp2cp2pp1")
        assert p.setup() == s
        assert sm.comm_bytes(p, 0) == bench_comm.predict(s, 0)
        assert sm.comm_bytes(p, 0)[c.CP_ALL_GATHER] > 0


def test_context_parallel_terms():
    """The CP term is 0 at CP 1 and grows with CP; the gradient sum, the dense normalizer and ZeRO's shards
    span DP x CP ranks, the links follow the rank order (TP, CP, DP, PP)."""
    gqa = finalize_model(ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=8192,
                                     group_query_attention=True, num_query_groups=4))
    context = point(16, tp=2, pp=2, cp=2, model=gqa)
    expected = bench_comm.Setup(2, 2, 2, False, 24, 2048, gqa.ffn_hidden_size, 8192, 50304, 2, 256, "none", 0.0,
                                context.eslm_threshold, context.eslm_sketch_size, cp=2, heads=16, query_groups=4)
    for stage in (0, 1):
        assert sm.comm_bytes(context, stage) == bench_comm.predict(expected, stage)
    one, two = (sm.predict(point(8, cp=cp), CALIBRATION, H100) for cp in (1, 2))
    assert one["cp_comm_ms"] == 0 < two["cp_comm_ms"]
    assert two["forward_backward_ms"] == pytest.approx(two["compute_ms"] + two["cp_comm_ms"] + two["normalizer_ms"])
    # CP 4, 24 layers: 2 collectives per layer and micro-batch of CP - 1 ring steps each, which put 2 (CP - 1)
    # x a rank's keys and values (2 x 2 x 2048 / 4 rows of 2048 floats) on its link
    cp4 = point(8, cp=4)
    latency_only = replace(H100, intra_bandwidth=1e30, inter_bandwidth=1e30, intra_latency=1.0, inter_latency=1.0)
    bandwidth_only = replace(H100, intra_latency=0.0, inter_latency=0.0)
    calls = cp4.micro_batches * 24 * 2
    assert sm.predict(cp4, CALIBRATION, latency_only)["cp_comm_ms"] == pytest.approx(1e3 * calls * 3)
    kv = 2 * (2 * 2048 // 4) * 2048 * bench_comm.FLOAT
    assert (sm.predict(cp4, CALIBRATION, bandwidth_only)["cp_comm_ms"]
            == pytest.approx(1e3 * calls * 3 * kv / H100.intra_bandwidth))
    # CP 2 x DP 1 sums gradients over 2 ranks as DP 2 does: the same bytes over the same ring; its dense
    # normalizer too, once for each of its twice as many micro-batches (the batch is divided over DP only)
    dp2, cp2 = point(2), point(2, cp=2)
    data, ctx = sm.predict(dp2, CALIBRATION, H100), sm.predict(cp2, CALIBRATION, H100)
    assert ctx["dp_comm_ms"] == pytest.approx(data["dp_comm_ms"]) and data["dp_comm_ms"] > 0
    assert cp2.micro_batches == 2 * dp2.micro_batches
    assert ctx["normalizer_ms"] == pytest.approx(2 * data["normalizer_ms"]) and data["normalizer_ms"] > 0
    zero0, zero1 = (sm.predict(point(2, cp=2, zero_stage=z), CALIBRATION, H100) for z in (0, 1))
    assert zero1["optimizer_ms"] == pytest.approx(zero0["optimizer_ms"] / 2)  # ZeRO shards over DP x CP
    intra, inter = (H100.intra_bandwidth, H100.intra_latency), (H100.inter_bandwidth, H100.inter_latency)
    assert sm._links(point(16, tp=2, cp=2), H100) == {"tp": intra, "cp": intra, "dp": inter, "pp": inter}
    assert sm._links(point(32, tp=2, cp=8), H100) == {"tp": intra, "cp": inter, "dp": inter, "pp": inter}
    assert sm._links(point(8, tp=2, cp=2), H100)["dp"] == intra
    # a pipeline message is a CP rank's micro-batch x sequence / CP rows: one send and one receive a micro-batch
    piped = point(4, pp=2, cp=2)
    assert sm.predict(piped, CALIBRATION, latency_only)["pp_comm_ms"] == pytest.approx(1e3 * 2 * piped.micro_batches)
