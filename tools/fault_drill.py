#!/usr/bin/env python
"""Fault drills: kill -9 at random moments and resume, with and without --async-save; and the time a save
blocks training, with and without --async-save.

    python tools/fault_drill.py --trials 20                 # the kill -9 table
    python tools/fault_drill.py --ranks 4 --trials 20       # kill -9 of one rank of four, watchdog and replicas
    python tools/fault_drill.py --save-bench --num-layers 12 --hidden-size 768 --vocab-size 32768

Kill drill: a reference run (`python -m megatron_eslm.pretrain`, a small GPT on random tokens, ESLM, a
checkpoint every iteration) gives the final weights and records. Each trial starts the same run, waits for
its first published checkpoint, and sends it SIGKILL: on even trials after a random later record and a delay
drawn uniformly over an iteration's wall time, on odd trials as soon as a save is in flight (a temporary
checkpoint directory appears: the background thread's with --async-save), so kills land during writes
too. It then runs it again with --load to the end. "resumed" counts the trials whose second run found a
checkpoint to load; a trial resumed exactly when the final checkpoint's weights equal the reference's bit for
bit and the resumed run's records equal the reference's (wall-clock fields aside). "during a write" counts
the kills that found a temporary checkpoint directory.

Rank drill (--ranks 2 or 4): the same small run with tensor parallelism over every rank (each rank holds a
shard nobody else has), plain processes on one host faking two nodes (LOCAL_WORLD_SIZE = ranks / 2), a
checkpoint every 8 iterations, a snapshot every 2 (checkpoints rarer than snapshots, as in a real run: with a
checkpoint every 4 the snapshot vetted 2 later was never newer than it, and no trial showed what replicas
save), --distributed-timeout-minutes 0.1; with and without --snapshot-replicas 1. Each trial kills one
random rank with SIGKILL after a random record (at least the 5th: a vetted snapshot exists) plus a delay drawn over an iteration's wall time, and reads
the survivors' stderr as it comes: "named" counts the trials in which every survivor's last line is one
"error: " line naming the killed rank, "culprit s" is the time from the kill to the first such line.
"published" counts the trials whose survivors published the emergency snapshot (`snapshot_replicas.py`:
only with replicas can every shard be there). The run is then resumed on all ranks with --load;
"from snapshot" counts the resumes that started from the newest snapshot the survivors held whole (the
newest published), or, when they held none newer than the last checkpoint under --save (nothing is then
written, by design), from that checkpoint: as recent, and as exact (`_as_recent`). "exact" counts those
whose every final shard's weights equal the uninterrupted run's bit for bit and whose records equal its
records.

Save bench: one process builds the model of the size flags, takes two training steps (so AdamW's moments
exist), then times `Trainer.save` three times each way: synchronous (the whole write, fsync, manifest and
publish block training), and --async-save (training blocks for the copy to CPU buffers, pinned on a GPU,
and the collective setup; the write follows in a background thread, timed until it is published).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import numpy as np
import torch

from megatron_eslm.config import parse_args
from megatron_eslm.data.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.training.checkpointing import FILENAME, TRACKER, checkpoint_file, iteration_dir, latest_iteration
from megatron_eslm.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_sec", "iteration_time_ms", "tflops_per_gpu", "mfu", "max_memory_allocated")


def random_corpus(prefix: str, vocab_size: int, documents: int = 400, seed: int = 0) -> str:
    """Random-token documents as an indexed dataset (no tokenizer to train): `prefix`."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(get_bin_path(prefix), np.uint16) as builder:
        for _ in range(documents):
            builder.add_item(rng.integers(1, vocab_size, size=int(rng.integers(20, 200))))
            builder.end_document()
        builder.finalize(get_idx_path(prefix))
    return prefix


def run_flags(prefix: str, vocab_size: int, iters: int, save: str, metrics: str, extra: list[str]) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--data-path", prefix, "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(vocab_size), "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1",
            "--num-workers", "0", "--seed", "3", "--save", save, "--save-interval", "1", "--load", save,
            "--metrics-file", metrics, *extra]


def _command(argv: list[str]) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "megatron_eslm.pretrain", *argv], env


def records(metrics: str) -> dict[int, dict]:
    """The training records by iteration (a resumed run's rewrite of an iteration replaces the first)."""
    out = {}
    if os.path.exists(metrics):
        for line in open(metrics):
            if line.strip() and '"lm_loss"' in line:
                record = json.loads(line)
                out[record["iteration"]] = {k: v for k, v in record.items() if k not in TIMING}
    return out


