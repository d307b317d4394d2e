"""Per-phase timers (--timing-log-level) and the throughput fields of the training records (tflops_per_gpu,
mfu, max_memory_allocated; --peak-tflops).

The phases are disjoint (a nested phase pauses its parent) and the work between steps is a phase too
(`logging`), so on a tiny CPU run logged at every iteration, with an evaluation and a checkpoint every
second one, their sum is within 5% of iteration_time_ms; level 0 makes no timer,
adds no time_ field and calls no torch.cuda.synchronize, while a timer on a CUDA device synchronises at
every phase boundary (checked with torch.cuda.synchronize replaced by a counter).
"""
from __future__ import annotations

import pytest
import torch

from helpers import flags, run
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.host_syncs import HostSyncCounter
from megatron_eslm.training import throughput, timers
from megatron_eslm.training.timers import PHASES, Timers, get_timers
from megatron_eslm.training.trainer import Trainer

LEVEL1 = {f"time_{name}_ms" for name, level in PHASES.items() if level == 1}
LEVEL2 = {f"time_{name}_ms" for name in PHASES}


@pytest.fixture
def synchronizations(monkeypatch) -> list[int]:
    """torch.cuda.synchronize replaced by a counter (this CPU build has no CUDA to synchronise)."""
    calls = [0]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_nested_phases_are_disjoint_and_sum_to_the_wall_time(monkeypatch):
    clock = iter(range(100))  # perf_counter ticks 0, 1, 2, ... seconds
    monkeypatch.setattr(timers.time, "perf_counter", lambda: float(next(clock)))
    t = Timers(2, torch.device("cpu"))
    t.start("forward_backward")  # 0
    with t.phase("data"):  # 1 .. 2
        pass
    with t.phase("threshold"):  # 3 .. 6, of which threshold_comm 4 .. 5
        with t.phase("threshold_comm"):
            pass
    t.stop("forward_backward")  # 7
    assert t.interval_ms(2) == {**dict.fromkeys(LEVEL2, 0.0), "time_forward_backward_ms": 1500.0,
                                "time_data_ms": 500.0, "time_threshold_ms": 1000.0, "time_threshold_comm_ms": 500.0}
    assert set(t.interval_ms(1).values()) == {0.0}  # read and reset
    with pytest.raises(AssertionError, match="'optimizer' stopped while 'data' runs"):
        t.start("data")
        t.stop("optimizer")


def test_a_phase_running_at_the_log_line_is_split_there(monkeypatch):
    """The trainer reads the phases inside `logging`: its stretch so far is this line's, the rest the next's."""
    clock = iter(range(100))
    monkeypatch.setattr(timers.time, "perf_counter", lambda: float(next(clock)))
    t = Timers(1, torch.device("cpu"))
    t.start("logging")  # 0
    assert t.interval_ms(1)["time_logging_ms"] == 1000.0  # read at 1
    with t.phase("eval"):  # 2 .. 3
        pass
    t.stop("logging")  # 4
    assert t.interval_ms(1) == {**dict.fromkeys(LEVEL1, 0.0), "time_logging_ms": 2000.0, "time_eval_ms": 1000.0}


def test_level_0_times_nothing_and_synchronises_nothing(synchronizations):
    off = Timers(0, torch.device("cuda"))
    with off.phase("forward_backward"), off.phase("threshold"):
        pass
    batches = iter([1])
    assert off.timed(batches, "data") is batches
    assert off.interval_ms(1) == {} and synchronizations[0] == 0
    level1 = Timers(1, torch.device("cuda"))
    with level1.phase("forward_backward"), level1.phase("threshold"), level1.phase("threshold_comm"):  # level 2
        pass
    assert synchronizations[0] == 4  # each level-1 boundary
    assert set(level1.interval_ms(1)) == LEVEL1


def run_timed(tiny_corpus, tmp_path, level: int, *extra: str) -> list[dict]:
    """8 iterations, each logged, with an evaluation and a checkpoint after every second one."""
    return run(flags(tiny_corpus, "--train-iters", "8", "--log-interval", "1", "--eval-interval", "2",
                     "--save", str(tmp_path / "ckpt"), "--save-interval", "2", "--timing-log-level", str(level),
                     *extra))[1]


