"""The ring form of context parallelism (`context_parallel/ring.py`, --cp-comm-type p2p) in one process:
its schedule covers every causal block once, and C simulated ranks (threads passing blocks through
queues, as the context group would) give one process's causal attention and its gradients in float64,
with grouped queries."""
from __future__ import annotations

import queue
import threading

import pytest
import torch
import torch.nn.functional as F

from megatron_eslm.context_parallel import ring
from megatron_eslm.context_parallel.sharding import shard_sequence


class QueueExchange:
    """A hop of a simulated ring: rank r's sends land in rank r + 1's queue."""

    def __init__(self, inboxes: list[queue.Queue], rank: int):
        self.inboxes, self.rank = inboxes, rank

    def start(self, tensors):
        self.inboxes[(self.rank + 1) % len(self.inboxes)].put([t.clone() for t in tensors])

    def wait(self):
        return self.inboxes[self.rank].get(timeout=60)


def simulated_rings(cp: int) -> list[ring.Ring]:
    kv, grad = ([queue.Queue() for _ in range(cp)] for _ in range(2))
    return [ring.Ring(cp, r, QueueExchange(kv, r), QueueExchange(grad, r)) for r in range(cp)]


def run_ranks(cp: int, work) -> list:
    """`work(rank, ring)` on C threads at once (each blocks on its neighbours' messages)."""
    results, errors = [None] * cp, []

    def run(rank, r):
        try:
            results[rank] = work(rank, r)
        except BaseException as err:  # noqa: BLE001  (re-raised below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank, r)) for rank, r in enumerate(simulated_rings(cp))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_schedule_covers_every_causal_block_once(cp):
    """Over the C steps each (query, key) pair with key <= query is computed exactly once on some rank, and
    every rank computes as many of them."""
    length = 2
    seen = torch.zeros(2 * cp * length, 2 * cp * length, dtype=torch.int64)
    work = []
    for rank in range(cp):
        before = int(seen.sum())
        for step in range(cp):
            q_pos = ring.chunk_positions(cp, rank, length, torch.device("cpu"))
            k_pos = ring.chunk_positions(cp, (rank - step) % cp, length, torch.device("cpu"))
            for rows, cols, causal in ring.schedule(cp, rank, step, length):
                q, k = q_pos[rows], k_pos[cols]
                visible = ring._causal_lower_right(len(q), len(k), q.device) if causal else \
                    torch.ones(len(q), len(k), dtype=torch.bool)
                seen[q.unsqueeze(1).expand_as(visible)[visible], k.unsqueeze(0).expand_as(visible)[visible]] += 1
        work.append(int(seen.sum()) - before)
    assert torch.equal(seen, torch.ones_like(seen).tril())
    assert len(set(work)) == 1, work


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_ring_equals_causal_attention_float64(cp):
    """Forward and backward of C ranks' ring attention, grouped queries (4 heads over 2 key/value groups),
    against `scaled_dot_product_attention(is_causal=True)` of the whole sequence."""
    gen = torch.Generator().manual_seed(0)
    b, s, heads, groups, d = 2, 2 * cp * 3, 4, 2, 8
    q = torch.randn(b, s, heads, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, s, groups, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(b, s, heads, d, generator=gen, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in full), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    want_grads = torch.autograd.grad(want, full, dout)

    def work(rank, r):
        mine = [shard_sequence(t, cp, rank).requires_grad_() for t in (q, k, v)]
        out = ring.grouped_attention(*mine, r)
        return (out.detach(), *torch.autograd.grad(out, mine, shard_sequence(dout, cp, rank)))

    per_rank = run_ranks(cp, work)
    for i, expected in enumerate((want.detach(), *want_grads)):
        expected_shards = torch.cat([shard_sequence(expected, cp, r) for r in range(cp)], 1)
        got = torch.cat([result[i] for result in per_rank], 1)
        torch.testing.assert_close(got, expected_shards, rtol=0, atol=1e-13)