def final_weights(save: str) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_file(save, latest_iteration(save)), weights_only=False)["model"]


def _count_records(metrics: str) -> int:
    if not os.path.exists(metrics):
        return 0
    with open(metrics) as fh:
        return sum('"lm_loss"' in line for line in fh)


def _writing(save: str) -> bool:
    return bool(glob.glob(os.path.join(save, "iter_*.tmp")))


def trial(workdir: str, argv_for, after: int | None = None, delay: float = 0.0, in_write: bool = False,
          run_here=None, popen=subprocess.Popen) -> dict:
    """One run killed with SIGKILL (None `after`: not killed, the reference), once its first checkpoint is
    published and its `after`-th record is written: `delay` seconds later, or with `in_write` at the next save
    in flight; then resumed to the end (`run_here`: see `_resume`); what happened. `popen` starts the run's
    process (the suite's forks a warm server: tests/forked.py)."""
    save, metrics = os.path.join(workdir, "ckpt"), os.path.join(workdir, "metrics.jsonl")
    command, env = _command(argv_for(save, metrics))
    proc = popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = writing = False
    if after is not None:
        tracker = os.path.join(save, TRACKER)
        while proc.poll() is None and (not os.path.exists(tracker) or _count_records(metrics) < after):
            time.sleep(0.002)
        if in_write:
            while proc.poll() is None and not _writing(save):
                time.sleep(0.0005)
        else:
            time.sleep(delay)
        if proc.poll() is None:
            writing = _writing(save)
            proc.send_signal(signal.SIGKILL)
            killed = True
    _, stderr = proc.communicate()
    if after is None:  # the reference: one uninterrupted run
        error = _last_line(stderr) if proc.returncode != 0 else None
        return {"killed": False, "writing": False, "resumed_from": None, "save": save, "metrics": metrics,
                **({"error": error} if error else {})}
    before = latest_iteration(save) if os.path.isdir(save) else None
    # the resumed run appends its records; a record of an iteration after the kill point is replaced
    error = _resume(command, env, argv_for(save, metrics), run_here)
    if error is not None:
        return {"killed": killed, "writing": writing, "resumed_from": before, "exact": False, "error": error}
    return {"killed": killed, "writing": writing, "resumed_from": before, "save": save, "metrics": metrics}


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1] if stderr.strip() else "exit code"


def _resume(command: list[str], env: dict, argv: list[str], run_here=None) -> str | None:
    """Run the command to the end, in a new process or, given `run_here` (the suite's: one start-up less a
    trial), by calling `run_here(argv)` in this one; the error line, None on success."""
    if run_here is None:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        return _last_line(done.stderr) if done.returncode != 0 else None
    try:
        run_here(argv)
    except SystemExit as exit_:
        return f"exit code {exit_.code}"
    return None


VOCAB = 512  # the drills' random corpus and model


