"""Process groups of a tensor x context x data x pipeline layout, in Megatron's rank order (tp-cp-dp-pp).

Global rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank: tensor-parallel ranks are adjacent
(they talk every layer, so they should share a node), then context-parallel ranks (they exchange keys and
values every layer), then data-parallel, then pipeline stages.

Groups this rank belongs to:
  tensor        the tp ranks that split each layer of one stage
  context       the cp ranks that hold the sequence shards of the same samples (same tp, dp and pp rank):
                attention passes their keys and values around the ring or all-gathers them
                (`context_parallel/`; which one: `context_parallel_comm_type`)
  data          the dp replicas of one (tp rank, cp rank, stage) shard: they read different samples
  data-context  data x context: every rank holding a replica of this shard's parameters; gradients are
                summed over it (Megatron's data group "with context parallel")
  pipeline      the pp stages holding one model replica (same tp, cp and dp rank); under the interleaved
                schedule (--num-layers-per-virtual-pipeline-stage) a ring: each rank holds vp model chunks,
                chunk c of rank p is virtual stage c * pp + p, and the last rank's chunk c feeds the first
                rank's chunk c + 1
  model         tensor x pipeline: every shard of one replica (the gradient norm is summed over it)
  embedding     first and last stage of this pipeline, which both hold the tied word embedding (unused
                when the output layer is untied: the last stage then holds no copy)
  selection     the ranks holding distinct tokens of a micro-batch: the data-context group of the last
                stage (whole samples over dp, sequence shards of them over cp). TP ranks of the last stage
                compute identical scores, so each runs the threshold over its own data-context group and
                all get the same threshold, kept rows and counts.

First and last stage: outside a `model_chunk` context, whether this rank holds the embedding (rank 0) and
the LM head (rank pp - 1); inside one, whether that chunk is the first or last virtual stage (Megatron's
virtual pipeline rank): the schedule enters the chunk it runs, so the step and the p2p code ask the same
questions with or without interleaving.

Without `initialize_model_parallel` (one process) every size is 1, every rank 0 and every group None, so
the single-process code path never touches torch.distributed.

Groups of size 1 are not created: their getters return None and every caller takes its one-rank path (it
checks the size first). Each `new_group` is a collective over the whole world (under NCCL with the device
bound, an eager communicator split, non-members included), so a layout with TP = CP = 1 would otherwise
pay world-many splits per kind for groups that never communicate (docs/parallelism.md counts them).
DeepSpeed's `mpu` calls collectives on the groups it asks for whatever their size: with `self_group`,
one group per rank holding only itself stands in for this rank's size-1 groups there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    vp: int = 1  # model chunks per pipeline rank (virtual pipeline size)

    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank


@dataclass
class _Groups:
    tensor: dist.ProcessGroup | None = None
    context: dist.ProcessGroup | None = None
    data: dist.ProcessGroup | None = None
    data_context: dist.ProcessGroup | None = None
    pipeline: dist.ProcessGroup | None = None
    model: dist.ProcessGroup | None = None
    embedding: dist.ProcessGroup | None = None
    self: dist.ProcessGroup | None = None  # only this rank (`self_group`)
    pipeline_ranks: tuple[int, ...] = (0,)
    context_comm_type: str = "all_gather"  # --cp-comm-type as resolved for the device
    owned: list[dist.ProcessGroup] = field(default_factory=list)  # every group this rank joined, to destroy


_layout = Layout()
_groups = _Groups()
_chunk: int | None = None  # the model chunk the schedule runs (`model_chunk`), None outside one


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1, self_group: bool = False,
                              virtual_pipeline_model_parallel_size: int = 1,
                              cp_comm_type: str = "all_gather") -> None:
    """Create every group of size > 1 of the layout (collectively: every rank must call this with the same
    arguments); with `self_group` (DeepSpeed's mpu) also a one-rank group per rank when any group a caller
    of `group_or_self` may ask for has size 1.

    The sizes must already be validated (`config.validate_layout`)."""
    global _layout, _groups
    destroy_model_parallel()
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    dp = world // (tp * pp * cp)
    tp_rank, cp_rank, dp_rank, pp_rank = rank % tp, rank // tp % cp, rank // (tp * cp) % dp, rank // (tp * cp * dp)
    layout = Layout(tp, pp, dp, tp_rank, pp_rank, dp_rank, cp, cp_rank, virtual_pipeline_model_parallel_size)
    groups = _Groups()

    def make(members: list[list[int]], singletons: bool = False) -> dist.ProcessGroup | None:
        """new_group for every member list of more than one rank (or all, with `singletons`; all ranks create
        the same groups, in one order); keep ours."""
        mine = None
        for ranks in members:
            if len(ranks) == 1 and not singletons:
                continue
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
                groups.owned.append(group)
        return mine

    g = layout.global_rank
    everywhere = [(t, c, d, p) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]
    groups.tensor = make([[g(t, d, p, c) for t in range(tp)] for t0, c, d, p in everywhere if t0 == 0])
    groups.context = make([[g(t, d, p, c) for c in range(cp)] for t, c0, d, p in everywhere if c0 == 0])
    groups.data = make([[g(t, d, p, c) for d in range(dp)] for t, c, d0, p in everywhere if d0 == 0])
    groups.data_context = make([[g(t, d, p, c) for d in range(dp) for c in range(cp)]
                                for t, c0, d0, p in everywhere if c0 == 0 and d0 == 0])
    pipelines = [[g(t, d, p, c) for p in range(pp)] for t, c, d, p0 in everywhere if p0 == 0]
    groups.pipeline = make(pipelines)
    groups.model = make([[g(t, d, p, c) for p in range(pp) for t in range(tp)]
                         for t0, c, d, p0 in everywhere if t0 == 0 and p0 == 0])
    if pp > 1:
        groups.embedding = make([[ranks[0], ranks[-1]] for ranks in pipelines])
    if self_group and 1 in (tp, pp, dp, dp * cp, tp * pp):
        groups.self = make([[r] for r in range(world)], singletons=True)
    groups.pipeline_ranks = tuple(next(ranks for ranks in pipelines if rank in ranks))
    groups.context_comm_type = cp_comm_type
    _layout, _groups = layout, groups


def destroy_model_parallel() -> None:
    """Back to the single-process layout, destroying the layout's groups: a process that builds several
    trainers (a tool, a test's ranks) would otherwise keep every earlier layout's communicators and their
    threads until the default group ends."""
    global _layout, _groups
    for group in _groups.owned:
        dist.destroy_process_group(group)
    _layout, _groups = Layout(), _Groups()


def layout() -> Layout:
    return _layout


@contextlib.contextmanager
def offline_layout(shard: Layout) -> Iterator[None]:
    """The sizes and ranks of one shard of a layout, without process groups: the checkpoint tools build a
    shard's model in one process to learn its parameter names, partition dims and optimizer order. Nothing
    may communicate inside."""
    global _layout, _groups
    saved = _layout, _groups
    _layout, _groups = shard, _Groups()
    try:
        yield
    finally:
        _layout, _groups = saved


def group_or_self(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """`group`, or for a group of size 1 (None) the one-rank group of `initialize_model_parallel(...,
    self_group=True)`: for callers that communicate over a group whatever its size (DeepSpeed)."""
    return group if group is not None else _groups.self


def tensor_model_parallel_size() -> int:
    return _layout.tp


def tensor_model_parallel_rank() -> int:
    return _layout.tp_rank


def tensor_model_parallel_group() -> dist.ProcessGroup | None:
    return _groups.tensor


def pipeline_model_parallel_size() -> int:
    return _layout.pp


def pipeline_model_parallel_rank() -> int:
    return _layout.pp_rank


def pipeline_model_parallel_group() -> dist.ProcessGroup | None:
    return _groups.pipeline


def data_parallel_size() -> int:
    return _layout.dp


def data_parallel_rank() -> int:
    return _layout.dp_rank


def data_parallel_group() -> dist.ProcessGroup | None:
    return _groups.data


def context_parallel_size() -> int:
    return _layout.cp


def context_parallel_rank() -> int:
    return _layout.cp_rank


def context_parallel_group() -> dist.ProcessGroup | None:
    return _groups.context


def context_parallel_comm_type() -> str:
    """"p2p" (the ring) or "all_gather": how attention gets the other context ranks' keys and values."""
    return _groups.context_comm_type


def data_context_parallel_size() -> int:
    """Ranks holding a replica of this rank's parameters: data x context."""
    return _layout.dp * _layout.cp


def data_context_parallel_rank() -> int:
    return _layout.dp_rank * _layout.cp + _layout.cp_rank


def data_context_parallel_group() -> dist.ProcessGroup | None:
    return _groups.data_context


def model_parallel_group() -> dist.ProcessGroup | None:
    return _groups.model


def model_parallel_size() -> int:
    return _layout.tp * _layout.pp


def embedding_group() -> dist.ProcessGroup | None:
    """First and last stage of this pipeline (None without pipelining or on a middle stage)."""
    return _groups.embedding


def selection_group() -> dist.ProcessGroup | None:
    """The ranks whose tokens one ESLM threshold covers; None when this rank's tokens are all of them."""
    return _groups.data_context if _layout.dp * _layout.cp > 1 else None


def virtual_pipeline_model_parallel_size() -> int:
    return _layout.vp


def virtual_pipeline_model_parallel_rank() -> int | None:
    """The model chunk being run (`model_chunk`), None outside one."""
    return _chunk


@contextlib.contextmanager
def model_chunk(chunk: int) -> Iterator[None]:
    """Run model chunk `chunk` of this rank: first/last stage mean its virtual stage's (module docstring)."""
    global _chunk
    saved, _chunk = _chunk, chunk
    try:
        yield
    finally:
        _chunk = saved


def is_pipeline_first_stage() -> bool:
    return _layout.pp_rank == 0 and _chunk in (None, 0)


def is_pipeline_last_stage() -> bool:
    return _layout.pp_rank == _layout.pp - 1 and _chunk in (None, _layout.vp - 1)


def pipeline_last_rank() -> int:
    """Global rank of this pipeline's last stage (it computes the loss and the metrics)."""
    return _groups.pipeline_ranks[-1]


def pipeline_next_rank() -> int:
    """The next stage's global rank; the last stage's next is the first (the interleaved ring)."""
    return _groups.pipeline_ranks[(_layout.pp_rank + 1) % _layout.pp]


def pipeline_prev_rank() -> int:
    """The previous stage's global rank; the first stage's previous is the last (the interleaved ring)."""
    return _groups.pipeline_ranks[_layout.pp_rank - 1]