def test_level_1_phases_cover_the_iteration_time(tiny_corpus, tmp_path):
    records = run_timed(tiny_corpus, tmp_path, 1, "--eslm-alpha", "0.5")
    for r in records:
        assert set(r) & LEVEL2 == LEVEL1
        assert r["mfu"] is None  # CPU without --peak-tflops
        # one process: no reduction work; evaluations and saves are timed where they run (below)
        assert all(r[f] > 0 for f in LEVEL1 - {"time_grads_reduce_ms", "time_eval_ms", "time_checkpoint_ms"}), r
        phases = sum(r[f] for f in LEVEL1)  # the logging of every line included: it holds at --log-interval 1
        assert abs(phases - r["iteration_time_ms"]) <= 0.05 * r["iteration_time_ms"], (phases, r)
    # the evaluation and the save after iterations 2, 4 and 6 are in the next line's interval (8's in none)
    for phase in ("time_eval_ms", "time_checkpoint_ms"):
        assert [r[phase] > 0 for r in records] == [False, False, True, False, True, False, True, False], phase
    assert get_timers().level == 0  # the trainer's close() put the inert timers back


def test_level_2_adds_the_threshold_collectives(tiny_corpus, tmp_path):
    records = run_timed(tiny_corpus, tmp_path, 2, "--train-iters", "4", "--selection", "ada-eslm")
    assert set(records[0]) & LEVEL2 == LEVEL2 and records[0]["time_threshold_comm_ms"] > 0


def test_level_0_records_and_the_throughput_fields(tiny_corpus, synchronizations):
    _, records = run(flags(tiny_corpus, "--train-iters", "2", "--peak-tflops", "0.5"))
    assert synchronizations[0] == 0
    for r in records:
        assert not [f for f in r if f.startswith("time_")]
        seconds = r["iteration_time_ms"] / 1000
        assert r["tflops_per_gpu"] == pytest.approx(r["executed_flops"] / seconds / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5, rel=1e-12)
        assert r["max_memory_allocated"] is None  # CPU


@pytest.mark.parametrize("level", [0, 1])
def test_timed_step_reads_nothing_from_the_device(tiny_corpus, level):
    """A step's timers add no host read (on a GPU only their torch.cuda.synchronize calls, at level >= 1)."""
    trainer = Trainer(parse_args(flags(tiny_corpus)))
    loader = iter(trainer._loader(trainer.train_ds, len(trainer.train_ds), 0))
    batches = iter([next(loader) for _ in range(2 * trainer.num_micro_batches)])  # data: not counted
    trainer.train_step(batches)  # builds lazy state
    installed = timers.install_timers(level, trainer.device)
    with HostSyncCounter() as syncs:
        trainer.train_step(installed.timed(batches, "data"))
    trainer.close()
    assert syncs.avoidable == 0, syncs.report()


def test_peak_table(monkeypatch):
    cpu = torch.device("cpu")
    assert throughput.peak_tflops(cpu) is None and throughput.peak_tflops(cpu, 123.0) == 123.0
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla V100-SXM2-16GB", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert throughput.peak_tflops(torch.device("cuda", 0)) == peak, name
    assert throughput.mfu(494.5, 989.0) == 0.5 and throughput.mfu(1.0, None) is None


@pytest.mark.parametrize("argv, message", [
    (["--peak-tflops", "0"], "--peak-tflops must be a positive finite number, got 0.0"),
    (["--peak-tflops", "nan"], "--peak-tflops must be a positive finite number, got nan"),
    (["--timing-log-level", "3"], "--timing-log-level must be 0, 1 or 2, got 3"),
])
def test_bad_values_give_one_line(tiny_corpus, argv, message):
    with pytest.raises(UserError) as err:
        parse_args(flags(tiny_corpus, *argv))
    assert str(err.value) == message
