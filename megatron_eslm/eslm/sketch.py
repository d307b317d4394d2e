"""A fixed-size, mergeable quantile sketch of the scores, so the VaR threshold of a selection group costs
one all-gather of a few kilobytes per rank instead of gathering every score.

Sketch. Each rank sorts its n_r finite valid scores y_0 <= ... <= y_(n_r-1) and cuts them into
m_r = min(m, n_r) contiguous blocks, block b = [floor(b n_r / m_r), floor((b+1) n_r / m_r)), each of
floor(n_r / m_r) or ceil(n_r / m_r) scores. It sends the min of every block plus a header (n_r and its
count of non-finite scores): m + 2 int32 words whatever n_r is, so all ranks all-gather equal shapes.
A receiver recomputes every block's size from n_r, so merging loses nothing more: the merged sketch is
exactly the multiset Z of all n = sum_r n_r scores with every score rounded down to its block's min.
A rank with n_r <= m has blocks of one score, so its part of Z is exact.

Bound. Let x_(0) <= ... <= x_(n-1) be all scores, z_(0) <= ... <= z_(n-1) the merged sketch, and the
slack E = sum over non-empty ranks of (ceil(n_r / m) - 1) = sum_r floor((n_r - 1) / m) <= (n - R') / m
< n / m, with R' the non-empty ranks (E = 0 when every n_r <= m).
  (1) z_(j) <= x_(j): rounding every score down can only lower each order statistic.
  (2) z_(j) >= x_(max(j - E, 0)). Fix v. A score x >= v is rounded below v only if its block's min is
      below v; blocks are contiguous in sorted order, so on rank r only the last block whose min is
      below v can hold such scores, at most ceil(n_r / m_r) - 1 = floor((n_r - 1) / m) of them. Hence
      #{z < v} <= #{x < v} + E; with v = x_(j-E) the right side is <= j, so z_(j) >= v. (If j < E,
      z_(j) is some score, so it is >= x_(0).)
Every z is a real score, so z_(j) = x_(k') for some rank k' in [max(j - E, 0), j]: with ties the ranks
where x equals z_(j) form an interval, and (1)-(2) make it meet that one.
`MergedSketch.estimate(k)` returns z_(k): the threshold the exact rule gives at a rank k' with
k - B <= k' <= k, B = min(E, k). The exact kept count at rank i, n - #{x < x_(i)}, is non-increasing in
i, so the sketch keeps at least what the exact rule keeps and at most kept(k - B): it errs only towards
training on more tokens, and alpha = 0 (k = 0, z_(0) = the group's min) stays exactly dense. With
distinct scores kept(i) = n - i, so the kept count exceeds the exact one by at most B tokens.
With ties no summary smaller than the data can bound the kept count in tokens: a rank holding 1000
zeros and 1000 ones, or 999 zeros and 1001 ones, has the same sketch unless a block starts at index
999, yet the exact rule at k = 999 keeps 2000 tokens in the first case and 1001 in the second.

`MergedSketch.bracket(k)` gives [a, b] = [z_(k), z_(k+E)] (b = +inf when k + E > n - 1): x_(k) lies in
it by (1) and (2), and at most 2E - 1 scores lie strictly inside it, since #{x <= a} >= k - E + 1 and
#{x < b} <= k + E. That is what makes the exact refinement round of `distributed_threshold` cheap.

Sketch of sketches (`RunningSketch`, the previous-step scope's state). Say a multiset Y of n values
sigma-approximates X (n values) from below when 0 <= #{y < v} - #{x < v} <= sigma for every v; (1) and
(2) above follow from that with E = sigma, and it is what the rounding shows: the merged sketch
sigma-approximates the scores with sigma = E. Differences of counts add up, so (a) the union of Y1
sigma1-approximating X1 and Y2 sigma2-approximating X2 (sigma1 + sigma2)-approximates X1 + X2, and (b) a
tau-approximation of a sigma-approximation of X is a (sigma + tau)-approximation of X. `compact` rounds
the merged sketch (itself a multiset of N values) down to m contiguous blocks, as one rank of N scores
would: a tau-approximation of it, tau = floor((N - 1) / m), and 0 when N <= m. Merging micro-batch t's
payloads (slack E_t) into the compacted sketch of micro-batches 1..t-1 and compacting again gives, by
(a) and (b), sigma_t = sigma_(t-1) + E_t + floor((N_t - 1) / m), N_t the scores of micro-batches 1..t:
    sigma = sum over t of E_t + sum over t of floor((N_t - 1) / m)    after M micro-batches,
and the bound above holds with E = sigma (`MergedSketch.slack` of `RunningSketch.merged`): compacting
keeps points of the merged sketch, so every value is still a real score. With M micro-batches of n
scores each the compactions add about (M + 1) / 2 x N / m to the merges' E < N / m, N = M n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HEADER = 2  # int32 words before the block minima: the sketched count and the non-finite count
MAX_COUNT = 2**31 - 1  # counts travel as int32


def sketch_words(size: int) -> int:
    """Length of one rank's payload, in int32 words."""
    return HEADER + size


