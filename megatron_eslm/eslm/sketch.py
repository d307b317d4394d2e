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
    """The group's merged sketch: every score rounded down to its block's min, as weighted sorted points."""

    points: Tensor  # [R * size] ascending block minima (fp32)
    cumulative: Tensor  # [R * size] int64: how many scores the points up to here stand for
    count: int  # n, finite valid scores in the group
    nonfinite: int  # valid scores in the group that were NaN or +-inf
    slack: int  # E of the module docstring

    @classmethod
    def merge(cls, payloads: Tensor, size: int) -> MergedSketch:
        """Merge the all-gathered payloads [R, size + HEADER]; one host sync to read the totals."""
        counts, nonfinite = payloads[:, 0].long(), payloads[:, 1].long()
        points, order = payloads[:, HEADER:].contiguous().view(torch.float32).flatten().sort()
        cumulative = _block_sizes(counts, size).flatten()[order].cumsum(0)
        slack = (counts - 1).clamp(min=0) // size
        totals = torch.stack([counts.sum(), nonfinite.sum(), slack.sum()]).tolist()
        return cls(points, cumulative, *totals)

    def order_statistic(self, j: int) -> Tensor:
        """z_(j), 0-based, as a 0-dim fp32 tensor."""
        rank = torch.tensor(j, device=self.cumulative.device)
        return self.points[torch.searchsorted(self.cumulative, rank, right=True)]

    def estimate(self, k: int) -> tuple[Tensor, int]:
        """(z_(k), B): z_(k) is what the exact rule gives at some rank in [k - B, k]."""
        return self.order_statistic(k), min(self.slack, k)

    def bracket(self, k: int) -> tuple[Tensor, Tensor]:
        """[a, b] holding x_(k), with at most 2E - 1 scores strictly between a and b."""
        lower = self.order_statistic(k)
        if k + self.slack >= self.count:
            return lower, lower.new_tensor(float("inf"))
        return lower, self.order_statistic(k + self.slack)
