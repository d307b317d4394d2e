"""Non-finite steps and rollback (training/rollback.py): a NaN step is skipped on every rank (parameters and
optimizer state untouched) and counted; repeated, or on a loss spike, the run rolls back to its vetted
snapshot and equals a run in which every iteration since that snapshot was skipped."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Callable, ContextManager, Iterator

import pytest
import torch
from torch.utils import _pytree as pytree

from helpers import flags, launch_pretrain, without_timing
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.host_syncs import HostSyncCounter
from megatron_eslm.training.checkpointing import checkpoint_file
from megatron_eslm.training.rollback import Snapshot
from megatron_eslm.training.trainer import Trainer

ITERS = 12


def train(corpus, *extra):
    """(trainer, records, rollback events) of a tiny ESLM run with every iteration logged."""
    events = []
    trainer = Trainer(parse_args(flags(corpus, "--train-iters", str(ITERS), "--selection", "eslm", *extra)))
    write = trainer.metrics.write
    trainer.metrics.write = lambda record: (events.append(record) if "event" in record else None, write(record))
    records = trainer.train()
    trainer.close()
    return trainer, records, events


def assert_equal_trees(a, b) -> None:
    """Equal structure, and tensors equal bit for bit (the optimizer's lr, set each step, excepted)."""
    (leaves_a, spec_a), (leaves_b, spec_b) = pytree.tree_flatten(a), pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else True


def assert_same_state(a: Trainer, b: Trainer) -> None:
    assert_equal_trees(a.model.state_dict(), b.model.state_dict())
    assert_equal_trees(a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"])


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_nan_step_is_skipped_and_counted(tiny_corpus, tmp_path, impl):
    """Injected at iteration 3: that step changes nothing (its checkpoint's model and optimizer state equal
    iteration 2's), the next one trains again, and the records count the skip."""
    save = str(tmp_path / "ckpt")
    _, records, _ = train(tiny_corpus, "--optimizer-impl", impl, "--inject-nan-at-iterations", "3",
                          "--train-iters", "5", "--save", save, "--save-interval", "1")
    two, three, four = (torch.load(checkpoint_file(save, i), weights_only=False) for i in (2, 3, 4))
    for key in ("model", "optimizer"):
        assert_equal_trees(two[key], three[key])
    assert not all(torch.equal(x, four["model"][name]) for name, x in three["model"].items())
    assert [r["skipped_iterations"] for r in records] == [0, 0, 1, 0, 0]
    assert [r["consecutive_skips"] for r in records] == [0, 0, 1, 0, 0]


def test_repeated_nan_rolls_back_to_the_vetted_snapshot(tiny_corpus):
    """Snapshots at 2, 4, 6 (vetted by the next interval); NaN at 6, 7, 8 -> rollback at 8 to the snapshot of
    4 (6's snapshot is not vetted: its next interval skipped), undoing the update of 5. Equal, records and
    state, to the run where 5 to 8 were all skipped and nothing rolled back."""
    rolled, records, events = train(tiny_corpus, "--snapshot-interval", "2", "--inject-nan-at-iterations",
                                    "6", "7", "8")
    assert [(e["iteration"], e["restored_iteration"], e["source"]) for e in events] == [(8, 4, "snapshot")]
    skipped, reference, _ = train(tiny_corpus, "--max-consecutive-skips", "0", "--inject-nan-at-iterations",
                                  "5", "6", "7", "8")
    assert_same_state(rolled, skipped)
    after = lambda rs: [{k: v for k, v in r.items() if k not in ("skipped_iterations", "consecutive_skips")}
                        for r in without_timing(rs) if r["iteration"] > 8]
    assert after(records) == after(reference)


def test_loss_spike_rolls_back_and_equals_the_skipped_run(tiny_corpus):
    """At a learning rate of 0.3 without clipping the loss jumps (7.56 at iteration 5 after 6.0 at 4): every
    rollback turns the iterations since its snapshot into skipped ones, so the run equals the one that
    skips exactly those."""
    common = ["--selection", "none", "--lr", "0.3", "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
              "--clip-grad", "0"]
    rolled, _, events = train(tiny_corpus, *common, "--snapshot-interval", "1", "--rollback-on-spike", "1.2")
    assert events, "no spike at this rate: the test needs one"
    skip = sorted({i for e in events for i in range(e["restored_iteration"] + 1, e["iteration"] + 1)})
    assert all(e["restored_iteration"] < e["iteration"] for e in events)
    skipped, _, _ = train(tiny_corpus, *common, "--max-consecutive-skips", "0", "--inject-nan-at-iterations",
                          *map(str, skip))
    assert_same_state(rolled, skipped)


def test_without_a_snapshot_or_checkpoint_it_stops_in_one_line(tiny_corpus):
    with pytest.raises(UserError, match=r"iteration 3: 3 consecutive non-finite steps .* no snapshot"):
        train(tiny_corpus, "--inject-nan-at-iterations", "1", "2", "3")


def test_without_a_snapshot_it_rolls_back_to_the_checkpoint(tiny_corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    _, _, events = train(tiny_corpus, "--save", save, "--save-interval", "2", "--inject-nan-at-iterations",
                         "5", "6", "7")
    assert [(e["iteration"], e["restored_iteration"], e["source"]) for e in events] == \
        [(7, 6, f"checkpoint {save}")]  # the checkpoint of 6 holds the state of 4: 5 and 6 were skipped


@pytest.mark.parametrize("argv, message", [
    (["--snapshot-interval", "3", "--log-interval", "2"], "--snapshot-interval 3 is not a multiple of "
                                                          "--log-interval 2"),
    (["--snapshot-replicas", "1"], "--snapshot-replicas needs --snapshot-interval"),
    (["--snapshot-replicas", "2", "--snapshot-interval", "1"], "--snapshot-replicas must be 0 or 1"),
    (["--rollback-on-spike", "2"], "--rollback-on-spike needs --snapshot-interval"),
    (["--rollback-on-spike", "0.5", "--snapshot-interval", "1"], "--rollback-on-spike must be above 1"),
    (["--max-consecutive-skips", "-1"], "--max-consecutive-skips must be >= 0"),
    (["--inject-nan-at-iterations", "0"], "--inject-nan-at-iterations: iterations start at 1"),
    (["--snapshot-interval", "2", "--deepspeed"], "--snapshot-interval is not available under --deepspeed"),
])
def test_bad_values_in_one_line(tiny_corpus, argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags(tiny_corpus, *argv))


def check_skip_and_snapshot_round_trip(corpus, without_sync: Callable[[], ContextManager], *extra: str) -> None:
    """The fused AdamW skips a NaN step on the device: under `without_sync` (which fails on a host sync) the
    weights stay untouched, bit for bit; a snapshot taken before gives them back after a real step."""
    trainer = Trainer(parse_args(flags(corpus, "--selection", "none", "--log-interval", "100",
                                       "--inject-nan-at-iterations", "2", *extra)))
    assert trainer.optimizer.param_groups[0]["fused"]
    assert {p.dtype for p in trainer.model.parameters()} == {torch.get_default_dtype()}
    loader = iter(trainer._loader(trainer.train_ds, len(trainer.train_ds), 0))
    batches = iter([next(loader) for _ in range(3 * trainer.num_micro_batches)])
    stats = trainer.train_step(batches)
    trainer.iteration = 1
    snapshot = Snapshot()
    snapshot.take(1, trainer.checkpoint_state())
    before = copy.deepcopy(trainer.model.state_dict())
    with without_sync():
        stats = trainer.train_step(batches, stats)  # iteration 2: NaN gradients
    trainer.iteration = 2
    assert_equal_trees(before, trainer.model.state_dict())
    trainer.train_step(batches, stats)
    assert not all(torch.equal(before[name], tensor) for name, tensor in trainer.model.state_dict().items())
    trainer.model.load_state_dict(snapshot.state()["model"])
    assert_equal_trees(before, trainer.model.state_dict())
    trainer.close()


@contextlib.contextmanager
def cuda_sync_debug_errors() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def no_counted_sync() -> Iterator[None]:
    """The CPU's stand-in for CUDA's sync debug mode: megatron_eslm.host_syncs counts what would wait."""
    with HostSyncCounter() as syncs:
        yield
    assert syncs.total == 0, syncs.report()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the on-device skip and pinned snapshots need a GPU")
def test_cuda_skip_without_host_sync_and_snapshot_round_trip(tiny_corpus):
    """On a GPU (the fused AdamW is CUDA's default; pinned, non_blocking snapshots), under
    torch.cuda.set_sync_debug_mode("error")."""
    check_skip_and_snapshot_round_trip(tiny_corpus, cuda_sync_debug_errors)


def test_cpu_float64_skip_without_host_sync_and_snapshot_round_trip(tiny_corpus):
    """The CUDA test's twin on the CPU, in float64, with the host-sync counter in place of the debug mode."""
    torch.set_default_dtype(torch.float64)
    try:
        check_skip_and_snapshot_round_trip(tiny_corpus, no_counted_sync, "--optimizer-impl", "fused")
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.slow
def test_rollback_on_two_data_parallel_ranks_equals_one_process(tiny_corpus, tmp_path):
    """DP2 takes the same skips and the same rollback as one process (their records agree to float
    round-off: the data-parallel sums)."""
    extra = ("--train-iters", "10", "--snapshot-interval", "2", "--inject-nan-at-iterations", "6", "7", "8")
    one = launch_pretrain(tiny_corpus, str(tmp_path), 1, (1, 1), "gpt2", *extra)
    two = launch_pretrain(tiny_corpus, str(tmp_path), 2, (1, 1), "gpt2", *extra)
    assert [r["skipped_iterations"] for r in one] == [r["skipped_iterations"] for r in two] == \
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    for a, b in zip(one, two):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), a["iteration"]
    rollbacks = [json.loads(line) for name in os.listdir(tmp_path) if name.startswith("metrics-")
                 for line in open(tmp_path / name) if '"rollback"' in line]
    assert [(r["iteration"], r["restored_iteration"]) for r in rollbacks] == [(8, 4), (8, 4)]
