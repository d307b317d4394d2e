"""kill -9 at a random moment, with and without --async-save, then --load: the resumed run ends with the
uninterrupted run's weights bit for bit and its records (tools/fault_drill.py runs many trials; the
suite a few)."""
from __future__ import annotations

import importlib.util
import os

from helpers import REPO

spec = importlib.util.spec_from_file_location("fault_drill", os.path.join(REPO, "tools", "fault_drill.py"))
fault_drill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fault_drill)


def test_killed_runs_resume_exactly(tmp_path):
    lines = []
    rows = fault_drill.drill(trials=2, async_modes=[False, True], iters=8, seed=1, workdir=str(tmp_path),
                             log=lines.append)
    assert [(r["mode"], r["trials"], r["exact"]) for r in rows] == [("sync", 2, 2), ("async", 2, 2)], lines
    assert sum(r["killed"] for r in rows) >= 3, lines  # the kills land mid-run
