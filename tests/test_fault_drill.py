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
