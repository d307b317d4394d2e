"""Tail metrics of an evaluation (eslm/tail_metrics.py): CVaR of known losses, exactly, with ties and
non-finite values, over a simulated group equal to one process, and in the trainer's eval records."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from helpers import flags
from megatron_eslm.config import parse_args
from megatron_eslm.eslm.distributed_threshold import LocalCollectives
from megatron_eslm.eslm.tail_metrics import above_threshold_fraction, cvar_over
from megatron_eslm.training.trainer import Trainer
from test_sketch import ThreadCollectives, ThreadGroup


def cvar(values: list[float], q: float) -> float:
    valid = torch.ones(len(values), dtype=torch.bool)
    return float(cvar_over(LocalCollectives(), torch.tensor(values), valid, q))


def test_cvar_of_known_losses():
    assert cvar([float(i) for i in range(1, 11)], 0.5) == 8.0  # (6 + 7 + 8 + 9 + 10) / 5
    assert cvar([float(i) for i in range(1, 11)], 0.9) == 10.0
    assert cvar([1.0, 2.0, 2.0, 2.0, 3.0], 0.5) == pytest.approx(7 / 3)  # worst 3: 3, 2, 2 (ties at the VaR)
    assert cvar([5.0], 0.9) == 5.0
    losses = torch.tensor([1.0, float("nan"), 4.0, 9.0, float("inf")])
    valid = torch.tensor([True, True, True, True, False])
    assert float(cvar_over(LocalCollectives(), losses, valid, 0.5)) == 6.5  # finite valid: 1, 4, 9 -> 4, 9
    assert math.isnan(float(cvar_over(LocalCollectives(), torch.zeros(3), torch.zeros(3, dtype=torch.bool), 0.5)))


def test_group_equals_one_process():
    """Three simulated ranks with uneven token counts give the CVaR and the above-threshold share of their
    concatenation."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=g).exp() for n in (37, 0, 120)]
    valid = [torch.rand(len(p), generator=g) > 0.2 for p in parts]
    group, out = ThreadGroup(3), [None] * 3

    def rank(r: int) -> None:
        comm = ThreadCollectives(group, r)
        out[r] = (float(cvar_over(comm, parts[r], valid[r], 0.9)), float(cvar_over(comm, parts[r], valid[r], 0.5)),
                  float(above_threshold_fraction(comm, parts[r], valid[r], 1.5)))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values, mask = torch.cat(parts), torch.cat(valid)
    one = (float(cvar_over(LocalCollectives(), values, mask, 0.9)), float(cvar_over(LocalCollectives(), values, mask, 0.5)),
           float(above_threshold_fraction(LocalCollectives(), values, mask, 1.5)))
    kept = values[mask].sort(descending=True).values
    assert one[0] == pytest.approx(float(kept[:len(kept) - math.floor(0.9 * len(kept))].mean()), rel=1e-6)
    assert all(o == pytest.approx(one) for o in out)


def test_eval_records_carry_the_tail(tiny_corpus):
    trainer = Trainer(parse_args(flags(tiny_corpus, "--eval-iters", "2")))
    before = trainer.evaluate()
    assert before["val_above_threshold"] is None  # no training threshold logged yet
    trainer.train()
    after = trainer.evaluate()
    trainer.close()
    for record in (before, after):
        assert record["val_loss"] < record["val_cvar50"] < record["val_cvar90"]
    assert 0.0 < after["val_above_threshold"] < 1.0
