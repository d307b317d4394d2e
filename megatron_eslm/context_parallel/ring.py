"""Causal attention of this rank's two chunks with the keys and values passed around the context group
(the ring: Megatron's --cp-comm-type p2p, Transformer Engine's AttnFuncWithCPAndKVP2P), instead of one
all-gather of the whole sequence's (`attention.py`).

In C steps rank r holds the keys and values of rank src = r - i (mod C), its chunks src and 2C-1-src, and
sends them on to rank r + 1 while its queries (chunks r and 2C-1-r) attend to them; the blocks a causal
query chunk c sees are the key chunks <= c:

  i = 0        its own chunks: queries r x keys r (causal) and queries 2C-1-r x keys r, 2C-1-r (causal
               to the lower right of the [L, 2L] block)
  src < r      both query chunks x key chunk src, in full (chunk 2C-1-src lies after both)
  src > r      query chunk 2C-1-r x both key chunks, in full (both lie before it, after chunk r)

so every rank does two chunk blocks of work a step. The partial outputs are merged by their log-sum-exp,
out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i. The backward (flash-style) recomputes
each block's probabilities from the merged log-sum-exp, passes the keys and values around the ring again
and, with them, the key/value gradients accumulated so far, which arrive at their owner after the last
step. Saved for the backward: the queries, this rank's own keys and values, the output and its
log-sum-exp; never the other ranks' keys and values (the all-gather form saves the whole sequence's).

Each block runs the math path here (scores, log-sum-exp, softmax, in float32 at least): exact in
float64, and the path that applies the position-keyed dropout masks of `model/keyed_dropout.py`. The
exchange of step i+1 is posted before step i's blocks and waited for after them, so the transfer runs
behind the attention: gloo sends from its own threads, NCCL runs point-to-point work on its own stream,
which the compute stream waits for only where the received block is read. At C = 1 this is one
process's causal attention (the keyed-dropout path of one process: `CoreAttention`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_eslm import parallel_state
from megatron_eslm.context_parallel.sharding import chunk_ids
from megatron_eslm.distributed import collectives

# (query rows, key columns, causal to the lower right) of the rank's [2L] queries and the held [2L] keys
Block = tuple[slice, slice, bool]
# (query global positions [Lq], key global positions [Lk]) -> keep mask [b, groups, queries/group, Lq, Lk]
KeepMask = Callable[[Tensor, Tensor], Tensor]


def schedule(cp: int, rank: int, step: int, length: int) -> list[Block]:
    """The blocks rank `rank` computes at ring step `step` (chunks of `length` tokens)."""
    src = (rank - step) % cp
    first, second, both = slice(0, length), slice(length, 2 * length), slice(0, 2 * length)
    if step == 0:
        return [(first, first, True), (second, both, True)]
    return [(both, first, False)] if src < rank else [(second, both, False)]


def chunk_positions(cp: int, rank: int, length: int, device: torch.device) -> Tensor:
    """The global positions [2L] of rank `rank`'s two chunks (`sharding.positions` of any rank)."""
    offsets = torch.arange(length, device=device)
    return torch.cat([chunk * length + offsets for chunk in chunk_ids(cp, rank)])


@dataclass(frozen=True)
class AttentionDropout:
    """Attention dropout of the ring: probability `p`, masks from `keep_mask` (keyed by position)."""
    p: float
    keep_mask: KeepMask


def _causal_lower_right(rows: int, cols: int, device: torch.device) -> Tensor:
    """[rows, cols] True where a query may see a key, the diagonal aligned to the lower right."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril(cols - rows)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """q [b, g, n, Lq, d] (n queries per key/value group), k [b, g, 1, Lk, d] -> float scores [b, g, n, Lq, Lk]."""
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~_causal_lower_right(q.shape[-2], k.shape[-2], q.device), -math.inf)
    return scores


def _dropped(probs: Tensor, dropout: AttentionDropout | None, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    if dropout is None:
        return probs
    return probs * dropout.keep_mask(q_pos, k_pos) / (1.0 - dropout.p)


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, dropout: AttentionDropout | None = None,
                  q_pos: Tensor | None = None, k_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One block's attention: (output [b, g, n, Lq, d], log-sum-exp [b, g, n, Lq]), both float32 at least.
    With `dropout`, the positions name the rows and columns of the block's mask."""
    scores = _scores(q, k, causal, scale)
    lse = scores.logsumexp(-1)
    probs = _dropped(torch.exp(scores - lse.unsqueeze(-1)), dropout, q_pos, k_pos)
    return torch.matmul(probs, v.to(probs.dtype)), lse


def merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial softmaxes over disjoint keys -> the softmax over both (a row with no keys so far has
    lse -inf and weight 0)."""
    merged = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - merged).unsqueeze(-1)
            + block_out * torch.exp(block_lse - merged).unsqueeze(-1)), merged


def block_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, causal: bool,
                   scale: float, dropout: AttentionDropout | None = None, q_pos: Tensor | None = None,
                   k_pos: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One block's share of (dq, dk, dv), float32 at least, from the merged `lse` and delta = rowsum(dout *
    out) (flash attention's backward): P = exp(S - lse) are the block's final probabilities, and
    dS = P * (dP - delta) with dP = dout V^T (times the block's dropout mask)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    probs = torch.exp(_scores(q, k, causal, scale) - lse.unsqueeze(-1))
    kept = _dropped(probs, dropout, q_pos, k_pos)
    dv = torch.matmul(kept.transpose(-1, -2), dout).sum(2, keepdim=True)
    dprobs = _dropped(torch.matmul(dout, v.to(wide).transpose(-1, -2)), dropout, q_pos, k_pos)
    dscores = probs * (dprobs - delta.unsqueeze(-1)) * scale
    dq = torch.matmul(dscores, k.to(wide))
    dk = torch.matmul(dscores.transpose(-1, -2), q.to(wide)).sum(2, keepdim=True)
    return dq, dk, dv


class Exchange(Protocol):
    """One ring hop: `start(tensors)` sends them to the next rank and posts the receives from the
    previous one; `wait()` returns what arrived (shaped like what was sent)."""

    def start(self, tensors: list[Tensor]) -> None: ...

    def wait(self) -> list[Tensor]: ...


class GroupExchange:
    """The hop over the context-parallel group: one batch of isend/irecv, counted as "cp send"/"cp recv"."""

    def __init__(self) -> None:
        group, cp, rank = (parallel_state.context_parallel_group(), parallel_state.context_parallel_size(),
                           parallel_state.context_parallel_rank())
        self.group = group
        self.next, self.prev = (dist.get_global_rank(group, (rank + 1) % cp),
                                dist.get_global_rank(group, (rank - 1) % cp))
        self.received: list[Tensor] = []
        self.requests: list = []

    def start(self, tensors: list[Tensor]) -> None:
        ops = []
        self.received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        for sent, received in zip(tensors, self.received):
            collectives.record(collectives.CP_SEND, collectives.nbytes(sent))
            collectives.record(collectives.CP_RECV, collectives.nbytes(received))
            ops += [dist.P2POp(dist.isend, sent.contiguous(), self.next, group=self.group),
                    dist.P2POp(dist.irecv, received, self.prev, group=self.group)]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[Tensor]:
        for request in self.requests:
            request.wait()
        self.requests = []
        return self.received


class SelfExchange:
    """The hop of a ring of one (C = 1: one process's keyed-dropout attention): what was sent arrives."""

    def __init__(self) -> None:
        self.received: list[Tensor] = []

    def start(self, tensors: list[Tensor]) -> None:
        self.received = tensors

    def wait(self) -> list[Tensor]:
        return self.received


@dataclass(frozen=True)
class Ring:
    """Where a rank sits in the ring and how it talks to its neighbours."""
    cp: int
    rank: int
    kv_exchange: Exchange
    grad_exchange: Exchange


def _positions(ring: Ring, step: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(this rank's query positions, the held keys' positions) at `step`."""
    return (chunk_positions(ring.cp, ring.rank, length, device),
            chunk_positions(ring.cp, (ring.rank - step) % ring.cp, length, device))


def ring_forward(q: Tensor, kv: Tensor, ring: Ring, scale: float,
                 dropout: AttentionDropout | None) -> tuple[Tensor, Tensor]:
    """q [b, g, n, 2L, d], kv [2, b, g, 1, 2L, d] -> (out float [b, g, n, 2L, d], lse [b, g, n, 2L])."""
    length = q.shape[-2] // 2
    wide = torch.promote_types(q.dtype, torch.float32)
    out = q.new_zeros(q.shape, dtype=wide)
    lse = q.new_full(q.shape[:-1], -math.inf, dtype=wide)
    held = kv
    for step in range(ring.cp):
        if step < ring.cp - 1:
            ring.kv_exchange.start([held])  # the next step's block travels while this one's attention runs
        q_pos, k_pos = _positions(ring, step, length, q.device) if dropout else (None, None)
        for rows, cols, causal in schedule(ring.cp, ring.rank, step, length):
            block_out, block_lse = block_forward(q[..., rows, :], held[0][..., cols, :], held[1][..., cols, :],
                                                 causal, scale, dropout,
                                                 q_pos[rows] if dropout else None, k_pos[cols] if dropout else None)
            out[..., rows, :], lse[..., rows] = merge(out[..., rows, :], lse[..., rows], block_out, block_lse)
        if step < ring.cp - 1:
            held, = ring.kv_exchange.wait()
    return out, lse


def ring_backward(q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, dout: Tensor, ring: Ring, scale: float,
                  dropout: AttentionDropout | None) -> tuple[Tensor, Tensor]:
    """(dq [b, g, n, 2L, d], dkv [2, b, g, 1, 2L, d]) in q's and kv's dtypes. The keys and values go round
    again; each block's key/value gradient travels with the ranks that add to it and reaches its owner
    after the last step (one hop more than the keys and values)."""
    length = q.shape[-2] // 2
    wide = torch.promote_types(q.dtype, torch.float32)
    dout = dout.to(wide)
    delta = (dout * out.to(wide)).sum(-1)
    dq = torch.zeros_like(q, dtype=wide)
    held = kv
    for step in range(ring.cp):
        if step < ring.cp - 1:
            ring.kv_exchange.start([held])
        q_pos, k_pos = _positions(ring, step, length, q.device) if dropout else (None, None)
        dkv = kv.new_zeros(kv.shape, dtype=wide)
        for rows, cols, causal in schedule(ring.cp, ring.rank, step, length):
            dq_block, dk, dv = block_backward(q[..., rows, :], held[0][..., cols, :], held[1][..., cols, :],
                                              dout[..., rows, :], lse[..., rows], delta[..., rows], causal, scale,
                                              dropout, q_pos[rows] if dropout else None,
                                              k_pos[cols] if dropout else None)
            dq[..., rows, :] += dq_block
            dkv[0][..., cols, :] += dk
            dkv[1][..., cols, :] += dv
        if step > 0:
            dkv += ring.grad_exchange.wait()[0]  # what the ranks before added to this block
        ring.grad_exchange.start([dkv])
        if step < ring.cp - 1:
            held, = ring.kv_exchange.wait()
    dkv, = ring.grad_exchange.wait()  # this rank's own keys and values, every rank's share summed
    return dq.to(q.dtype), dkv.to(kv.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, kv: Tensor, ring: Ring, scale: float, dropout: AttentionDropout | None) -> Tensor:
        out, lse = ring_forward(q, kv, ring, scale, dropout)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.ring, ctx.scale, ctx.dropout = ring, scale, dropout
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, kv, out, lse = ctx.saved_tensors
        dq, dkv = ring_backward(q, kv, out, lse, dout, ctx.ring, ctx.scale, ctx.dropout)
        return dq, dkv, None, None, None


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, ring: Ring, dropout: AttentionDropout | None = None) -> Tensor:
    """q [b, 2L, heads, d], k and v [b, 2L, groups, d] (query head i uses group i // (heads / groups)) ->
    [b, 2L, heads, d], causal attention over the whole sequence as `ring` holds it."""
    b, s, heads, d = q.shape
    groups = k.shape[2]
    grouped_q = q.view(b, s, groups, heads // groups, d).permute(0, 2, 3, 1, 4)  # [b, g, n, s, d]
    kv = torch.stack([k, v]).permute(0, 1, 3, 2, 4).unsqueeze(3).contiguous()  # [2, b, g, 1, s, d]: sent whole
    out = _RingAttention.apply(grouped_q, kv, ring, 1.0 / math.sqrt(d), dropout)
    return out.permute(0, 3, 1, 2, 4).reshape(b, s, heads, d)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, dropout: AttentionDropout | None = None) -> Tensor:
    """`grouped_attention` over this rank's context-parallel group (at C = 1 over the whole sequence)."""
    cp = parallel_state.context_parallel_size()
    exchange = GroupExchange if cp > 1 else SelfExchange
    ring = Ring(cp, parallel_state.context_parallel_rank(), exchange(), exchange())
    return grouped_attention(q, k, v, ring, dropout)
