#!/usr/bin/env python
"""Throughput scaling study: sweep world sizes, TP x CP x PP x DP layouts, ZeRO stages, micro-batch sizes and
selection settings over one recipe, measure each point through the real launchers, tabulate, plot, and
project past the hardware at hand with tools/scaling_model.py (checked against the measured points).

    python tools/scaling_study.py --config examples/gpt2_124m/pretrain.json --world-sizes 1 2 4 8 \
        --layouts auto --selections none eslm:0.5 --scaling weak --out-dir runs/scaling \
        --project-to 64 512 1024 -- --data-path DATA --tokenizer-model TOK.model

--context-parallel-sizes 1 2 crosses every layout with CP 1 and 2 (DP = world / (TP x CP x PP)).

Everything after `--` goes to every point's pretrain command (data, tokenizer, a smaller model ...). Each
point is one subprocess: `python -m torch.distributed.run --nproc_per_node N -m megatron_eslm.pretrain`
(ZeRO stage 0: our own data parallelism), or `deepspeed --num_gpus N --module megatron_eslm.pretrain
--zero-stage S` (with --deepspeed-config, a copy of it without its batch entries, which the point sets).
Off CUDA the points run on gloo (DeepSpeed with DS_ACCELERATOR=cpu). A point trains warmup + timed
iterations at --timing-log-level 2, logged so that the timed iterations are ONE metrics record (its phase
times and communication bytes are means over them): the log interval is max(warmup, timed) and the warmup
is rounded up to it. Evaluation is off (--eval-iters 0). The numbers are rank 0's (the logging rank: the
first pipeline stage), tokens/s and TFLOP/s are the whole job's.

Resumable: each point leaves <out>/points/<point>/result.json with its pretrain flags; a rerun keeps a
point whose result is ok or oom for the same flags (a changed recipe, flag or iteration count, or a failed
point, runs again; whether a layout is invalid is checked afresh). OOM ("CUDA out of memory" / MemoryError
in the log) is a row with status oom; other failures (a launcher that cannot start, a crash, a point past
--point-timeout, whose whole process group is killed) a row with status failed and the log's last error
line.

Writes <out>/scaling.csv, scaling.md, throughput.png, breakdown.png, selection.png, and with --project-to
projection.csv (the projected points, also drawn on throughput.png, dashed and hollow). docs/scaling.md
has a study and the SLURM recipe (one node per study point is what this runner launches).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_eslm.config import Config, parse_args, validate_layout  # noqa: E402
from megatron_eslm.distributed.collectives import KINDS, field_name  # noqa: E402
from megatron_eslm.errors import UserError, exit_on_user_error  # noqa: E402
from megatron_eslm.output_dir import check_output_dir, mark, write_file  # noqa: E402
from megatron_eslm.tokenizer import build_tokenizer  # noqa: E402
from megatron_eslm.training.progress import progress_bar  # noqa: E402
from megatron_eslm.training.timers import PHASES  # noqa: E402
from scaling_model import NETWORKS, Layout, Point, fit, fit_latency, predict, split_name  # noqa: E402

TOOL = "scaling_study"
FINAL = ("ok", "oom")  # statuses a rerun of the same command keeps; "failed" points run again
PHASE_FIELDS = [f"time_{name}_ms" for name in PHASES if name not in ("eval", "checkpoint")]
COMM_FIELDS = [field_name(kind) for kind in KINDS]
COLUMNS = ["world_size", "tp", "cp", "pp", "vp", "dp", "zero_stage", "micro_batch_size", "global_batch_size", "selection",
           "status", "tokens_per_sec", "tokens_per_sec_per_gpu", "tflops_per_gpu", "mfu", "step_ms", *PHASE_FIELDS,
           "max_memory_allocated", *COMM_FIELDS, "kept_fraction", "scaling_efficiency", "predicted_step_ms",
           "projection_error", "heldout_error", "message"]
BREAKDOWN = ["compute_ms", "tp_comm_ms", "cp_comm_ms", "pp_comm_ms", "dp_comm_ms", "bubble_ms", "embedding_comm_ms",
             "normalizer_ms", "threshold_ms", "optimizer_ms", "data_ms"]  # tools/scaling_model.predict's terms
OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|MemoryError")


@dataclass(frozen=True)
class StudyPoint(Layout):
    """A point of the sweep, named for its folder under --out-dir."""

    @property
    def name(self) -> str:
        vp = f"vp{self.vp}" if self.vp > 1 else ""  # names from before the interleaved schedule stay
        return (f"w{self.world_size}-{self.split}{vp}dp{self.dp}-z{self.zero_stage}-mbs{self.micro_batch_size}"
                f"-gbs{self.global_batch_size}-{self.selection.replace(':', '')}")

    @property
    def shape(self) -> tuple:
        """What stays fixed along a scaling curve: all but the world size (and so DP and the batch)."""
        return self.tp, self.cp, self.pp, self.vp, self.zero_stage, self.micro_batch_size, self.selection

    def label(self) -> str:
        vp = f" vp{self.vp}" if self.vp > 1 else ""
        return f"{self.split}{vp} z{self.zero_stage} mbs{self.micro_batch_size} {self.selection}"


# ----------------------------------------------------------------------------------------- the sweep
def selection_flags(selection: str) -> list[str]:
    """`none` or `<policy>:<alpha>` (eslm:0.5) -> pretrain flags."""
    policy, _, alpha = selection.partition(":")
    return ["--selection", policy, *(["--eslm-alpha", alpha] if alpha else [])]


def schedule(warmup: int, timed: int) -> tuple[int, int]:
    """(warmup iterations, log interval) so that the timed iterations are exactly the last record: the
    interval must divide the warmup and be at least the timed count."""
    if warmup == 0:
        return 0, timed
    warmup = max(warmup, timed)
    return warmup, warmup


def chunk_layers(args: argparse.Namespace, p: StudyPoint) -> int | None:
    """Layers per virtual stage of a point with V > 1 model chunks per pipeline rank (the recipe's layers over
    PP x V; 0 when they do not split so); None for the plain schedule."""
    if p.vp == 1:
        return None
    layers = parse_args(["--config", args.config, *args.pretrain]).model.num_layers
    return layers // (p.pp * p.vp) if layers % (p.pp * p.vp) == 0 else 0


def point_argv(args: argparse.Namespace, p: StudyPoint, metrics: str, ds_config: str | None) -> list[str]:
    """The point's pretrain flags (the recipe, the user's extras, then the point's own)."""
    warmup, interval = schedule(args.warmup_iters, args.timed_iters)
    zero = [] if p.zero_stage == 0 else ["--zero-stage", str(p.zero_stage)]
    chunk = chunk_layers(args, p)
    interleaved = ["--num-layers-per-virtual-pipeline-stage", str(chunk)] if chunk else []
    if zero and ds_config:
        zero += ["--deepspeed", "--deepspeed_config", ds_config]
    return ["--config", args.config, *args.pretrain, "--tensor-model-parallel-size", str(p.tp),
            "--context-parallel-size", str(p.cp), "--pipeline-model-parallel-size", str(p.pp),
            "--micro-batch-size", str(p.micro_batch_size),
            "--global-batch-size", str(p.global_batch_size), "--train-iters", str(warmup + args.timed_iters),
            "--log-interval", str(interval), "--eval-iters", "0", "--timing-log-level", "2",
            "--metrics-file", metrics, *selection_flags(p.selection), *zero, *interleaved]


