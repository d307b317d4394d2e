"""tools/scaling_study.py end to end on 1 and 2 CPU ranks: every output file and column, the communication
bytes the records carry at --timing-log-level 2, invalid points as rows, the projection next to the
measurements, and a second call that reruns nothing. The study's torchrun commands run on the suite's
ranks (`on_the_suite_ranks`: this process for one rank, tests/rank_pool.py for two), whose start-ups
the suite has paid already; torchrun itself is test_parallel_training.py's test_torchrun_launch."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import scaling_study  # noqa: E402
from helpers import pretrain_in_process  # noqa: E402
from rank_pool import run_on_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # the whole file (pytest.ini)

OUTPUTS = ("scaling.csv", "scaling.md", "throughput.png", "breakdown.png", "selection.png", "projection.csv")


def study_argv(corpus, out: Path, recipe: Path) -> list[str]:
    prefix, model = corpus
    return ["--config", str(recipe), "--world-sizes", "1", "2", "--layouts", "tp1pp1", "--micro-batch-sizes", "2",
            "3", "--selections", "none", "eslm:0.5", "--scaling", "weak", "--warmup-iters", "1", "--timed-iters",
            "1", "--project-to", "8", "--network", "cpu-gloo", "--out-dir", str(out), "--",
            "--data-path", prefix, "--tokenizer-model", model]


@pytest.fixture(scope="module")
def study(tiny_corpus, tmp_path_factory):
    """The study's output folder and argv: 4 points run (w1, w2 x none, eslm), micro-batch 3 invalid."""
    tmp = tmp_path_factory.mktemp("scaling")
    recipe = tmp / "pretrain.json"  # tests/helpers.py flags()'s model
    recipe.write_text(json.dumps({"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 32,
                                  "micro-batch-size": 2, "global-batch-size": 8, "lr": 3e-3, "lr-warmup-iters": 2,
                                  "split": "90,10,0", "num-workers": 0, "seed": 7}))
    argv = study_argv(tiny_corpus, tmp / "out", recipe)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scaling_study, "execute", on_the_suite_ranks)
        scaling_study.main(argv)
    return tmp / "out", argv


def on_the_suite_ranks(command: list[str], env: dict, timeout: float) -> tuple[str, int]:
    """`scaling_study.execute` of a torchrun command (`scaling_study.launch_command`): its pretrain argv on
    as many of the suite's ranks."""
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"], command
    world, argv = int(command[4]), command[command.index("megatron_eslm.pretrain") + 1:]
    if world == 1:
        pretrain_in_process(argv)
    else:
        run_on_ranks(world, pretrain_in_process, argv)
    return "", 0


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path) as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def test_outputs_and_columns(study):
    out, _ = study
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    columns, rows = read_csv(out / "scaling.csv")
    assert columns == scaling_study.COLUMNS
    assert len(rows) == 8
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["world_size"], r["selection"]) for r in ok} == {(w, s) for w in "12" for s in ("none", "eslm:0.5")}
    assert all(r["micro_batch_size"] == "2" for r in ok)
    for r in ok:
        assert r["global_batch_size"] == str(8 * int(r["world_size"]))  # weak scaling
        for column in ("tokens_per_sec", "tokens_per_sec_per_gpu", "tflops_per_gpu", "step_ms",
                       *scaling_study.PHASE_FIELDS, *scaling_study.COMM_FIELDS, "kept_fraction",
                       "scaling_efficiency", "predicted_step_ms", "projection_error"):
            assert r[column] != "", (column, r)
        assert float(r["tokens_per_sec_per_gpu"]) * int(r["world_size"]) == pytest.approx(float(r["tokens_per_sec"]))
        assert r["mfu"] == "" and r["max_memory_allocated"] == ""  # CPU: no peak, no device memory
        assert (r["heldout_error"] != "") == (r["world_size"] == "2")  # fitted on world 1, predicts world 2
        if r["world_size"] == "1":
            assert float(r["scaling_efficiency"]) == 1.0
            assert all(float(r[c]) == 0.0 for c in scaling_study.COMM_FIELDS if c != "comm_bytes_metrics")
        else:  # data parallel: gradient sums, and with ESLM the threshold's sketch
            assert float(r["comm_bytes_dp_all_reduce"]) > 0
            assert (float(r["comm_bytes_eslm_threshold"]) > 0) == (r["selection"] != "none")
    invalid = [r for r in rows if r["status"] == "invalid"]
    assert len(invalid) == 4 and all("--micro-batch-size 3" in r["message"] for r in invalid)
    columns, projected = read_csv(out / "projection.csv")
    assert {"world_size", "tp", "cp", "pp", "dp", "selection", "network", "step_ms", "tokens_per_sec",
            *scaling_study.BREAKDOWN} <= set(columns)
    assert {(r["world_size"], r["dp"], r["global_batch_size"], r["selection"]) for r in projected} == {
        ("8", "8", "64", "none"), ("8", "8", "64", "eslm:0.5")}
    markdown = (out / "scaling.md").read_text()
    assert "## Throughput" in markdown and "## Projection (cpu-gloo)" in markdown and "invalid" in markdown


def test_timed_iterations_are_one_record(study):
    out, _ = study
    for folder in (out / "points").iterdir():
        if (folder / "metrics.jsonl").exists():
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            assert [r["iterations"] for r in records] == [1, 1]  # warmup, then the timed iteration
            assert json.loads((folder / "result.json").read_text())["record"] == records[-1]