@contextlib.contextmanager
def drill_folder(workdir: str | None, name: str) -> Iterator[tuple[str, str]]:
    """(a drill's folder, its random corpus): `workdir`, or a temporary folder removed at the end."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix=name)
    try:
        yield workdir, random_corpus(os.path.join(workdir, "corpus"), VOCAB)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def drill(trials: int, async_modes: list[bool], iters: int = 12, seed: int = 0, workdir: str | None = None,
          log=print, run_here=None, popen=subprocess.Popen) -> list[dict]:
    """Run the kill drill; one summary row per mode: trials, killed mid-run, killed during a write, resumed
    from a checkpoint, exact (`run_here`, `popen`: see `trial`)."""
    rows = []
    with drill_folder(workdir, "fault_drill_") as (workdir, prefix):
        for async_save in async_modes:
            extra = ["--async-save"] if async_save else []
            argv_for = lambda save, metrics: run_flags(prefix, VOCAB, iters, save, metrics, extra)  # noqa: E731
            ref_dir = os.path.join(workdir, f"reference-{async_save}")
            os.makedirs(ref_dir)
            reference = trial(ref_dir, argv_for, popen=popen)
            if "error" in reference:
                raise RuntimeError(f"the reference run failed: {reference['error']}")
            ref_records, ref_weights = records(reference["metrics"]), final_weights(reference["save"])
            iteration_s = statistics.mean(r["iteration_time_ms"] for r in
                                          map(json.loads, open(reference["metrics"])) if "lm_loss" in r) / 1000
            rng = random.Random(seed)
            outcome = {"mode": "async" if async_save else "sync", "trials": trials, "killed": 0, "writing": 0,
                       "resumed": 0, "exact": 0}
            for t in range(trials):
                trial_dir = os.path.join(workdir, f"trial-{async_save}-{t}")
                os.makedirs(trial_dir)
                # after a random record, at a random moment of the next iteration (its save included), or
                # (odd trials) at the next save in flight
                result = trial(trial_dir, argv_for, after=rng.randrange(1, iters - 1), delay=rng.uniform(0, iteration_s),
                               in_write=t % 2 == 1, run_here=run_here, popen=popen)
                exact = "error" not in result and records(result["metrics"]) == ref_records and all(
                    torch.equal(a, b) for a, b in zip(final_weights(result["save"]).values(), ref_weights.values()))
                outcome["killed"] += result["killed"]
                outcome["writing"] += result["writing"]
                outcome["resumed"] += result["resumed_from"] is not None
                outcome["exact"] += exact
                log(f"{outcome['mode']} trial {t}: killed={result['killed']} during_write={result['writing']} "
                    f"resumed_from={result['resumed_from']} exact={exact}" + (f" ({result['error']})"
                                                                                if "error" in result else ""))
                shutil.rmtree(trial_dir)
            rows.append(outcome)
    return rows


RANK_FLAGS = ["--save-interval", "8", "--snapshot-interval", "2", "--distributed-timeout-minutes", "0.1",
              "--hidden-dropout", "0", "--attention-dropout", "0"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Ranks:
    """`ranks` plain processes of one run on this host, as two nodes (LOCAL_WORLD_SIZE = ranks / 2), whose
    stderr lines are collected with the time they arrived."""

    def __init__(self, argv: list[str], ranks: int) -> None:
        command, env = _command(argv)
        port, per_node = _free_port(), ranks // 2
        self.procs = [subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       env={**env, "RANK": str(rank), "WORLD_SIZE": str(ranks),
                                            "LOCAL_RANK": str(rank % per_node), "LOCAL_WORLD_SIZE": str(per_node),
                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                      for rank in range(ranks)]
        self.lines: list[list[tuple[float, str]]] = [[] for _ in self.procs]
        self._readers = [threading.Thread(target=self._read, args=(rank,), daemon=True) for rank in range(ranks)]
        for reader in self._readers:
            reader.start()

    def _read(self, rank: int) -> None:
        for line in self.procs[rank].stderr:
            self.lines[rank].append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout_s: float = 300) -> list[int]:
        """The exit codes, once every process ended (those still running after `timeout_s` are killed: -9)."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in self._readers:
            reader.join()
        return [proc.returncode for proc in self.procs]

    def errors(self, rank: int) -> list[tuple[float, str]]:
        return [(at, line) for at, line in self.lines[rank] if line.startswith("error: ")]


def final_shards(save: str) -> dict[str, dict[str, torch.Tensor]]:
    """The model weights of every shard of the latest checkpoint, by shard directory."""
    directory = iteration_dir(save, latest_iteration(save))
    return {os.path.relpath(path, directory): torch.load(path, weights_only=False)["model"]
            for path in sorted(glob.glob(os.path.join(directory, "*", FILENAME)))}


def _names(line: str, victim: int) -> bool:
    """Whether a survivor's error line names `victim` as the rank that died."""
    return f"rank {victim} stopped answering" in line or (victim == 0 and "rank 0 is gone" in line)


def rank_trial(workdir: str, argv_for, ranks: int, after: int, delay: float, victim: int) -> dict:
    """One run of `ranks` ranks, rank `victim` killed with SIGKILL `delay` seconds after its `after`-th
    record, then resumed on every rank to the end; what happened."""
    save, metrics = os.path.join(workdir, "ckpt"), os.path.join(workdir, "metrics.jsonl")
    run = Ranks(argv_for(save, metrics), ranks)
    while _count_records(metrics) < after and all(proc.poll() is None for proc in run.procs):
        time.sleep(0.002)
    time.sleep(delay)
    if any(proc.poll() is not None for proc in run.procs):
        run.wait(10)
        return {"killed": False, "error": f"the run ended before the kill: {run.lines}"[-2000:]}
    run.procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    run.wait(120)
    survivors = [rank for rank in range(ranks) if rank != victim]
    last = {rank: run.errors(rank)[-1] if run.errors(rank) else (None, "") for rank in survivors}
    named = [at for at, line in last.values() if _names(line, victim)]
    saved = [int(match[1]) for _, line in last.values()
             if (match := re.search(r"snapshot of iteration (\d+) saved as", line))]
    snapshot = max(saved, default=None)  # survivors may publish S - N and S: the tracker names the newest
    before = latest_iteration(save) if os.path.isdir(save) else None
    resumed = Ranks(argv_for(save, metrics), ranks)
    codes = resumed.wait()
    outcome = {"killed": True, "victim": victim, "named": len(named) == len(survivors),
               "culprit_s": min(named) - killed_at if named else None, "published": snapshot is not None,
               "snapshot": snapshot, "resumed_from": before, "save": save, "metrics": metrics,
               "as_recent": _as_recent([line for _, line in last.values()], snapshot, before),
               "lines": {rank: line for rank, (_, line) in last.items()}}
    if any(codes):
        outcome["error"] = next(line for rank, code in enumerate(codes) if code
                                for _, line in resumed.lines[rank][-1:]) if any(resumed.lines) else "exit code"
    return outcome