def parse_layout(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"tp(\d+)pp(\d+)", text)
    if not match:
        raise UserError(f"--layouts: '{text}' is not tp<N>pp<M> (e.g. tp2pp1) or auto")
    return int(match[1]), int(match[2])


def sweep(args: argparse.Namespace, recipe: Config) -> list[tuple[StudyPoint, str | None]]:
    """Every point of the sweep with the reason it cannot run (None: it can): each layout at each
    --context-parallel-sizes C, and each pipelined one (PP > 1) at each --virtual-stages V. `auto` layouts that do not fit the model are left out (at C, the TP x PP x
    DP of world / C); named ones stay, as invalid rows."""
    smallest = min(args.world_sizes)
    points = []
    for world, cp in itertools.product(args.world_sizes, args.context_parallel_sizes):
        if args.layouts == ["auto"]:
            ranks = world // cp  # a world that C does not divide fails the check
            layouts = [(tp, ranks // dp // tp) for dp in range(1, ranks + 1) if ranks % dp == 0
                       for tp in range(1, ranks // dp + 1) if (ranks // dp) % tp == 0]
        else:
            layouts = [parse_layout(text) for text in args.layouts]
        gbs = recipe.training.global_batch_size
        if args.scaling == "weak":
            gbs = gbs * world // smallest
        for (tp, pp), vp, zero, mbs, selection in itertools.product(
                layouts, args.virtual_stages, args.zero_stages,
                args.micro_batch_sizes or [recipe.training.micro_batch_size], args.selections):
            if vp > 1 and pp == 1:
                continue  # no pipeline, nothing to interleave
            p = StudyPoint(world, tp, pp, max(world // (tp * cp * pp), 1), zero, mbs, gbs, selection, cp=cp, vp=vp)
            reason = check(args, p)
            if reason is None or args.layouts != ["auto"]:
                points.append((p, reason))
    return points


def check(args: argparse.Namespace, p: StudyPoint) -> str | None:
    """The launch scripts' pre-launch check (parse_args + validate_layout) on the point's flags (a ZeRO point's
    DeepSpeed JSON is checked when it starts)."""
    if chunk_layers(args, p) == 0:
        return f"--virtual-stages {p.vp}: the layers do not split into PP {p.pp} x {p.vp} model chunks"
    try:
        validate_layout(parse_args(point_argv(args, p, os.devnull, None)), p.world_size)
    except UserError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------------------- running
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_ds_config(args: argparse.Namespace, folder: Path) -> str | None:
    """The user's DeepSpeed JSON without its batch entries (filled from the point's flags), or None."""
    if not args.deepspeed_config:
        return None
    with open(args.deepspeed_config) as fh:
        config = json.load(fh)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        config.pop(key, None)
    path = folder / "ds_config.json"
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def launch_command(p: StudyPoint, argv: list[str]) -> list[str]:
    port = str(free_port())
    if p.zero_stage == 0:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(p.world_size),
                "--master_port", port, "-m", "megatron_eslm.pretrain", *argv]
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    return [launcher, "--num_gpus", str(p.world_size), "--master_port", port, "--module", "megatron_eslm.pretrain",
            *argv]


def last_error(log: str) -> str:
    """The log's last line that says what went wrong (else its last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|Error|exception|Exception", line) and not line.startswith("File "):
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


def launch_argv(args: argparse.Namespace, p: StudyPoint, folder: Path) -> list[str]:
    """The pretrain flags of point `p`, writing its metrics (and DeepSpeed config) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return point_argv(args, p, str(folder / "metrics.jsonl"), point_ds_config(args, folder))


def execute(command: list[str], env: dict, timeout: float) -> tuple[str, int]:
    """(output, return code) of `command`; past `timeout` its whole process group is killed (a launcher's
    ranks too, which would otherwise run on into the next points)."""
    try:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    except OSError as err:  # e.g. no deepspeed launcher on PATH
        return f"cannot launch {command[0]}: {err}", -1
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return f"{out}\ntimed out after {timeout} s", -1


def read_records(metrics: Path) -> list[dict]:
    """The training records of a metrics file; a line cut short by a killed run is left out."""
    records = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if "split" not in r]


def run_point(args: argparse.Namespace, p: StudyPoint, folder: Path, argv: list[str]) -> dict:
    """Launch one point; returns its result: status, message and (ok) its timed record."""
    metrics = folder / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = dict(os.environ)
    if not torch.cuda.is_available():  # one thread a rank, as one GPU a rank (torchrun sets it only for N > 1)
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    command = launch_command(p, argv)
    log, returncode = execute(command, env, args.point_timeout)
    (folder / "log.txt").write_text(" ".join(command) + "\n\n" + log)
    records = read_records(metrics)
    if returncode == 0 and records and records[-1]["iterations"] == args.timed_iters:
        return {"status": "ok", "message": "", "record": records[-1]}
    if OOM.search(log):
        return {"status": "oom", "message": "out of memory"}
    return {"status": "failed", "message": last_error(log) if returncode else "no timed record in the metrics"}


def cached(path: Path, argv: list[str]) -> dict | None:
    """A finished result of the same command (a changed recipe, flag or iteration count runs again)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("status") in FINAL and result.get("argv") == argv else None


def measure(args: argparse.Namespace, points: list[tuple[StudyPoint, str | None]]) -> list[tuple[StudyPoint, dict]]:
    """Every point's result, from its result.json when a finished one is there."""
    results, start = [], time.perf_counter()
    for done, (p, reason) in enumerate(points, 1):
        path = Path(args.out_dir) / "points" / p.name / "result.json"
        if reason is not None:  # checked on every run: never taken from an earlier one
            result = {"status": "invalid", "message": reason}
        else:
            argv = launch_argv(args, p, path.parent)
            result = cached(path, argv)
            if result is None:
                result = {**run_point(args, p, path.parent, argv), "argv": argv}
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(result, indent=1))
                temporary.replace(path)
        results.append((p, result))
        if result["status"] == "ok":
            note = f"ok, {result['record']['tokens_per_sec']:.0f} tokens/s"
        else:
            note = f"{result['status'].upper()}: {result['message']}"
        print(f"{progress_bar(done, len(points), time.perf_counter() - start)} | {p.name}: {note}", flush=True)
    return results


# ----------------------------------------------------------------------------------------- rows
def row(p: StudyPoint, result: dict) -> dict:
    out = {**dataclasses.asdict(p), "status": result["status"], "message": result["message"]}
    r = result.get("record")
    if r is not None:
        out.update({"tokens_per_sec": r["tokens_per_sec"], "tokens_per_sec_per_gpu": r["tokens_per_sec"] / p.world_size,
                    "tflops_per_gpu": r["tflops_per_gpu"], "mfu": r["mfu"], "step_ms": r["iteration_time_ms"],
                    "max_memory_allocated": r["max_memory_allocated"], "kept_fraction": r["kept_fraction"],
                    **{f: r.get(f, 0.0) for f in PHASE_FIELDS + COMM_FIELDS}})
    return out


def add_efficiency(rows: list[dict], points: list[StudyPoint]) -> None:
    """Tokens/s per GPU over the best of the smallest world size (any layout) with the same ZeRO stage,
    micro-batch and selection: for strong and weak scaling alike, 1.0 is perfect scaling, and a layout that
    first appears at a larger size is measured against the small run too."""
    ok = [(p, r) for p, r in zip(points, rows) if r["status"] == "ok"]
    base: dict[tuple, float] = {}
    smallest = min((p.world_size for p, _ in ok), default=0)
    for p, r in ok:
        if p.world_size == smallest:
            key = (p.zero_stage, p.micro_batch_size, p.selection)
            base[key] = max(base.get(key, 0.0), r["tokens_per_sec_per_gpu"])
    for p, r in ok:
        reference = base.get((p.zero_stage, p.micro_batch_size, p.selection))
        r["scaling_efficiency"] = r["tokens_per_sec_per_gpu"] / reference if reference else None


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows])
    write_file(str(path), table.getvalue())