def test_a_second_call_reruns_nothing(study, monkeypatch, capsys):
    out, argv = study
    before = (out / "scaling.csv").read_text()
    monkeypatch.setattr(scaling_study, "run_point", lambda *a: pytest.fail("a finished point ran again"))
    scaling_study.main(argv)
    assert (out / "scaling.csv").read_text() == before
    assert "8/8" in capsys.readouterr().out


def test_schedule_makes_the_timed_iterations_the_last_record():
    assert scaling_study.schedule(0, 3) == (0, 3)
    assert scaling_study.schedule(1, 3) == (3, 3)  # warmup rounded up to one interval
    assert scaling_study.schedule(4, 2) == (4, 4)


def test_context_parallel_sizes_cross_the_layouts(tmp_path):
    """--context-parallel-sizes: every layout at every C, DP = world / (TP x C x PP), named layouts that C
    does not fit kept as invalid rows, auto ones at C from world / C; the points' flags, names and model
    points carry C (nothing runs)."""
    recipe = tmp_path / "pretrain.json"
    recipe.write_text(json.dumps({"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 32,
                                  "micro-batch-size": 2, "global-batch-size": 8, "hidden-dropout": 0,
                                  "attention-dropout": 0}))
    extra = ["--", "--data-path", "x", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]

    def sweep(*flags: str) -> tuple:
        args = scaling_study.parse(["--config", str(recipe), "--out-dir", str(tmp_path / "out"), *flags, *extra])
        return args, scaling_study.sweep(args, scaling_study.parse_args(["--config", str(recipe), *extra[1:]]))

    args, points = sweep("--world-sizes", "2", "4", "--layouts", "tp1pp1", "tp2pp1",
                         "--context-parallel-sizes", "1", "2")
    assert [(p.name, reason is None) for p, reason in points] == [
        ("w2-tp1pp1dp2-z0-mbs2-gbs8-none", True), ("w2-tp2pp1dp1-z0-mbs2-gbs8-none", True),
        ("w2-tp1cp2pp1dp1-z0-mbs2-gbs8-none", True), ("w2-tp2cp2pp1dp1-z0-mbs2-gbs8-none", False),
        ("w4-tp1pp1dp4-z0-mbs2-gbs8-none", True), ("w4-tp2pp1dp2-z0-mbs2-gbs8-none", True),
        ("w4-tp1cp2pp1dp2-z0-mbs2-gbs8-none", True), ("w4-tp2cp2pp1dp1-z0-mbs2-gbs8-none", True)]

    p = points[6][0]
    argv = scaling_study.point_argv(args, p, "metrics.jsonl", None)
    assert argv[argv.index("--context-parallel-size") + 1] == "2"
    model = scaling_study.model_point(args, p)
    assert (model.cp, model.dp) == (2, 2)
    assert scaling_study.model_point(args, p, 16, 32).dp == 8  # projected: DP grows, CP stays
    invalid = scaling_study.row(points[3][0], {"status": "invalid", "message": points[3][1]})
    assert invalid["cp"] == 2
    assert "- 2 ranks tp2cp2pp1 z0 none: invalid: world size 2" in scaling_study.markdown([invalid], [])
    _, auto = sweep("--world-sizes", "4", "--layouts", "auto", "--context-parallel-sizes", "2")
    assert sorted((p.tp, p.cp, p.pp, p.dp) for p, _ in auto) == [(1, 2, 1, 2), (1, 2, 2, 1), (2, 2, 1, 1)]


def test_virtual_stages_cross_the_pipelined_layouts(tmp_path):
    """--virtual-stages: every layout with PP > 1 at every V (PP 1 only at V 1), the point's flag
    --num-layers-per-virtual-pipeline-stage = layers / (PP x V), its name and model point carry V, and a V
    the layers do not fit is an invalid row (nothing runs)."""
    recipe = tmp_path / "pretrain.json"
    recipe.write_text(json.dumps({"num-layers": 4, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 32,
                                  "micro-batch-size": 1, "global-batch-size": 4}))
    extra = ["--", "--data-path", "x", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]
    args = scaling_study.parse(["--config", str(recipe), "--out-dir", str(tmp_path / "out"), "--world-sizes", "2",
                                "--layouts", "tp1pp1", "tp1pp2", "--virtual-stages", "1", "2", "4", *extra])
    points = scaling_study.sweep(args, scaling_study.parse_args(["--config", str(recipe), *extra[1:]]))
    assert [(p.name, reason is None) for p, reason in points] == [
        ("w2-tp1pp1dp2-z0-mbs1-gbs4-none", True), ("w2-tp1pp2dp1-z0-mbs1-gbs4-none", True),
        ("w2-tp1pp2vp2dp1-z0-mbs1-gbs4-none", True), ("w2-tp1pp2vp4dp1-z0-mbs1-gbs4-none", False)]
    p = points[2][0]
    argv = scaling_study.point_argv(args, p, "metrics.jsonl", None)
    assert argv[argv.index("--num-layers-per-virtual-pipeline-stage") + 1] == "1"
    assert scaling_study.model_point(args, p).vp == 2
    assert "--num-layers-per-virtual-pipeline-stage" not in scaling_study.point_argv(args, points[1][0], "m", None)