def _as_recent(lines: list[str], published: int | None, resumed_from: int | None) -> bool:
    """Whether the resume started from the newest snapshot the survivors (`lines`: their last lines) held
    whole, or from a checkpoint at least as recent. That is the newest one `published`, if any; else each
    writer's line names the newest iteration at which it held all of its shards, and as the survivors
    publish whatever is complete and newer than the checkpoint, the newest whole one is no newer than the
    oldest of those. A survivor's line that says neither (its write failed) fails the trial."""
    if resumed_from is None or published is not None:
        return resumed_from is not None and resumed_from == published
    held = [re.search(r"snapshot of iteration (\d+)", line) for line in lines]
    if not all(match or "written by other survivors" in line for match, line in zip(held, lines)):
        return False
    newest_whole = min((int(match[1]) for match in held if match), default=None)
    return newest_whole is not None and resumed_from >= newest_whole


def rank_drill(trials: int, ranks: int, iters: int = 16, seed: int = 0, workdir: str | None = None,
               log=print, modes: tuple[bool, ...] = (True, False)) -> list[dict]:
    """The rank drill (module docstring), one summary row per mode (with, without --snapshot-replicas 1)."""
    if ranks not in (2, 4):
        raise UserError(f"--ranks {ranks}: the rank drill runs 2 or 4 ranks (tensor parallelism over 4 heads)")
    if iters < 8:
        raise UserError(f"--iters {iters}: the rank drill kills after the 5th record and before the last two; "
                        "give it at least 8")
    rows = []
    with drill_folder(workdir, "fault_drill_ranks_") as (workdir, prefix):
        for replicas in modes:
            extra = ["--tensor-model-parallel-size", str(ranks), *RANK_FLAGS,
                     *(["--snapshot-replicas", "1"] if replicas else [])]
            argv_for = lambda save, metrics: run_flags(prefix, VOCAB, iters, save, metrics, extra)  # noqa: E731
            ref_dir = os.path.join(workdir, f"reference-{replicas}")
            os.makedirs(ref_dir)
            reference = Ranks(argv_for(os.path.join(ref_dir, "ckpt"), os.path.join(ref_dir, "metrics.jsonl")), ranks)
            if any(reference.wait()):
                raise RuntimeError(f"the reference run failed: {[lines[-1:] for lines in reference.lines]}")
            ref_metrics = os.path.join(ref_dir, "metrics.jsonl")
            ref_records, ref_shards = records(ref_metrics), final_shards(os.path.join(ref_dir, "ckpt"))
            iteration_s = statistics.mean(r["iteration_time_ms"] for r in map(json.loads, open(ref_metrics))
                                          if "lm_loss" in r) / 1000
            rng = random.Random(seed)
            mode = "replicas" if replicas else "no replicas"
            row = {"mode": mode, "trials": trials, "named": 0, "culprit_s": [], "published": 0,
                   "from_snapshot": 0, "exact": 0}
            for t in range(trials):
                trial_dir = os.path.join(workdir, f"trial-{replicas}-{t}")
                os.makedirs(trial_dir)
                result = rank_trial(trial_dir, argv_for, ranks, after=rng.randrange(5, iters - 2),
                                    delay=rng.uniform(0, iteration_s), victim=rng.randrange(ranks))
                exact = "error" not in result and records(result["metrics"]) == ref_records and all(
                    torch.equal(a, b) for name, shard in final_shards(result["save"]).items()
                    for a, b in zip(shard.values(), ref_shards[name].values()))
                from_snapshot = bool(result.get("as_recent"))
                row["named"] += bool(result.get("named"))
                row["culprit_s"] += [result["culprit_s"]] if result.get("culprit_s") is not None else []
                row["published"] += bool(result.get("published"))
                row["from_snapshot"] += from_snapshot
                row["exact"] += exact
                culprit = "-" if result.get("culprit_s") is None else f"{result['culprit_s']:.1f} s"
                log(f"{mode} trial {t}: killed rank {result.get('victim')}, named={result.get('named')} "
                    f"culprit {culprit}, published={result.get('snapshot')} resumed_from={result.get('resumed_from')} "
                    f"from_snapshot={from_snapshot} exact={exact}"
                    + (f" ({result['error']})" if "error" in result else "")
                    + f"; survivors' lines: {result.get('lines')}")
                shutil.rmtree(trial_dir)
            rows.append(row)
    return rows