# ----------------------------------------------------------------------------------------- projection
def model_point(args: argparse.Namespace, p: StudyPoint, world: int | None = None, gbs: int | None = None):
    """tools/scaling_model.Point for `p` (at `world` GPUs and global batch `gbs` if given, DP grown)."""
    cfg = parse_args(point_argv(args, p, os.devnull, None))
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, cfg.data.vocab_size)
    point = Point.from_config(cfg, p.world_size, tokenizer.vocab_size, p.zero_stage)
    if world is None:
        return point
    return dataclasses.replace(point, world_size=world, dp=world // (p.tp * p.cp * p.pp), global_batch_size=gbs)


def network(args: argparse.Namespace):
    """The projection's network: --network with the overrides."""
    if args.network not in NETWORKS:
        raise UserError(f"--network {args.network}: unknown; choose from {', '.join(sorted(NETWORKS))}")
    overrides = {"gpus_per_node": args.gpus_per_node,
                 "intra_bandwidth": None if args.intra_bandwidth_gbps is None else args.intra_bandwidth_gbps * 1e9 / 8,
                 "inter_bandwidth": None if args.inter_bandwidth_gbps is None else args.inter_bandwidth_gbps * 1e9 / 8,
                 "intra_latency": None if args.intra_latency_us is None else args.intra_latency_us * 1e-6,
                 "inter_latency": None if args.inter_latency_us is None else args.inter_latency_us * 1e-6}
    return dataclasses.replace(NETWORKS[args.network], **{k: v for k, v in overrides.items() if v is not None})


def heldout(measured: list[tuple[StudyPoint, dict]], model_points: dict, results: dict, network) -> None:
    """`heldout_error` of the largest world size's points: the model fitted (rates and latency) on the
    smaller world sizes only, so these are predictions of points it has not seen."""
    largest = max(p.world_size for p, _ in measured)
    seen = [(model_points[p], results[p]) for p, _ in measured if p.world_size < largest]
    try:
        calibration = fit(seen, network)
    except ValueError:  # one world size, or no calibration point below the largest
        return
    network = fit_latency(seen, calibration, network)
    for p, r in measured:
        if p.world_size == largest:
            r["heldout_error"] = predict(model_points[p], calibration, network)["step_ms"] / r["step_ms"] - 1


def project(args: argparse.Namespace, points: list[StudyPoint], rows: list[dict]) -> list[dict]:
    """Fit on the measured points, fill their predicted_step_ms / projection_error (predicted on the network
    they ran on: "cpu-gloo" off CUDA, else --network), and return the projected rows: each measured shape at
    every --project-to size on --network (DP grows, TP, CP and PP stay; the batch as --scaling says)."""
    measured = [(p, r) for p, r in zip(points, rows) if r["status"] == "ok"]
    model_points = {p: model_point(args, p) for p, _ in measured}
    results = {p: json.loads((Path(args.out_dir) / "points" / p.name / "result.json").read_text())["record"]
               for p, _ in measured}
    net = network(args)
    here = net if torch.cuda.is_available() else NETWORKS["cpu-gloo"]
    pairs = [(model_points[p], results[p]) for p, _ in measured]
    try:
        calibration = fit(pairs, here)
    except ValueError as err:  # no point the model can calibrate on (e.g. every one has TP, CP or PP > 1)
        print(f"projection skipped: {err}")
        return []
    here = fit_latency(pairs, calibration, here)
    print(f"fitted latency of the measured network: {here.intra_latency * 1e6:.0f} us per ring step")
    for p, r in measured:
        r["fitted_latency_us"] = here.intra_latency * 1e6  # for scaling.md (not a CSV column)
        r["predicted_step_ms"] = predict(model_points[p], calibration, here)["step_ms"]
        r["projection_error"] = r["predicted_step_ms"] / r["step_ms"] - 1
    heldout(measured, model_points, results, here)
    first: dict[tuple, StudyPoint] = {}  # one curve per shape, from its smallest measured size
    for p, _ in sorted(measured, key=lambda pr: -pr[0].world_size):
        first[p.shape] = p
    projected = []
    for p in first.values():
        for world in args.project_to:
            gbs = p.global_batch_size // p.world_size * world if args.scaling == "weak" else p.global_batch_size
            dp = world // (p.tp * p.cp * p.pp)
            if world % (p.tp * p.cp * p.pp) or gbs % (p.micro_batch_size * dp):
                continue
            mp = model_point(args, p, world, gbs)
            prediction = predict(mp, calibration, net)
            tokens = gbs * mp.model.seq_length / (prediction["step_ms"] / 1000)
            projected.append({**dataclasses.asdict(dataclasses.replace(p, world_size=world, dp=dp,
                                                                       global_batch_size=gbs)),
                              "network": args.network, "step_ms": prediction["step_ms"], "tokens_per_sec": tokens,
                              "tokens_per_sec_per_gpu": tokens / world,
                              **{k: prediction.get(k) for k in BREAKDOWN}})
    return projected


# ----------------------------------------------------------------------------------------- report
def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(rows: list[dict], projected: list[dict]) -> str:
    key = ["world_size", "tp", "cp", "pp", "vp", "dp", "zero_stage", "micro_batch_size", "global_batch_size", "selection"]
    main = [*key, "status", "tokens_per_sec", "tokens_per_sec_per_gpu", "tflops_per_gpu", "step_ms",
            "scaling_efficiency", "predicted_step_ms", "projection_error", "heldout_error"]
    phases = [*key, "step_ms", *PHASE_FIELDS]
    comm = [*key, *COMM_FIELDS]

    def table(columns: list[str], table_rows: list[dict]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in table_rows]
        return "\n".join(lines)

    ok = [r for r in rows if r["status"] == "ok"]
    parts = ["## Throughput\n\n", table(main, rows), "\n\n## Step time by phase (ms per iteration, rank 0)\n\n",
             table(phases, ok), "\n\n## Communication bytes per iteration (rank 0, by collective)\n\n",
             table(comm, ok)]
    problems = [r for r in rows if r["status"] != "ok"]
    if problems:
        parts += ["\n\n## Points that did not run\n\n",
                  "\n".join(f"- {r['world_size']} ranks {split_name(r['tp'], r['cp'], r['pp'])} "
                            f"z{r['zero_stage']} {r['selection']}: {r['status']}: {r['message']}" for r in problems)]
    if projected:
        errors = [abs(r["projection_error"]) for r in ok if r.get("projection_error") is not None]
        heldout = [abs(r["heldout_error"]) for r in ok if r.get("heldout_error") is not None]
        parts += [f"\n\n## Projection ({projected[0]['network']})\n\n",
                  "Measured points, predicted on the network they ran on (cpu-gloo off CUDA, its latency fitted "
                  f"to the points: {ok[0]['fitted_latency_us']:.0f} us per ring step): mean |error| {100 * sum(errors) / len(errors):.1f}%, "
                  f"max {100 * max(errors):.1f}%, {sum(e <= 0.3 for e in errors)} of {len(errors)} within 30%."
                  + (f" Held out (the largest world size, fitted on the smaller ones only): mean |error| "
                     f"{100 * sum(heldout) / len(heldout):.1f}%, max {100 * max(heldout):.1f}%." if heldout else "")
                  + "\n\n" if errors else "",
                  table([*key, "step_ms", "tokens_per_sec", "tokens_per_sec_per_gpu", *BREAKDOWN], projected)]
    return "".join(parts) + "\n"


def plots(out: Path, points: list[StudyPoint], rows: list[dict], projected: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(p, r) for p, r in zip(points, rows) if r["status"] == "ok"]
    shapes = list(dict.fromkeys(p.shape for p, _ in ok))
    colors = {shape: plt.cm.tab20(i % 20) for i, shape in enumerate(shapes)}
    labels = {p.shape: p.label() for p, _ in ok}

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(13, 5))
    for shape in shapes:
        curve = sorted((p.world_size, r) for p, r in ok if p.shape == shape)
        x = [w for w, _ in curve]
        ax_t.plot(x, [r["tokens_per_sec"] for _, r in curve], "o-", color=colors[shape], label=labels[shape])
        ax_e.plot(x, [r["scaling_efficiency"] for _, r in curve], "o-", color=colors[shape], label=labels[shape])
        ahead = sorted((r["world_size"], r["tokens_per_sec"]) for r in projected if (
            r["tp"], r["cp"], r["pp"], r["zero_stage"], r["micro_batch_size"], r["selection"]) == shape)
        if ahead:
            ax_t.plot([w for w, _ in ahead], [t for _, t in ahead], "o--", color=colors[shape], mfc="none")
    if projected:
        ax_t.plot([], [], "o--", color="gray", mfc="none", label="projected")
    for ax, title in ((ax_t, "tokens/s"), (ax_e, "scaling efficiency (tokens/s per GPU vs smallest)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (ranks)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(ok) + 2), 5))
    bottom = [0.0] * len(ok)
    for field in PHASE_FIELDS:
        values = [r[field] or 0.0 for _, r in ok]
        ax.bar(range(len(ok)), values, bottom=bottom, label=field[5:-3])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.bar(range(len(ok)), [max(r["step_ms"] - b, 0.0) for (_, r), b in zip(ok, bottom)], bottom=bottom,
           label="other (untimed)", color="lightgray")
    ax.set_xticks(range(len(ok)), [f"{p.world_size}r {p.label()}" for p, _ in ok], rotation=70, fontsize=7,
                  ha="right")
    ax.set_ylabel("ms per iteration (rank 0)")
    ax.set_title("where the step time goes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close(fig)

    dense = {(p.world_size, p.split, p.zero_stage, p.micro_batch_size): r for p, r in ok if p.selection == "none"}
    pairs = [(p, r, dense[k]) for p, r in ok if p.selection != "none"
             and (k := (p.world_size, p.split, p.zero_stage, p.micro_batch_size)) in dense]
    fig, (ax_s, ax_h) = plt.subplots(1, 2, figsize=(12, 5))
    names = [f"{p.world_size}r {p.split} z{p.zero_stage} {p.selection}" for p, _, _ in pairs]
    ax_s.bar(range(len(pairs)), [r["tokens_per_sec"] / d["tokens_per_sec"] for _, r, d in pairs])
    ax_s.axhline(1.0, color="black", lw=0.8)
    ax_s.set_title("selection tokens/s relative to dense")
    ax_h.bar(range(len(pairs)), [100 * (r["time_threshold_ms"] + r["time_threshold_comm_ms"]) / d["step_ms"]
                                 for _, r, d in pairs])
    ax_h.set_title("threshold time (incl. its collectives), % of dense step")
    for ax in (ax_s, ax_h):
        ax.set_xticks(range(len(pairs)), names, rotation=70, fontsize=7, ha="right")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    ours, pretrain = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe's pretrain.json")
    p.add_argument("--deepspeed-config", help="the recipe's ds_config.json, for the ZeRO points (its batch entries "
                                              "are left to the point)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layouts", nargs="+", default=["tp1pp1"],
                   help="tp<N>pp<M> ... (DP = world / (N x C x M)), or auto: every TP x PP x DP of world / C that "
                        "fits the model")
    p.add_argument("--context-parallel-sizes", type=int, nargs="+", default=[1], metavar="C",
                   help="--context-parallel-size of the points, each C crossed with every layout")
    p.add_argument("--virtual-stages", type=int, nargs="+", default=[1], metavar="V",
                   help="model chunks per pipeline rank (the interleaved 1F1B schedule: "
                        "--num-layers-per-virtual-pipeline-stage = layers / (PP x V)); layouts with PP > 1 run at "
                        "each V, PP 1 only at V 1")
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0], choices=[0, 1, 2, 3],
                   help="0: our data parallelism; 1-3: DeepSpeed ZeRO through the deepspeed launcher")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", help="default: the recipe's")
    p.add_argument("--selections", nargs="+", default=["none"], help="none or <policy>:<alpha>, e.g. eslm:0.5")
    p.add_argument("--scaling", choices=["strong", "weak"], default="strong",
                   help="strong: the recipe's global batch at every size; weak: it times world / smallest world")
    p.add_argument("--warmup-iters", type=int, default=2, help="raised to --timed-iters when smaller (the timed iterations must be one log interval)")
    p.add_argument("--timed-iters", type=int, default=3)
    p.add_argument("--point-timeout", type=float, default=1800.0, help="seconds before a point counts as failed")
    p.add_argument("--out-dir", required=True,
                   help="absent, empty or an earlier scaling_study output (its finished points are reused)")
    p.add_argument("--force", action="store_true", help="write into --out-dir although it holds other files")
    p.add_argument("--project-to", type=int, nargs="*", default=[],
                   help="GPU counts to project each measured layout to (tools/scaling_model.py)")
    p.add_argument("--network", default="h100-nvlink-ib", help="tools/scaling_model.NETWORKS preset")
    p.add_argument("--gpus-per-node", type=int, help="override the preset's")
    p.add_argument("--intra-bandwidth-gbps", type=float, help="override: intra-node link, Gbit/s")
    p.add_argument("--inter-bandwidth-gbps", type=float, help="override: inter-node link, Gbit/s")
    p.add_argument("--intra-latency-us", type=float, help="override: intra-node latency, microseconds")
    p.add_argument("--inter-latency-us", type=float, help="override: inter-node latency, microseconds")
    args = p.parse_args(ours)
    args.pretrain = pretrain
    if args.timed_iters < 1 or args.warmup_iters < 0:
        raise UserError(f"--timed-iters must be >= 1 and --warmup-iters >= 0, got {args.timed_iters}, "
                        f"{args.warmup_iters}")
    if min(args.virtual_stages) < 1:
        raise UserError(f"--virtual-stages must be >= 1, got {args.virtual_stages}")
    if min(args.context_parallel_sizes) < 1:
        raise UserError(f"--context-parallel-sizes must be >= 1, got {args.context_parallel_sizes}")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    ours = check_output_dir(args.out_dir, TOOL, "--out-dir", args.force)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ours:
        mark(str(out), TOOL)
    recipe = parse_args(["--config", args.config, *args.pretrain])
    points = sweep(args, recipe)
    results = measure(args, points)
    study = [p for p, _ in results]
    rows = [row(p, result) for p, result in results]
    add_efficiency(rows, study)
    projected = project(args, study, rows) if args.project_to else []
    write_csv(out / "scaling.csv", rows, COLUMNS)
    if projected:
        write_csv(out / "projection.csv", projected, list(projected[0]))
        print("\npredicted vs measured step time (ms):")
        for p, r in zip(study, rows):
            if r.get("predicted_step_ms") is not None:
                print(f"  {p.name}: measured {r['step_ms']:.1f} predicted {r['predicted_step_ms']:.1f} "
                      f"error {100 * r['projection_error']:+.1f}%"
                      + ("" if r.get("heldout_error") is None else
                         f" (held out: {100 * r['heldout_error']:+.1f}%)"))
    write_file(str(out / "scaling.md"), markdown(rows, projected))
    plots(out, study, rows, projected)
    print(f"\nwrote {out}/scaling.csv, scaling.md, throughput.png, breakdown.png, selection.png"
          + (", projection.csv" if projected else ""))


if __name__ == "__main__":
    main()
