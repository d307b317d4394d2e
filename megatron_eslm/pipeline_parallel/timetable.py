"""When each rank runs what under the interleaved 1F1B schedule (Megatron's virtual pipeline stages,
--num-layers-per-virtual-pipeline-stage); `schedules.forward_backward_pipelining_with_interleaving` runs it.

Each of the pp ranks holds vp model chunks; chunk c of rank p is virtual stage s = c * pp + p of the
pp * vp, so a micro-batch goes round the ring of ranks vp times. Plain 1F1B leaves each rank idle for
(pp - 1) of its (m + pp - 1) forward-backward slots; with chunks a slot is 1/vp as long, and the bubble
(pp - 1) such slots: vp times smaller.

The order (Megatron's): micro-batches in groups of pp; forwards run a group through chunk 0, then chunk 1,
..., backwards through the chunks in reverse. Rank p first runs (pp - p - 1) * 2 + (vp - 1) * pp forwards
(warmup; all of them when m = pp), then alternates one forward and one backward, then drains the
backwards. At most that many plus one micro-batch-chunks' activations live on a rank, and an output sent to
the next virtual stage keeps only its autograd graph (freed as plain 1F1B frees it, chunk by chunk).

Timing: `timetable` places every rank's ops in unit slots, each as early as its order and its input allow
(a forward needs the previous virtual stage's forward of the micro-batch, a backward the next one's
backward, both finished in an earlier slot). After each slot, every rank exchanges what that slot
produced with its two ring neighbours in one batch of isend/irecv: both sides of each message derive it
from the same table, so every send meets its receive in the same exchange and no rank ever waits for a
message that is not posted (no deadlock on gloo or NCCL). Received tensors wait in per-(chunk,
micro-batch) slots until their op runs. The table's idle slots count the bubble by construction
(`idle_fraction`, what tools/scaling_model.py charges).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass



@dataclass(frozen=True)
class Op:
    forward: bool
    chunk: int
    micro_batch: int


def chunk_order(pp: int, vp: int, num_micro_batches: int, forward: bool) -> list[tuple[int, int]]:
    """(chunk, micro-batch) in the order every rank runs its forwards (or backwards): groups of pp
    micro-batches (the last one shorter when pp does not divide m), each through every chunk in turn."""
    chunks = range(vp) if forward else range(vp - 1, -1, -1)
    return [(chunk, micro) for start in range(0, num_micro_batches, pp) for chunk in chunks
            for micro in range(start, min(start + pp, num_micro_batches))]


def rank_order(pp: int, vp: int, num_micro_batches: int, rank: int, forward_only: bool) -> list[Op]:
    """Rank `rank`'s ops in the order it runs them: warmup forwards, 1F1B, cooldown backwards."""
    forwards = [Op(True, c, i) for c, i in chunk_order(pp, vp, num_micro_batches, True)]
    if forward_only:
        return forwards
    backwards = [Op(False, c, i) for c, i in chunk_order(pp, vp, num_micro_batches, False)]
    total = len(forwards)
    warmup = total if num_micro_batches == pp else min((pp - rank - 1) * 2 + (vp - 1) * pp, total)
    steady = [op for pair in zip(forwards[warmup:], backwards) for op in pair]
    return forwards[:warmup] + steady + backwards[total - warmup:]


@functools.lru_cache(maxsize=64)
def timetable(pp: int, vp: int, num_micro_batches: int, forward_only: bool = False,
              backward_slots: int = 1) -> tuple[tuple[Op | None, ...], ...]:
    """Per rank, the op of each slot (None: idle), every op as early as its rank's order and its input
    allow; a backward takes `backward_slots` slots (1 for the exchanges; 2, its usual cost, to count a
    bubble). Raises if the orders cannot complete (no rank can go on)."""
    orders = [rank_order(pp, vp, num_micro_batches, rank, forward_only) for rank in range(pp)]
    stages = pp * vp
    done: dict[tuple[bool, int, int], int] = {}  # (forward, virtual stage, micro-batch) -> the slot after it
    table: list[list[Op | None]] = [[] for _ in range(pp)]
    position, busy_until = [0] * pp, [0] * pp
    slot = 0
    while any(position[rank] < len(orders[rank]) for rank in range(pp)):
        progressed = False
        for rank in range(pp):
            if busy_until[rank] > slot:
                continue
            op = orders[rank][position[rank]] if position[rank] < len(orders[rank]) else None
            stage = None if op is None else op.chunk * pp + rank
            if op is not None:
                needed = (True, stage - 1, op.micro_batch) if op.forward else (False, stage + 1, op.micro_batch)
                ends = stage == 0 if op.forward else stage == stages - 1
                if ends or done.get(needed, slot + 1) <= slot:
                    length = 1 if op.forward else backward_slots
                    table[rank].extend([op] + [None] * (length - 1))
                    done[(op.forward, stage, op.micro_batch)] = busy_until[rank] = slot + length
                    position[rank] += 1
                    progressed = True
                    continue
            table[rank].append(None)
        if not progressed and all(busy <= slot for busy in busy_until):
            raise RuntimeError(f"interleaved schedule cannot complete: pp {pp}, vp {vp}, {num_micro_batches} "
                               "micro-batches")
        slot += 1
    length = max(len(row) for row in table)
    return tuple(tuple(row + [None] * (length - len(row))) for row in table)


def idle_fraction(pp: int, vp: int, num_micro_batches: int) -> float:
    """The share of a step's slots a rank idles in, a backward costing two forwards: the bubble."""
    table = timetable(pp, vp, num_micro_batches, backward_slots=2)
    work = vp * num_micro_batches * 3
    return 1 - work / len(table[0])
