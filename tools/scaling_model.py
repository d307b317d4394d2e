#!/usr/bin/env python
"""Analytical step-time model for scaling studies: fitted on measured points, projected to other layouts.

What is MEASURED (`fit`, from the runs' metrics records at --timing-log-level 2, one record per point):
  compute rate   seconds per executed FLOP on one rank: the summed forward_backward time over the summed
                 FLOPs one rank executed, over the calibration points, which are the points of the smallest
                 world size among those whose forward_backward holds no communication (TP 1, CP 1, PP 1,
                 no ZeRO-2/3 and no --overlap-grad-reduce: the data-parallel reduction then runs in
                 grads_reduce, the threshold's collectives in threshold). A rank's FLOPs are its share of the
                 record's `executed_flops` (global: every rank's): executed / (DP x CP). Each point's time is
                 first divided by its CPU oversubscription (below).
  data           time per micro-batch (time_data_ms / micro-batches of a rank), the calibration points' mean.
  optimizer      seconds per parameter a rank updates (time_optimizer_ms over `Setup.local_parameters`,
                 divided by DP x CP under ZeRO), the calibration points' mean.
  threshold      seconds per scored row (time_threshold_ms, which at level 2 excludes its collectives,
                 threshold_comm, over the rows a rank scores in a step: micro-batch x sequence / CP x
                 micro-batches), the mean over the calibration points with selection; 0 when none has.
  latency        `fit_latency`: the per-ring-step latency of the network the points ran on, least squares
                 over every measured point's step time (a micro-benchmark's latency undercounts a collective
                 inside a training run); the bandwidth stays the network's.
  `fit`'s network only says how oversubscribed the calibration points were (default "cpu-gloo", this
  machine; pass a GPU network for GPU points). Calibrate CPU points with OMP_NUM_THREADS=1 (one core a rank).
What is MODELLED (`predict`), per rank of the slowest pipeline stage, every term in ms per optimizer step:
  compute        the stage's executed FLOPs x the rate x oversubscription: its layers (layers / PP of
                 `flops.transformer_forward_flops_per_token`, forward + 2x backward, plus its share of
                 recompute) over the rank's tokens (`bench_comm.Setup.tokens`: micro-batch x sequence / CP
                 a micro-batch), split over TP; the last stage adds the LM head (2hV a row forward; backward
                 4hV a row fused dense at TP 1, 6hV unfused dense at TP > 1, 6hV per KEPT row selective: the
                 counts of `training/flops.py`), split over TP. Kept rows: `bench_comm.Setup.kept_rows`.
  tp/cp/pp/dp comm  the payload bytes of `bench_comm.predict(Setup, stage)` (verified against the code's
                 counted collectives by `bench_comm.py --check` and tests/test_scaling_model.py) x the ring
                 factors of `bench_comm.ring_factors`, over the bandwidth of the link the group spans, plus a
                 latency per ring step (all-reduce 2(n-1) steps, all-gather/reduce-scatter n-1, a send 1)
                 per collective call (a rank of the pipeline waits for its receives as for its sends: both
                 count). Ranks are laid out TP fastest, then CP, then DP, then PP (`parallel_state`): the
                 TP group is inside a node iff TP <= GPUs per node, CP iff TP x CP <= GPUs per node, the
                 data x context group (DP x CP ranks: the gradients' sum and the selection group) iff
                 TP x CP x DP <= GPUs per node, the pipeline iff the whole world fits in a node. Calls
                 counted: per micro-batch 4 TP collectives per layer (2 forward, 2 backward; with SP 4
                 all-gathers and 4 reduce-scatters), 1 for the embedding and 3 for the head (SP: 1 more
                 each; counted on a TP2 gloo run), 2 CP collectives per layer (the keys' and values'
                 all-gather forward, their gradients' reduce-scatter backward), a send and a receive per
                 stage boundary the rank has, 1 dense normalizer all-reduce over DP x CP or 2 ESLM threshold
                 rounds; per step one all-reduce over DP x CP per --ddp-bucket-size bucket (default 25M
                 elements), the gradient norm's all-reduce over TP x PP (in optimizer) and the embedding's
                 (PP > 1).
  bubble         1F1B: (PP - 1) / micro-batches x the slowest stage's compute + TP + CP + PP time; interleaved
                 with VP model chunks a rank, divided by VP (`pipeline_parallel/timetable.py` counts the same
                 by construction), while the PP messages grow: a rank sends and receives across every one
                 of its 2 VP chunk boundaries, less the pipeline's two ends.
  dp comm        over the DP x CP ranks, not overlapped: the whole all-reduce of the gradients after the
                 backward. With `overlap_grad_reduce` (and under ZeRO-2/3, whose reduction runs inside the
                 backward) only what does not fit under the last micro-batch's backward (2/3 of its compute),
                 at least one bucket. ZeRO (DeepSpeed, sharding over the DP x CP ranks; not in bench_comm's
                 model, an approximation): ZeRO-1/2 a reduce-scatter of the gradients plus an all-gather of
                 the updated parameters (the same wire bytes as the all-reduce), the optimizer over
                 1/(DP x CP) of the parameters; ZeRO-3 adds per layer an all-gather of its parameters in the
                 forward and again in the backward of every micro-batch (no prefetch, no persistent small
                 parameters).
  embedding      the tied embedding's gradient all-reduce between first and last stage (PP > 1), over the
                 pipeline's link.
  threshold      the fitted per-row time x the rows a rank scores, plus its collectives' bytes (sketch and
                 the small all-reduces, `bench_comm.threshold_bytes`) as an all-gather over DP x CP, 2 calls
                 per micro-batch (sketch-exact's bracket round; its rare third round is ignored).
  oversubscription  compute, data, optimizer and threshold slow down by ranks per node / compute slots per
                 node when above 1 (`Network.compute_slots`: the CPU cores for "cpu-gloo"; None on GPUs).
What is IGNORED: embedding lookups, norms and elementwise work beyond what the FLOP rate absorbs (the rate
is per executed matmul FLOP, so it carries them in proportion); any overlap of TP, CP or PP communication
with compute; the forward collectives that activation recompute runs again (TP's, CP's key/value
all-gather; not in bench_comm's count either); bf16 payloads (bench_comm counts float32 activations: --bf16
would halve TP, CP and PP bytes); contention between groups sharing a link (TP, CP and DP traffic of one
node); the metrics sums (a few bytes per log interval); kernel efficiency changing with GEMM size (a
TP-split GEMM, or a CP rank's attention over its two chunks, runs at the fitted rate); memory limits
(nothing here says whether a point fits); a policy's extra passes (teacher, reference model); selection
policies other than ESLM are counted as ESLM's threshold. Collectives are rings: their latency grows with
the group (2(n-1) steps), where NCCL switches to trees at scale, so a projection to hundreds of
data-parallel ranks overstates the latency part of the gradient all-reduce.

    from scaling_model import NETWORKS, Point, fit, fit_latency, predict
    calibration = fit([(point, record), ...])
    here = fit_latency([(point, record), ...], calibration, NETWORKS["cpu-gloo"])  # the network they ran on
    predict(Point(...), calibration, NETWORKS["h100-nvlink-ib"])["step_ms"]
    python tools/scaling_model.py --measure-gloo     # re-measure the "cpu-gloo" link constants
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_comm  # noqa: E402  (the communication volumes the code issues)

from megatron_eslm.config import Config, ModelConfig  # noqa: E402
from megatron_eslm.config.parallel import ParallelConfig, virtual_pipeline_size  # noqa: E402
from megatron_eslm.config.selection import SelectionConfig  # noqa: E402
from megatron_eslm.distributed import collectives as c  # noqa: E402
from megatron_eslm.model.gpt import padded_vocab_size  # noqa: E402
from megatron_eslm.training.flops import recompute_flops_per_token, transformer_forward_flops_per_token  # noqa: E402

BUCKET = ParallelConfig().ddp_bucket_size  # gradient elements per data-parallel all-reduce


@dataclass(frozen=True)
class Network:
    """Per-GPU link bandwidth (bytes/s, one direction) and latency (s per ring step) by link class."""
    gpus_per_node: int
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    compute_slots: int | None = None  # ranks per node that compute without slowing each other; None: all


NETWORKS: dict[str, Network] = {
    # DGX/HGX H100: NVLink4, 18 links x 25 GB/s = 450 GB/s per direction per GPU (NVIDIA H100 datasheet;
    # NCCL reaches ~80% of it as bus bandwidth); one ConnectX-7 InfiniBand NDR port per GPU, 400 Gb/s =
    # 50 GB/s per direction. Latencies per ring step are assumptions of the order NCCL's small-message
    # all-reduces show: ~2 us over NVLink, ~5 us over InfiniBand.
    "h100-nvlink-ib": Network(8, 450e9, 2e-6, 50e9, 5e-6),
    # This machine's loopback gloo, measured once with `measure_gloo()` (2 ranks, OMP_NUM_THREADS=1, float32
    # all-reduces of 4 B to 4 MB; noisy while other jobs run): one node holding every rank, as many compute
    # slots as cores.
    "cpu-gloo": Network(1 << 20, 1.0e9, 2.5e-4, 1.0e9, 2.5e-4, compute_slots=os.cpu_count()),
}


@dataclass(frozen=True)
class Layout:
    """What a scaling study sweeps: the layout, the batch and the selection ("none" or "<policy>:<alpha>",
    e.g. "eslm:0.5"); tools/scaling_study.py's points are these. `cp` (context-parallel size) is a keyword
    with default 1, so layouts written before context parallelism still construct."""
    world_size: int
    tp: int
    cp: int = field(default=1, kw_only=True)
    vp: int = field(default=1, kw_only=True)  # model chunks per pipeline rank (the interleaved schedule)
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    global_batch_size: int
    selection: str

    @property
    def data_context(self) -> int:
        """DP x CP: the ranks that sum the gradients (and shard them under ZeRO), and the selection group."""
        return self.dp * self.cp

    @property
    def split(self) -> str:
        return split_name(self.tp, self.cp, self.pp)


def split_name(tp: int, cp: int, pp: int) -> str:
    """A layout's name without DP (the rest of the world): tp<N>pp<M>, with cp<C> after tp<N> when C > 1
    (so names from before context parallelism stay as they were)."""
    return f"tp{tp}{f'cp{cp}' if cp > 1 else ''}pp{pp}"


@dataclass(frozen=True)
class Point(Layout):
    """A layout with the model it runs: `vocab_size` is the padded vocabulary (divisible by TP); `model` a
    finalized ModelConfig."""
    model: ModelConfig
    vocab_size: int
    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False
    eslm_threshold: str = SelectionConfig.eslm_threshold
    eslm_sketch_size: int = SelectionConfig.eslm_sketch_size

    @classmethod
    def from_config(cls, cfg: Config, world_size: int, tokenizer_vocab_size: int,
                    zero_stage: int | None = None) -> Point:
        """The point a parsed run config describes (`zero_stage`: DeepSpeed's, when its JSON sets it)."""
        p, t, sel = cfg.parallel, cfg.training, cfg.selection
        tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        return cls(world_size, tp, pp, world_size // (tp * pp * cp),
                   (cfg.deepspeed.zero_stage or 0) if zero_stage is None else zero_stage,
                   t.micro_batch_size, t.global_batch_size,
                   "none" if sel.selection == "none" else f"{sel.selection}:{sel.eslm_alpha}", cfg.model,
                   padded_vocab_size(tokenizer_vocab_size, cfg.model.make_vocab_size_divisible_by * tp),
                   p.sequence_parallel, p.overlap_grad_reduce, sel.eslm_threshold, sel.eslm_sketch_size, cp=cp,
                   vp=virtual_pipeline_size(p, cfg.model.num_layers))

    @property
    def micro_batches(self) -> int:
        """Micro-batches per rank per step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def alpha(self) -> float:
        return 0.0 if self.selection == "none" else float(self.selection.partition(":")[2]
                                                           or SelectionConfig.eslm_alpha)

    def setup(self) -> bench_comm.Setup:
        """The layout in bench_comm's terms."""
        m = self.model
        return bench_comm.Setup(self.tp, self.pp, self.dp, self.sequence_parallel, m.num_layers, m.hidden_size,
                                m.ffn_hidden_size, m.seq_length, self.vocab_size, self.micro_batch_size,
                                self.global_batch_size, "none" if self.selection == "none" else "eslm",
                                self.alpha, self.eslm_threshold, self.eslm_sketch_size, cp=self.cp,
                                heads=m.num_attention_heads, query_groups=m.num_query_groups)


def comm_bytes(point: Point, stage: int) -> Counter[str]:
    """Payload bytes per step of a rank of pipeline stage `stage`, by collective kind: what `predict` times
    (`bench_comm.predict`, the code's own count)."""
    return bench_comm.predict(point.setup(), stage)


@dataclass(frozen=True)
class Calibration:
    seconds_per_flop: float
    data_seconds_per_micro_batch: float
    optimizer_seconds_per_parameter: float
    threshold_seconds_per_row: float
    points: tuple[str, ...]  # which measured points it came from, for the report


def slowdown(point: Point, network: Network) -> float:
    """How much slower one rank computes because the node's ranks outnumber its compute slots."""
    if network.compute_slots is None:
        return 1.0
    return max(1.0, min(point.world_size, network.gpus_per_node) / network.compute_slots)


def stage_flops(point: Point, stage: int) -> float:
    """Executed FLOPs of one rank of pipeline stage `stage` per optimizer step: its TP share of its own
    tokens (`Setup.tokens`, a CP rank's micro-batch x sequence / CP)."""
    cfg, s = point.model, point.setup()
    tokens = s.tokens * s.micro_batches
    per_token = 3 * transformer_forward_flops_per_token(cfg) + recompute_flops_per_token(cfg, point.pp * point.vp)
    flops = per_token / point.pp * tokens
    if stage == point.pp - 1:
        unit = 2.0 * cfg.hidden_size * point.vocab_size  # one row's head forward (flops.py)
        if point.selection != "none":
            backward = 3.0 * unit * s.kept_rows * s.micro_batches
        else:
            backward = (2.0 if point.tp == 1 else 3.0) * unit * tokens
        flops += unit * tokens + backward
    return flops / point.tp


def rank_flops(point: Point) -> float:
    """The executed FLOPs of the busiest rank (for the fit: every rank at PP 1)."""
    return max(stage_flops(point, stage) for stage in range(point.pp))


def _links(point: Point, network: Network) -> dict[str, tuple[float, float]]:
    """(bandwidth, latency) of each group's link: TP, CP, data x context ("dp"), and the pipeline (sends,
    embedding); ranks are laid out TP fastest, then CP, then DP, then PP."""
    intra = (network.intra_bandwidth, network.intra_latency)
    inter = (network.inter_bandwidth, network.inter_latency)
    return {"tp": intra if point.tp <= network.gpus_per_node else inter,
            "cp": intra if point.tp * point.cp <= network.gpus_per_node else inter,
            "dp": intra if point.tp * point.cp * point.dp <= network.gpus_per_node else inter,
            "pp": intra if point.world_size <= network.gpus_per_node else inter}


def _time(payload: float, factor: float, calls: float, steps: int, link: tuple[float, float]) -> float:
    """Seconds for `calls` collectives moving `payload` bytes in all, `steps` ring steps each."""
    bandwidth, latency = link
    return payload * factor / bandwidth + calls * steps * latency


def fit(measured: list[tuple[Point, dict]], network: Network = NETWORKS["cpu-gloo"]) -> Calibration:
    """Calibrate from measured (point, metrics record) pairs; see the module docstring for what is fitted
    from which points. `network` only supplies the oversubscription of the calibration points."""
    quiet = [(p, r) for p, r in measured
             if p.tp == 1 and p.cp == 1 and p.pp == 1 and p.zero_stage < 2 and not p.overlap_grad_reduce]
    if not quiet:
        raise ValueError("fit needs a measured point with TP 1, CP 1, PP 1, ZeRO 0/1 and no overlapped reduction")
    smallest = min(p.world_size for p, _ in quiet)
    points = [(p, r) for p, r in quiet if p.world_size == smallest]
    seconds, flops, data, optimizer, rows, threshold = 0.0, 0.0, [], [], 0.0, 0.0
    for p, r in points:
        slow = slowdown(p, network)
        seconds += r["time_forward_backward_ms"] / 1e3 / slow
        flops += r["executed_flops"] / p.data_context
        data.append(r["time_data_ms"] / 1e3 / slow / p.micro_batches)
        parameters = p.setup().local_parameters(0) / (p.data_context if p.zero_stage else 1)
        optimizer.append(r["time_optimizer_ms"] / 1e3 / slow / parameters)
        if p.selection != "none":
            rows += p.setup().tokens * p.micro_batches
            threshold += r["time_threshold_ms"] / 1e3 / slow  # the timers are disjoint: no collectives in it
    return Calibration(seconds / flops, sum(data) / len(data), sum(optimizer) / len(optimizer),
                       threshold / rows if rows else 0.0,
                       tuple(f"world {p.world_size} {p.split}dp{p.dp} {p.selection}" for p, _ in points))


def fit_latency(measured: list[tuple[Point, dict]], calibration: Calibration, network: Network) -> Network:
    """`network` with the per-ring-step latency (both link classes) that fits the measured points best: least
    squares of their step times (iteration_time_ms), in which the latency enters linearly, weighted by how
    many ring steps each point's collectives take. For the network the points ran on: a micro-benchmark's
    latency (`measure_gloo`) undercounts what a collective costs inside a training run (ranks that drift
    apart wait for each other at every call). Points without collectives do not move it."""
    still = dataclasses.replace(network, intra_latency=0.0, inter_latency=0.0)
    unit = dataclasses.replace(network, intra_latency=1.0, inter_latency=1.0)
    weighted = squares = 0.0
    for point, record in measured:
        base = predict(point, calibration, still)["step_ms"]
        steps = predict(point, calibration, unit)["step_ms"] - base  # ms per second of latency
        weighted += steps * (record["iteration_time_ms"] - base)
        squares += steps * steps
    if not squares:
        return network
    latency = max(weighted / squares, 0.0)
    return dataclasses.replace(network, intra_latency=latency, inter_latency=latency)


def _tp_calls(point: Point, stage: int) -> int:
    """TP collective calls per micro-batch of a rank of `stage` (counted in a TP2 gloo run): 4 per layer
    (with SP 4 all-gathers and 4 reduce-scatters), the embedding's 1 (SP: +1 all-gather) on the first
    stage, the head's 3 (max, sums, kept rows; SP: +1 all-gather) on the last."""
    sp = point.sequence_parallel
    calls = 4 * point.model.num_layers // point.pp * (2 if sp else 1)
    if stage == 0:
        calls += 1 + sp
    if stage == point.pp - 1:
        calls += 3 + sp
    return calls


def predict(point: Point, calibration: Calibration, network: Network) -> dict[str, float]:
    """Step time and its breakdown in ms (module docstring). The rank shown is the slowest stage's; the
    stage-independent terms (optimizer, data) are its too."""
    s, m, links, slow = point.setup(), point.micro_batches, _links(point, network), slowdown(point, network)
    factors = bench_comm.ring_factors(s)
    stages = []
    for stage in range(point.pp):
        volume = comm_bytes(point, stage)
        compute = stage_flops(point, stage) * calibration.seconds_per_flop * slow
        tp_comm = 0.0
        if point.tp > 1:
            payload = sum(volume[k] * factors[k] for k in (c.TP_ALL_REDUCE, c.TP_ALL_GATHER, c.TP_REDUCE_SCATTER))
            steps = (point.tp - 1) if point.sequence_parallel else 2 * (point.tp - 1)  # SP: gathers and scatters
            tp_comm = _time(payload, 1.0, m * _tp_calls(point, stage), steps, links["tp"])
        cp_comm = 0.0
        if point.cp > 1:  # per layer the keys' and values' all-gather (forward), their gradients' reduce-scatter
            payload = sum(volume[k] * factors[k] for k in (c.CP_ALL_GATHER, c.CP_REDUCE_SCATTER))
            cp_comm = _time(payload, 1.0, m * 2 * point.model.num_layers // point.pp, point.cp - 1, links["cp"])
        pp_comm = 0.0
        if point.pp > 1:  # the rank waits for its receives as for its sends: both count
            moved = volume[c.PP_SEND] + volume[c.PP_RECV]
            messages = moved / ((s.tokens // s.tp if s.sp else s.tokens) * s.hidden * bench_comm.FLOAT)
            ends = (stage == 0) + (stage == point.pp - 1)  # interleaved: every chunk's boundaries but the ends
            boundaries = (2 * point.vp - ends) / (2 - ends)
            pp_comm = _time(moved * boundaries, 1.0, messages * boundaries, 1, links["pp"])
        stages.append((compute + tp_comm + cp_comm + pp_comm, compute, tp_comm, cp_comm, pp_comm, stage, volume))
    total, compute, tp_comm, cp_comm, pp_comm, stage, volume = max(stages)
    bubble = (point.pp - 1) / (m * point.vp) * total
    parameters = s.local_parameters(stage)

    # the gradient reduction over the data x context ranks (or ZeRO's collectives)
    n = point.data_context
    dp_comm = 0.0
    if n > 1:
        buckets = math.ceil(parameters / BUCKET)
        dp_comm = _time(volume[c.DP_ALL_REDUCE], factors[c.DP_ALL_REDUCE], buckets, 2 * (n - 1), links["dp"])
        if point.zero_stage == 3:  # per-layer parameter all-gathers, forward and backward of every micro-batch
            shard = parameters * bench_comm.FLOAT / n
            dp_comm += _time(2 * m * shard, n - 1, 2 * m * point.model.num_layers // point.pp, n - 1, links["dp"])
        if point.overlap_grad_reduce or point.zero_stage >= 2:
            last_bucket = _time(min(parameters, BUCKET) * bench_comm.FLOAT, factors[c.DP_ALL_REDUCE], 1,
                                2 * (n - 1), links["dp"])
            dp_comm = max(dp_comm - compute / m * 2 / 3, last_bucket)
    embedding = 0.0
    if point.pp > 1:
        embedding = _time(volume[c.EMBEDDING_ALL_REDUCE], factors[c.EMBEDDING_ALL_REDUCE], 1, 2, links["pp"])

    # the selection group's per-micro-batch collectives, on the last stage: ESLM's threshold (2 calls, an
    # all-gather's ring steps), dense training's token-count normalizer (1 all-reduce, in forward_backward)
    head = comm_bytes(point, point.pp - 1)
    threshold = normalizer = 0.0
    if point.selection != "none":
        threshold = calibration.threshold_seconds_per_row * s.tokens * m * slow
        if n > 1:
            threshold += _time(head[c.ESLM_THRESHOLD], factors[c.ESLM_THRESHOLD], 2 * m, n - 1, links["dp"])
    elif n > 1:
        normalizer = _time(head[c.DENSE_NORMALIZER], factors[c.DENSE_NORMALIZER], m, 2 * (n - 1), links["dp"])
    optimizer = calibration.optimizer_seconds_per_parameter * parameters / (n if point.zero_stage else 1) * slow
    if point.tp * point.pp > 1:  # the gradient norm's all-reduce over the model-parallel group
        optimizer += _time(volume[c.GRAD_NORM], factors[c.GRAD_NORM], 1, 2 * (point.tp * point.pp - 1),
                           links["pp" if point.pp > 1 else "tp"])
    data = calibration.data_seconds_per_micro_batch * m * slow
    ms = {"compute_ms": compute, "tp_comm_ms": tp_comm, "cp_comm_ms": cp_comm, "pp_comm_ms": pp_comm,
          "bubble_ms": bubble, "dp_comm_ms": dp_comm, "embedding_comm_ms": embedding, "normalizer_ms": normalizer,
          "threshold_ms": threshold, "optimizer_ms": optimizer, "data_ms": data}
    ms = {k: 1e3 * v for k, v in ms.items()}
    ms["step_ms"] = sum(ms.values())
    # the measured phases' counterparts (`training/timers.py`): ZeRO-2/3 reduce inside the backward
    inside = point.zero_stage >= 2
    inline = ("compute_ms", "tp_comm_ms", "cp_comm_ms", "pp_comm_ms", "bubble_ms", "normalizer_ms")
    ms["forward_backward_ms"] = sum(ms[k] for k in inline) + (ms["dp_comm_ms"] if inside else 0.0)
    ms["grads_reduce_ms"] = ms["embedding_comm_ms"] + (0.0 if inside else ms["dp_comm_ms"])
    ms["stage"] = float(stage)
    return ms


# ----------------------------------------------------------------------------------------- gloo

def _measure_rank(rank: int, tmp: str, sizes: tuple[int, ...], repeats: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    seconds = []
    for size in sizes:
        x = torch.ones(size // bench_comm.FLOAT)
        dist.all_reduce(x)  # warm up the connection and the buffers
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        seconds.append((time.perf_counter() - start) / repeats)
    if rank == 0:
        torch.save(seconds, f"{tmp}/seconds.pt")
    dist.destroy_process_group()


def measure_gloo(repeats: int = 20) -> Network:
    """The "cpu-gloo" network measured now: 2 gloo ranks all-reduce float32 tensors of 4 B to 4 MB. A
    2-rank ring all-reduce takes 2 steps and puts 1x its payload on the wire: t = 2 latency + bytes /
    bandwidth, fitted by least squares on the relative error (every size weighs the same)."""
    sizes = (4, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_measure_rank, args=(tmp, sizes, repeats), nprocs=2, join=True)
        seconds = torch.load(f"{tmp}/seconds.pt")
    t = torch.tensor(seconds, dtype=torch.float64)
    design = torch.stack([torch.full_like(t, 2.0), torch.tensor(sizes, dtype=torch.float64)], 1) / t[:, None]
    latency, per_byte = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution[:, 0].tolist()
    bandwidth = 1.0 / max(per_byte, 1e-15)
    return Network(1 << 20, bandwidth, latency, bandwidth, latency, compute_slots=os.cpu_count())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure-gloo", action="store_true", help="measure this machine's loopback gloo link")
    args = p.parse_args()
    if args.measure_gloo:
        net = measure_gloo()
        print(f"gloo: {net.intra_bandwidth / 1e9:.2f} GB/s, {net.intra_latency * 1e6:.0f} us per ring step")


if __name__ == "__main__":
    main()