def _block_starts(counts: Tensor, size: int) -> Tensor:
    """Start index of every block of each rank's sorted scores: [..., size] for counts [...]. Blocks
    past a rank's min(size, count) blocks are empty and start at the count."""
    counts = counts.long().unsqueeze(-1)
    blocks = counts.clamp(min=1, max=size)
    ordinals = torch.arange(size, device=counts.device)
    return torch.minimum(ordinals * counts // blocks, counts)


def _slack(counts: Tensor, size: int) -> Tensor:
    """E: sum over non-empty payloads of floor((n_r - 1) / m), 0-dim int64."""
    return ((counts.long() - 1).clamp(min=0) // size).sum()


def _block_sizes(counts: Tensor, size: int) -> Tensor:
    starts = _block_starts(counts, size)
    return torch.cat([starts[..., 1:], counts.long().unsqueeze(-1)], dim=-1) - starts


def build_sketch(sorted_scores: Tensor, count: Tensor, nonfinite: Tensor, size: int) -> Tensor:
    """This rank's payload: [count, nonfinite, min of every block] as int32 words (floats bit-cast).

    `sorted_scores` is ascending with the `count` finite scores first and at least one +inf after them
    (a sentinel), so that empty blocks, which start at `count`, read +inf even on an empty rank."""
    if sorted_scores.numel() > MAX_COUNT:
        raise ValueError(f"a rank can sketch at most {MAX_COUNT} scores, got {sorted_scores.numel()}")
    minima = sorted_scores.float()[_block_starts(count, size)]
    header = torch.stack([count, nonfinite]).to(torch.int32)
    return torch.cat([header, minima.view(torch.int32)])


@dataclass
class MergedSketch:
    """The group's merged sketch: every score rounded down to its block's min, as weighted sorted points.
    Counts are 0-dim int64 tensors on the payloads' device: reading a quantile needs no host sync."""

    points: Tensor  # [R * size] ascending block minima (fp32)
    cumulative: Tensor  # [R * size] int64: how many scores the points up to here stand for
    count: Tensor  # n, finite valid scores in the group
    nonfinite: Tensor  # valid scores in the group that were NaN or +-inf
    slack: Tensor  # E of the module docstring

    @classmethod
    def merge(cls, payloads: Tensor, size: int, carried: Tensor | int = 0) -> MergedSketch:
        """Merge the all-gathered payloads [R, size + HEADER], on their device. `carried`: slack the
        payloads' multisets already have against the scores they stand for (a compacted payload's earlier
        merges), added to E."""
        counts, nonfinite = payloads[:, 0].long(), payloads[:, 1].long()
        points, order = payloads[:, HEADER:].contiguous().view(torch.float32).flatten().sort()
        cumulative = _block_sizes(counts, size).flatten()[order].cumsum(0)
        return cls(points, cumulative, counts.sum(), nonfinite.sum(), _slack(counts, size) + carried)

    def compact(self, size: int) -> Tensor:
        """One payload of `size` blocks standing for this sketch, as one rank of n scores would sketch
        them: the order statistics z_(start) at the block starts of n (+inf for empty blocks), n and the
        non-finite count. Its multiset is this one rounded down blockwise: floor((n - 1) / size) more
        slack (none when n <= size)."""
        torch._assert_async(self.count <= MAX_COUNT, f"a sketch can stand for at most {MAX_COUNT} scores")
        starts = _block_starts(self.count, size)
        minima = self.order_statistic(starts).masked_fill(starts >= self.count, float("inf"))
        header = torch.stack([self.count, self.nonfinite]).to(torch.int32)
        return torch.cat([header, minima.view(torch.int32)])

    def order_statistic(self, j: Tensor | int) -> Tensor:
        """z_(j), 0-based, as fp32 (j: int64 indices of any shape; +inf where j >= n, e.g. n = 0)."""
        index = torch.searchsorted(self.cumulative, torch.as_tensor(j, device=self.cumulative.device), right=True)
        return self.points.take(index.clamp(max=self.points.numel() - 1))  # take: a 0-dim index is not read

    def estimate(self, k: Tensor | int) -> tuple[Tensor, Tensor]:
        """(z_(k), B): z_(k) is what the exact rule gives at some rank in [k - B, k]."""
        k = torch.as_tensor(k, device=self.cumulative.device)
        return self.order_statistic(k), torch.minimum(self.slack, k)

    def bracket(self, k: Tensor | int) -> tuple[Tensor, Tensor]:
        """[a, b] holding x_(k), with at most 2E - 1 scores strictly between a and b (b = +inf when
        k + E > n - 1)."""
        upper = k + self.slack
        return self.order_statistic(k), self.order_statistic(upper).masked_fill(upper >= self.count, float("inf"))


@dataclass
class RunningSketch:
    """Sketches merged one after another into one payload of m blocks (the previous-step scope's state:
    4 (m + 2) bytes however many ranks and micro-batches), with the slack its merges and compactions add
    up to (module docstring: sketch of sketches)."""

    payload: Tensor  # [size + HEADER] int32, a payload as one rank of n scores would send it
    carried: Tensor  # 0-dim int64: sigma minus the payload's own floor((n - 1) / m), the earlier rounds' slack

    @classmethod
    def absorb(cls, running: RunningSketch | None, payloads: Tensor, size: int) -> RunningSketch:
        """`running` (None: nothing yet) with the gathered payloads [R, size + HEADER] merged in and
        compacted back to `size` blocks. The merge counts the running payload's own floor((n - 1) / m) as
        its slack, so the new carried slack is the merge's: sigma_(t-1) + E_t."""
        carried = 0
        if running is not None:
            payloads = torch.cat([running.payload.to(payloads.device).unsqueeze(0), payloads])
            carried = running.carried.to(payloads.device)
        merged = MergedSketch.merge(payloads, size, carried)
        return cls(merged.compact(size), merged.slack)

    def merged(self, size: int, device: torch.device | None = None) -> MergedSketch:
        """The sketch to read quantiles from; its slack is sigma, the bound's E."""
        return MergedSketch.merge(self.payload.to(device).unsqueeze(0), size, self.carried.to(device))

    def state_dict(self) -> dict:
        return {"payload": self.payload.cpu(), "carried": int(self.carried)}

    @classmethod
    def from_state(cls, state: dict | None) -> RunningSketch | None:
        return None if state is None else cls(state["payload"], torch.tensor(int(state["carried"])))
