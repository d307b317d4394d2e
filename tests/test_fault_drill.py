"""kill -9 after the first checkpoint, at a random moment or during a save, with and without --async-save,
then --load: every run resumes from a checkpoint and ends with the uninterrupted run's weights bit for bit
and its records (tools/fault_drill.py runs many trials; the suite a few)."""
from __future__ import annotations

import importlib.util
import os

import pytest

import forked
from helpers import REPO, pretrain_in_process

pytestmark = pytest.mark.slow  # the whole file (pytest.ini)

spec = importlib.util.spec_from_file_location("fault_drill", os.path.join(REPO, "tools", "fault_drill.py"))
fault_drill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fault_drill)


def test_killed_runs_resume_exactly(tmp_path):
    lines = []
    rows = fault_drill.drill(trials=2, async_modes=[False, True], iters=8, seed=1, workdir=str(tmp_path),
                             log=lines.append, run_here=pretrain_in_process, popen=forked.Popen)

    # every trial killed mid-run and resumed from a checkpoint, exactly; one kill of each mode during a write
    assert [(r["mode"], r["trials"], r["killed"], r["resumed"], r["exact"]) for r in rows] == [
        ("sync", 2, 2, 2, 2), ("async", 2, 2, 2, 2)], lines
    assert all(r["writing"] >= 1 for r in rows), lines


def test_the_rank_drill_counts_a_resume_as_recent_as_the_newest_whole_snapshot():
    """The 4-rank drill's "from snapshot": the newest published snapshot; else, when the survivors held none
    newer than the checkpoint, that checkpoint; not a checkpoint older than what they held whole, nor a trial
    whose survivor's write failed."""
    line = "error: rank {} at iteration 11: RuntimeError in a collective; rank 3 stopped answering; {}"
    through = line.format(0, "snapshot of iteration 10 written to c/iter_0000010.emergency (and of 8 beside it), "
                             "not complete yet (shards of other ranks)")
    broken = line.format(1, "snapshot of iteration 8 not written: c holds iteration 8")
    assert fault_drill._as_recent([through, broken, through], published=None, resumed_from=8)
    assert not fault_drill._as_recent([through, through], published=None, resumed_from=8)
    assert fault_drill._as_recent([line.format(0, "snapshot of iteration 10 saved as c/iter_0000010"),
                                   line.format(1, "the snapshot shards it holds are written by other survivors")],
                                  published=10, resumed_from=10)
    assert not fault_drill._as_recent([through], published=10, resumed_from=8)
    assert not fault_drill._as_recent([broken, line.format(2, "saving the snapshot failed (OSError: full)")],
                                      published=None, resumed_from=8)
