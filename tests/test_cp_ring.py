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


def ring_errors(device: str, dtype: torch.dtype, cp: int, b: int, s: int, heads: int, groups: int,
                d: int) -> list[float]:
    """C simulated ranks' ring attention (forward, then backward of a random output gradient) against
    `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` of the whole sequence: the largest
    errors of the output and the q, k, v gradients, each relative to the reference's largest magnitude."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, s, heads, d, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(b, s, groups, d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn(b, s, heads, d, generator=gen, device=device, dtype=dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in full), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    want_grads = torch.autograd.grad(want, full, dout)

    def work(rank, r):
        mine = [shard_sequence(t, cp, rank).requires_grad_() for t in (q, k, v)]
        out = ring.grouped_attention(*mine, r)
        return (out.detach(), *torch.autograd.grad(out, mine, shard_sequence(dout, cp, rank)))

    per_rank = run_ranks(cp, work)
    errors = []
    for i, expected in enumerate((want.detach(), *want_grads)):
        expected_shards = torch.cat([shard_sequence(expected, cp, r) for r in range(cp)], 1).double()
        got = torch.cat([result[i] for result in per_rank], 1).double()
        errors.append(float((got - expected_shards).abs().max() / expected_shards.abs().max()))
    return errors


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_ring_equals_causal_attention_float64(cp):
    """Forward and backward of C ranks' ring attention, grouped queries (4 heads over 2 key/value groups),
    against one process's causal attention."""
    errors = ring_errors("cpu", torch.float64, cp, b=2, s=2 * cp * 3, heads=4, groups=2, d=8)
    assert max(errors) <= 1e-14, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the ring's blocks on the GPU against fused SDPA)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_ring_with_grouped_queries(dtype):
    """On CUDA, the Llama shape (head dim 128, 4 queries per key/value head), CP4: the ring's blocks (the
    diagonal ones causal to the lower right) and merge equal fused causal SDPA (bf16 to its rounding)."""
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5  # of the largest magnitude
    errors = ring_errors("cuda", dtype, cp=4, b=2, s=1024, heads=8, groups=2, d=128)
    assert max(errors) <= tolerance, errors


def test_ring_with_keyed_dropout_equals_masked_attention_float64():
    """Two simulated ranks with attention dropout keyed by position (`model/keyed_dropout.py`): each rank
    draws its blocks' masks from (site, row, head, query and key positions), and the merged output and its
    gradients equal one process's softmax(causal scores) * mask / (1 - p) @ V with the mask of the whole
    sequence from the same keys."""
    from megatron_eslm.model.keyed_dropout import attention_dropout, keep_mask
    cp, p = 2, 0.3
    gen = torch.Generator().manual_seed(1)
    b, s, heads, groups, d = 2, 2 * cp * 3, 4, 2, 8
    q = torch.randn(b, s, heads, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, s, groups, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(b, s, heads, d, generator=gen, dtype=torch.float64)

    torch.manual_seed(5)
    dropout = attention_dropout(p, q, groups)  # draws the site's key from the default generator
    torch.manual_seed(5)
    key = torch.randint(0, 1 << 62, (), dtype=torch.int64)  # the same draw
    positions = torch.arange(s)
    mask = keep_mask(key, p, torch.arange(b).view(b, 1, 1, 1), torch.arange(heads).view(1, heads, 1, 1),
                     positions.view(-1, 1), positions.view(1, -1))
    assert abs(float(mask.tril().sum() / torch.ones(s, s).tril().sum() / (b * heads)) - (1 - p)) < 0.1
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in full)
    kh, vh = (t.repeat_interleave(heads // groups, dim=1) for t in (kh, vh))
    scores = (qh @ kh.transpose(-1, -2) / d ** 0.5).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(),
                                                               float("-inf"))
    want = ((scores.softmax(-1) * mask / (1 - p)) @ vh).transpose(1, 2)
    want_grads = torch.autograd.grad(want, full, dout)

    def work(rank, r):
        mine = [shard_sequence(t, cp, rank).requires_grad_() for t in (q, k, v)]
        out = ring.grouped_attention(*mine, r, dropout)
        return (out.detach(), *torch.autograd.grad(out, mine, shard_sequence(dout, cp, rank)))

    per_rank = run_ranks(cp, work)
    for i, expected in enumerate((want.detach(), *want_grads)):
        expected_shards = torch.cat([shard_sequence(expected, cp, r) for r in range(cp)], 1)
        torch.testing.assert_close(torch.cat([result[i] for result in per_rank], 1), expected_shards, rtol=0,
                                   atol=1e-13)


def test_keep_mask_is_keyed_by_index_alone():
    """A slice of the indices gives the slice of the mask (what each shard computes of the whole), another
    key another mask, and the kept fraction is 1 - p."""
    from megatron_eslm.model.keyed_dropout import keep_mask
    key, rows, positions = torch.tensor(11), torch.arange(4).view(4, 1), torch.arange(4096).view(1, -1)
    whole = keep_mask(key, 0.25, rows, positions)
    assert torch.equal(keep_mask(key, 0.25, rows[1:3], positions[:, 100:200]), whole[1:3, 100:200])
    assert not torch.equal(keep_mask(torch.tensor(12), 0.25, rows, positions), whole)
    assert abs(float(whole.double().mean()) - 0.75) < 0.01