def save_bench(args: argparse.Namespace) -> list[dict]:
    """Median time `Trainer.save` blocks training, sync and async, and the async write's total time."""
    workdir = tempfile.mkdtemp(prefix="save_bench_")
    try:
        prefix = random_corpus(os.path.join(workdir, "corpus"), args.vocab_size, documents=200)
        rows = []
        for async_save in (False, True):
            save = os.path.join(workdir, "async" if async_save else "sync")
            argv = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
                    "--num-attention-heads", str(args.num_attention_heads), "--seq-length", "128",
                    "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "2",
                    "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(args.vocab_size),
                    "--split", "100,0,0", "--eval-iters", "0", "--num-workers", "0", "--selection", "none",
                    "--save", save, *(["--async-save"] if async_save else [])]
            trainer = Trainer(parse_args(argv), log=lambda *a: None)
            trainer.train()
            if trainer.async_saver is not None:
                trainer.async_saver.wait()
            blocked, total = [], []
            for _ in range(args.repeats):
                trainer.iteration += 1  # a new iteration directory each time
                start = time.perf_counter()
                trainer.save(save)
                blocked.append(time.perf_counter() - start)
                if trainer.async_saver is not None:
                    trainer.async_saver.wait()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                total.append(time.perf_counter() - start)
            size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(save, f"iter_{trainer.iteration:07d}", "**"),
                                                             recursive=True) if os.path.isfile(f))
            params = sum(p.numel() for p in trainer.model.parameters())
            trainer.close()
            rows.append({"mode": "async" if async_save else "sync", "params": params, "bytes": size,
                         "blocked_s": statistics.median(blocked), "total_s": statistics.median(total)})
        return rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kill -9 trials per mode")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations of the drilled run (default 12; 16 with --ranks)")
    parser.add_argument("--ranks", type=int, default=1,
                        help="1: the one-process kill drill; 2 or 4: kill one rank of a tensor-parallel run")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill delays")
    parser.add_argument("--save-bench", action="store_true", help="time the saves instead of the kill drill")
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-attention-heads", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.save_bench:
        rows = save_bench(args)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"save bench on {device}: {rows[0]['params'] / 1e6:.1f} M parameters, checkpoint "
              f"{rows[0]['bytes'] / 2**20:.0f} MiB (weights, AdamW moments, RNG), median of {args.repeats}")
        print(f"{'mode':<6} {'blocks training (s)':>20} {'vs sync':>8} {'written and published (s)':>26}")
        for row in rows:
            print(f"{row['mode']:<6} {row['blocked_s']:>20.3f} {row['blocked_s'] / rows[0]['blocked_s']:>8.3f} "
                  f"{row['total_s']:>26.3f}")
        return
    if args.ranks != 1:
        rows = rank_drill(args.trials, args.ranks, args.iters or 16, args.seed)
        print(f"{'mode':<12} {'trials':>6} {'named':>6} {'culprit s (median, max)':>24} {'published':>10} "
              f"{'from snapshot':>14} {'exact':>6}")
        for row in rows:
            times = row["culprit_s"]
            spread = f"{statistics.median(times):.1f}, {max(times):.1f}" if times else "-"
            print(f"{row['mode']:<12} {row['trials']:>6} {row['named']:>6} {spread:>24} {row['published']:>10} "
                  f"{row['from_snapshot']:>14} {row['exact']:>6}")
        return
    rows = drill(args.trials, [False, True], args.iters or 12, args.seed)
    print(f"{'mode':<6} {'trials':>6} {'killed mid-run':>15} {'during a write':>15} {'resumed':>8} "
          f"{'resumed exactly':>16}")
    for row in rows:
        print(f"{row['mode']:<6} {row['trials']:>6} {row['killed']:>15} {row['writing']:>15} {row['resumed']:>8} "
              f"{row['exact']:>16}")


if __name__ == "__main__":
    main()
