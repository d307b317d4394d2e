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

Timing: every rank runs its ops in Megatron's micro-steps (`micro_steps`: each warmup forward alone, a
forward and a backward together each 1F1B step, each cooldown backward alone), and `timetable` places each
micro-step in the first slot after the slots that produce its inputs (a forward needs the previous virtual
stage's forward of the micro-batch, a backward the next one's backward). After each slot, every rank
exchanges what that slot produced with its two ring neighbours in one batch of isend/irecv: both sides of
each message derive it from the same table, so every send meets its receive in the same exchange and no
rank ever waits for a message that is not posted (no deadlock on gloo or NCCL). Received tensors wait in
per-(chunk, micro-batch) slots until their op runs.

An exchange holds both sides of a message until both have finished the slot, so the slots of neighbours
that talk are as long as the longer of them. With one op a slot, a rank's forward (1) met its neighbour's
backward (2) in every 1F1B slot, neighbours alternating out of phase, and each forward-backward pair
took 4 units instead of 3 (at PP2 x VP2, m = 8, in a chunk's forward: 13 idle units of 61 against plain
1F1B's 6 of 54). In Megatron's micro-steps every rank's 1F1B slot holds a forward and a backward and the
warmups differ by 2 between neighbours, so they exchange in phase and only the bubble is left:
`step_time` charges the exchanges, and `idle_fraction` from it is (pp - 1) / (vp m + pp - 1), what
tools/scaling_model.py charges.
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


def warmup_forwards(pp: int, vp: int, num_micro_batches: int, rank: int) -> int:
    """Megatron's warmup: (pp - rank - 1) * 2 + (vp - 1) * pp forwards, all of them when m = pp."""
    total = vp * num_micro_batches
    return total if num_micro_batches == pp else min((pp - rank - 1) * 2 + (vp - 1) * pp, total)


def rank_order(pp: int, vp: int, num_micro_batches: int, rank: int, forward_only: bool) -> list[Op]:
    """Rank `rank`'s ops in the order it runs them: warmup forwards, 1F1B, cooldown backwards."""
    forwards = [Op(True, c, i) for c, i in chunk_order(pp, vp, num_micro_batches, True)]
    if forward_only:
        return forwards
    backwards = [Op(False, c, i) for c, i in chunk_order(pp, vp, num_micro_batches, False)]
    total = len(forwards)
    warmup = warmup_forwards(pp, vp, num_micro_batches, rank)
    steady = [op for pair in zip(forwards[warmup:], backwards) for op in pair]
    return forwards[:warmup] + steady + backwards[total - warmup:]


def micro_steps(pp: int, vp: int, num_micro_batches: int, rank: int, forward_only: bool) -> list[tuple[Op, ...]]:
    """Rank `rank`'s ops grouped as Megatron's schedule runs them between two exchanges: each warmup
    forward alone, one forward and one backward each 1F1B step, each cooldown backward alone."""
    order = rank_order(pp, vp, num_micro_batches, rank, forward_only)
    if forward_only:
        return [(op,) for op in order]
    warmup = warmup_forwards(pp, vp, num_micro_batches, rank)
    end = warmup + 2 * (vp * num_micro_batches - warmup)  # the 1F1B pairs end there
    return ([(op,) for op in order[:warmup]] + [tuple(order[i:i + 2]) for i in range(warmup, end, 2)]
            + [(op,) for op in order[end:]])


def _stage(op: Op, rank: int, pp: int) -> int:
    return op.chunk * pp + rank


def sends(op: Op, rank: int, pp: int, vp: int) -> bool:
    """Whether `op`'s result travels: a forward's output to the next virtual stage (but the last one's loss),
    a backward's input gradient to the previous one (but the first's)."""
    stage = _stage(op, rank, pp)
    return stage < pp * vp - 1 if op.forward else stage > 0


def _ready(op: Op, rank: int, pp: int, stages: int, done: set[tuple[bool, int, int]]) -> bool:
    """Whether `op`'s input is there: none needed at the ends, else produced in an earlier slot."""
    stage = _stage(op, rank, pp)
    if stage == (0 if op.forward else stages - 1):
        return True
    return (op.forward, stage - 1 if op.forward else stage + 1, op.micro_batch) in done


@functools.lru_cache(maxsize=64)
def timetable(pp: int, vp: int, num_micro_batches: int,
              forward_only: bool = False) -> tuple[tuple[tuple[Op, ...] | None, ...], ...]:
    """Per rank, the micro-step of each slot (None: idle), each in the first slot after the slots that
    produce its inputs (a forward needs the previous virtual stage's forward of its micro-batch, a
    backward the next one's backward). Raises if the micro-steps cannot complete (no rank can go on)."""
    steps = [micro_steps(pp, vp, num_micro_batches, rank, forward_only) for rank in range(pp)]
    stages = pp * vp
    done: set[tuple[bool, int, int]] = set()  # (forward, virtual stage, micro-batch) of earlier slots
    table: list[list[tuple[Op, ...] | None]] = [[] for _ in range(pp)]
    position = [0] * pp
    while any(position[rank] < len(steps[rank]) for rank in range(pp)):
        produced = set()
        for rank in range(pp):
            step = steps[rank][position[rank]] if position[rank] < len(steps[rank]) else None
            if step is not None and all(_ready(op, rank, pp, stages, done) for op in step):
                produced.update((op.forward, _stage(op, rank, pp), op.micro_batch) for op in step)
                position[rank] += 1
            else:
                step = None
            table[rank].append(step)
        if not produced:
            raise RuntimeError(f"interleaved schedule cannot complete: pp {pp}, vp {vp}, {num_micro_batches} "
                               "micro-batches")
        done |= produced
    length = max(len(row) for row in table)
    return tuple(tuple(row + [None] * (length - len(row))) for row in table)


def step_time(pp: int, vp: int, num_micro_batches: int, forward_only: bool = False) -> list[float]:
    """Each rank's time for a step under the exchanges, a forward taking 1 and a backward 2: a slot of a rank
    ends when its own ops and those of each neighbour it exchanges a tensor with are done (both sides
    of a message wait in the same exchange)."""
    table = timetable(pp, vp, num_micro_batches, forward_only)
    now = [0.0] * pp
    for slot in range(len(table[0])):
        posted = [now[rank] + sum(1 if op.forward else 2 for op in table[rank][slot] or ()) for rank in range(pp)]
        talks = [[False] * pp for _ in range(pp)]
        for rank in range(pp):
            for op in table[rank][slot] or ():
                if sends(op, rank, pp, vp):
                    peer = (rank + (1 if op.forward else -1)) % pp
                    talks[rank][peer] = talks[peer][rank] = True
        now = [max([posted[rank]] + [posted[peer] for peer in range(pp) if talks[rank][peer]]) for rank in range(pp)]
    return now


def idle_fraction(pp: int, vp: int, num_micro_batches: int) -> float:
    """The share of a step the first rank idles in (`step_time`, a backward costing two forwards): the bubble."""
    return 1 - vp * num_micro_batches * 3 / step_time(pp, vp, num_micro_batches)[0]
