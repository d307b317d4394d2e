"""The training loop: data, steps (`step.py`), logging, evaluation and checkpoints, on one process or on
every rank of a tensor x data x pipeline layout (`parallel_state`)."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch.utils.data import DataLoader

from megatron_eslm import parallel_state
from megatron_eslm.checkpoint.regroup import regrouped_state
from megatron_eslm.config import Config, validate_layout
from megatron_eslm.config.parallel import cp_comm_type, virtual_pipeline_size
from megatron_eslm.data.builder import build_train_valid_test_datasets
from megatron_eslm.data.samplers import ResumableBatchSampler, SkippingBatchSampler
from megatron_eslm.distributed import collectives, deepspeed_config, launch
from megatron_eslm.distributed.deepspeed_engine import DeepSpeedEngine, partitioned_construction
from megatron_eslm.distributed.grad_overlap import OverlappedGradReducer
from megatron_eslm.distributed.grads import finalize_model_grads
from megatron_eslm.distributed.watchdog import Watchdog
from megatron_eslm.errors import UserError
from megatron_eslm.eslm.build import build_policy
from megatron_eslm.model.attention_backend import check_attention_device
from megatron_eslm.model.gpt import GPTModel, padded_vocab_size
from megatron_eslm.model.lm_head import resolve_impl
from megatron_eslm.tensor_parallel.fp8 import convert_to_fp8
from megatron_eslm.tensor_parallel.random import set_random_seeds
from megatron_eslm.tokenizer import build_tokenizer
from megatron_eslm.training import checkpointing, evaluation, throughput
from megatron_eslm.training.async_save import AsyncCheckpointer
from megatron_eslm.training.faults import ExitConditions
from megatron_eslm.training.lr_schedule import check_schedule, learning_rate, schedule_flags
from megatron_eslm.training.metrics import MetricsWriter
from megatron_eslm.training.optimizer import build_optimizer, load_optimizer_state
from megatron_eslm.training.step import (StepStats, forward_backward, optimizer_step, reduce_step_stats,
                                         select_sequences)
from megatron_eslm.training.progress import progress_bar
from megatron_eslm.training.run_summary import start_block
from megatron_eslm.training.rollback import Recovery
from megatron_eslm.training.timers import get_timers, install_timers, uninstall_timers


def build_model(cfg: Config, vocab_size: int, device: torch.device, ds_config: dict | None) -> GPTModel:
    """This rank's part of the model, its parameters created on `device` rather than built on the CPU and
    moved, and under ZeRO-3 partitioned module by module as they are built (`partitioned_construction`).
    No rank holds a whole weight it keeps only a tensor-parallel shard of (`tensor_parallel/initialization.py`)."""
    with torch.device(device), partitioned_construction(ds_config):
        return GPTModel(cfg.model, vocab_size, cfg.training.seed, cfg.parallel.sequence_parallel)


class Trainer:
    def __init__(self, cfg: Config, device: torch.device | None = None, log=print):
        world = launch.world_size()
        validate_layout(cfg, world)  # before any collective: a bad layout is one line on every rank
        self.cfg = cfg
        self.device = device or launch.default_device()
        self.owns_process_group = launch.init_process_group(self.device, single_process=cfg.deepspeed.deepspeed,
                                                             timeout_minutes=cfg.parallel.distributed_timeout_minutes)
        p = cfg.parallel
        if world > 1:
            parallel_state.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                                     p.context_parallel_size, self_group=cfg.deepspeed.deepspeed,
                                                     virtual_pipeline_model_parallel_size=virtual_pipeline_size(
                                                         p, cfg.model.num_layers),
                                                     cp_comm_type=cp_comm_type(p))
        # Rank 0 sits on the first stage, which (after `reduce_step_stats`) knows every logged number.
        self.is_logging_rank = launch.rank() == 0
        self.log = log if self.is_logging_rank else (lambda *args: None)
        ck = cfg.checkpoint
        replaced: list[str] = []  # --overwrite-save: the earlier checkpoints under --save (rank 0 reads them)
        if ck.save:
            with launch.shared_outcome():  # a refusal is raised on every rank, before anything is built
                if launch.rank() == 0:
                    replaced = checkpointing.check_save_dir(ck.save, ck.load, ck.overwrite_save)
        set_random_seeds(cfg.training.seed, self.device)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, cfg.data.vocab_size)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size,
                                            cfg.model.make_vocab_size_divisible_by * p.tensor_model_parallel_size)
        dp = parallel_state.data_parallel_size()
        ds_config = deepspeed_config.resolve(cfg, dp) if cfg.deepspeed.deepspeed else None
        check_attention_device(cfg.model.attention_backend, self.device)
        self.model = build_model(cfg, self.vocab_size, self.device, ds_config)
        if cfg.training.fp8_format is not None:
            convert_to_fp8(self.model, cfg.training.fp8_format, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lm_head_impl = resolve_impl(cfg.selection.lm_head_impl, self.device)
        self.iteration = 0
        self.consumed_samples = 0  # samples trained: a global batch a step
        self.samples_seen = 0  # samples the sampler passed, skipped ones too (--lfr-mode skip)
        self.samples_trained = 0  # samples a training pass ran on (--eslm-granularity sequence: the kept ones)
        self.step_samples = 0  # those of the last step
        t = cfg.training
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        self.engine = None  # --deepspeed: ZeRO owns the data-parallel reduction and the optimizer step
        if ds_config is not None:
            self.engine = DeepSpeedEngine(self.model, self.optimizer, ds_config, self.num_micro_batches,
                                          p.ddp_bucket_size)
        # --overlap-grad-reduce: the data-parallel sums launched from the backward (under --deepspeed, ZeRO's)
        self.grad_reducer = None
        if p.overlap_grad_reduce and self.engine is None and parallel_state.data_context_parallel_size() > 1:
            self.grad_reducer = OverlappedGradReducer(self.model, p.ddp_bucket_size)
        eval_samples = t.eval_iters * t.global_batch_size
        self.skips_samples = cfg.selection.selection == "lfr" and cfg.selection.lfr_mode == "skip"
        self.train_ds, self.valid_ds, _ = build_train_valid_test_datasets(
            cfg.data, cfg.model.seq_length, t.seed, (t.train_iters * t.global_batch_size, eval_samples, 0),
            self.tokenizer.vocab_size, train_one_pass=self.skips_samples)
        self.policy = build_policy(cfg, self.vocab_size, self.device, parallel_state.selection_group(),
                                   len(self.train_ds))
        self.train_sampler: SkippingBatchSampler | None = None  # --lfr-mode skip's, while training
        if self.valid_ds is not None and len(self.valid_ds) < eval_samples:
            self.log(f"validation: {len(self.valid_ds)} distinct samples, fewer than --eval-iters x --global-batch-size "
                     f"= {eval_samples}: each evaluation scores {self._eval_samples()} of them once (whole "
                     f"micro-batches of every data-parallel rank)")
        self.start_point = "fresh"  # or the checkpoint `_load` resumed from, for the start block
        if cfg.checkpoint.load:
            self._load(cfg.checkpoint.load)
        if self.iteration < cfg.optimizer.lr_schedule_start_iter:  # its warmup would start in the past
            raise UserError(f"--lr-schedule-start-iter {cfg.optimizer.lr_schedule_start_iter} is after the iteration "
                            f"this run starts from, {self.iteration} (set it to the loaded iteration to re-warm there)")
        if ck.overwrite_save:  # once the run is set up and its --load read: the last step before training
            with launch.shared_outcome():
                if replaced:
                    checkpointing.remove_run_checkpoints(ck.save, replaced)
                    shown = ", ".join(replaced[:4]) + (", ..." if len(replaced) > 4 else "")
                    self.log(f"--overwrite-save: removed the earlier checkpoints under {ck.save} ({shown})")
        self.skip_run = torch.zeros((), device=self.device)  # consecutive non-finite steps, on the device
        self._train_threshold: float | None = None  # the last logged training threshold
        self.recovery = Recovery(cfg.faults, cfg.checkpoint.save)
        self.async_saver = AsyncCheckpointer(self.log) if cfg.checkpoint.async_save else None
        self.metrics = MetricsWriter(cfg.logging.metrics_file if self.is_logging_rank else None,
                                     cfg.logging.tensorboard_dir if self.is_logging_rank else None)

    # ----------------------------------------------------------------- data
    def _loader(self, dataset, total: int, consumed: int) -> DataLoader:
        sampler = ResumableBatchSampler(total, consumed, self.cfg.training.micro_batch_size,
                                        parallel_state.data_parallel_rank(), parallel_state.data_parallel_size())
        # A private generator: DataLoader otherwise draws its worker seed from the global RNG, which would
        # shift the dropout stream between an uninterrupted and a resumed run.
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                          generator=torch.Generator().manual_seed(self.cfg.training.seed),
                          pin_memory=self.device.type == "cuda")

    def _skipping_loader(self) -> DataLoader:
        """--lfr-mode skip's training data from `samples_seen` on. Without workers: a step's blocks are chosen
        when its first micro-batch is read, after `policy.start_step` has decided the skips (workers would
        read ahead)."""
        t = self.cfg.training
        warmup = self.cfg.selection.selection_warmup_iters
        self.train_sampler = SkippingBatchSampler(
            len(self.train_ds), self.samples_seen, t.micro_batch_size, t.global_batch_size, self.iteration + 1,
            t.train_iters, lambda step: self.policy.skipped(step) if step > warmup else None,
            parallel_state.data_parallel_rank(), parallel_state.data_parallel_size())
        return DataLoader(self.train_ds, batch_sampler=self.train_sampler, num_workers=0,
                          generator=torch.Generator().manual_seed(t.seed),  # as `_loader`'s: the global RNG untouched
                          pin_memory=self.device.type == "cuda")

    def _autocast(self):
        if self.cfg.training.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- step
    def train_step(self, batches, stats: StepStats | None = None) -> StepStats:
        """Forward/backward over the global batch's micro-batches, then one optimizer step; the step's sums
        are added to `stats` (a log interval's) on the device, unreduced: nothing here waits for the
        device (`reduce_step_stats` reads them at the log interval)."""
        timers = get_timers()  # phases (`training/timers.py`); data and threshold nest in forward_backward
        timers.start("forward_backward")
        self.model.train()
        # --selection-warmup-iters: dense until then, the policy not consulted
        policy = self.policy if self.iteration >= self.cfg.selection.selection_warmup_iters else None
        if policy is not None:
            policy.start_step(self.iteration + 1)
        record = None  # --lfr-mode skip: a dense step whose scores the policy records
        if policy is not None and not policy.selects_tokens:
            policy, record = None, policy.record
        num_micro_batches = self.num_micro_batches
        self.step_samples = self.cfg.training.global_batch_size  # trained by this step
        if policy is not None and policy.selects_sequences:  # a dense step on the kept sequences
            kept, stats = select_sequences(self.model, policy, batches, num_micro_batches, self.device,
                                           self.lm_head_impl, self._autocast, stats)
            batches, num_micro_batches, policy, self.step_samples = iter(kept), len(kept), None, policy.keep
        lr = learning_rate(self.cfg.optimizer, self.iteration)  # Megatron's: the rate after the updates so far
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            # --inject-nan-at-iterations: a NaN loss on every rank's last stage, hence NaN gradients
            injected = self.iteration + 1 in self.cfg.faults.inject_nan_at_iterations
            stats = forward_backward(self.model, policy, batches, num_micro_batches, self.device,
                                     self.lm_head_impl, self._autocast, grad_scale=math.nan if injected else 1.0,
                                     stats=stats, grad_reducer=self.grad_reducer, on_scores=record)
            timers.stop("forward_backward")
            timers.start("grads_reduce")
            if self.grad_reducer is not None:
                self.grad_reducer.finish()  # what remains of the data-parallel sums: the wait
            finalize_model_grads(self.model, self.cfg.parallel.ddp_bucket_size,
                                 data_parallel=self.grad_reducer is None)
            timers.stop("grads_reduce")
            timers.start("optimizer")
            stats.grad_norm, skipped = optimizer_step(self.model, self.optimizer, lr, self.cfg.optimizer.clip_grad)
            self.skip_run = (self.skip_run + 1) * skipped
            stats.add_step(skipped, self.skip_run)
        else:
            self.engine.start_step()
            stats = forward_backward(self.model, policy, batches, self.num_micro_batches, self.device,
                                     self.lm_head_impl, self._autocast, grad_scale=self.engine.grad_scale,
                                     backward=self.engine.backward, forward=self.engine.forward, stats=stats,
                                     accumulate_into_grad=False, on_scores=record)
            timers.stop("forward_backward")
            timers.start("optimizer")  # ZeRO-1's deferred reduction nests in it as grads_reduce
            stats.grad_norm = self.engine.step(lr)
        timers.stop("optimizer")
        stats.lr = lr
        stats.steps += 1
        return stats

    def _samples_seen(self) -> int:
        """After a step: the samples trained, plus those a skipping sampler passed over."""
        if self.train_sampler is not None:
            return self.train_sampler.position
        return self.samples_seen + self.cfg.training.global_batch_size

    # ----------------------------------------------------------------- eval
    def evaluate(self) -> dict | None:
        """The same first --eval-iters validation batches each time (each sample once), so evaluations are
        comparable across the run and before/after training (`training/evaluation.py`)."""
        if self.valid_ds is None or self.cfg.training.eval_iters == 0:
            return None
        t = self.cfg.training
        loader = self._loader(self.valid_ds, min(len(self.valid_ds), t.eval_iters * t.global_batch_size), 0)
        record = evaluation.evaluate(self.model, self.valid_ds, loader, self.device, self.lm_head_impl,
                                     self._autocast, self.cfg.selection, self._train_threshold,
                                     self._eval_samples(),
                                     forward=self.engine and self.engine.forward)
        return {"iteration": self.iteration, **record}

    def _eval_samples(self) -> int:
        """The samples an evaluation scores: the first --eval-iters x --global-batch-size of the validation
        set (at most all of it), cut to whole micro-batches of every data-parallel rank (the sampler drops
        an incomplete last one)."""
        t = self.cfg.training
        per_micro_step = t.micro_batch_size * parallel_state.data_parallel_size()
        return min(len(self.valid_ds), t.eval_iters * t.global_batch_size) // per_micro_step * per_micro_step

    # ----------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        """Run to --train-iters; returns the logged training records, one per log interval, each over the
        steps since the previous one (every step is in exactly one record)."""
        cfg, t = self.cfg, self.cfg.training
        for line in start_block(self):
            self.log(line)
        if self.iteration >= t.train_iters:
            self.log(f"nothing left to train: the checkpoint under --load {cfg.checkpoint.load} is at iteration "
                     f"{self.iteration}, --train-iters is {t.train_iters} (raise it to train on)")
            return []
        timers = install_timers(cfg.logging.timing_log_level, self.device)
        collectives.reset()  # the records' comm_bytes_* (level 2) count this run's steps, not the setup's
        loader = self._skipping_loader() if self.skips_samples else \
            self._loader(self.train_ds, len(self.train_ds), self.consumed_samples)
        batches = timers.timed(iter(loader), "data")
        records = []
        start_iteration, start = self.iteration, time.perf_counter()
        interval, tic = None, time.perf_counter()
        self._outside_steps = 0.0  # seconds of the interval spent on evaluations and checkpoints
        exits = ExitConditions(cfg.faults)
        stop = None  # why the run stops before --train-iters (training/faults.py)
        # a dead or stalled rank named in one line (distributed/watchdog.py)
        watchdog = Watchdog(60 * cfg.parallel.distributed_timeout_minutes, self.recovery.emergency_save) \
            if launch.world_size() > 1 else None
        try:
            while self.iteration < t.train_iters and stop is None:
                interval = self.train_step(batches, interval)
                timers.start("logging")  # the work between two steps; eval and checkpoint nest in it
                self.iteration += 1
                # the host all-reduces that agree on a pending async save and a stop run per log interval
                at_log = self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters
                if self.async_saver is not None and at_log:
                    self.async_saver.poll()
                if watchdog is not None:
                    watchdog.progress(self.iteration)
                self.consumed_samples += t.global_batch_size
                self.samples_seen = self._samples_seen()
                self.samples_trained += self.step_samples
                stop = exits.reason(self.iteration, agree=at_log)
                if at_log or stop:
                    stats = reduce_step_stats(interval)  # the interval's one host read: waits for the device
                    # the interval ends here, for the wall clock and the phases (read in the record) alike:
                    # the rest of this line's logging is the next interval's
                    now = time.perf_counter()
                    record = self._train_record(stats, now - tic)
                    self._train_threshold = record["threshold"]  # the evaluation's val_above_threshold
                    records.append(record)
                    self.metrics.write(record)
                    self.log(self._console_line(record, time.perf_counter() - start, start_iteration))
                    self._recover(record)
                    interval, tic, self._outside_steps = None, now, 0.0
                elif self.iteration == start_iteration + 1:  # a first sign of life: host time only, no device read
                    self.log(self._first_iteration_line(time.perf_counter() - start, start_iteration))
                save = cfg.checkpoint
                evaluate = self.iteration % t.eval_interval == 0 or self.iteration == t.train_iters
                checkpoint = save.save and ((save.save_interval and self.iteration % save.save_interval == 0)
                                            or self.iteration == t.train_iters or stop is not None)
                if evaluate or checkpoint:
                    outside = time.perf_counter()  # both end in a host read: their host time is their time
                    if evaluate:
                        with timers.phase("eval"):
                            self._log_eval()
                    if checkpoint:
                        with timers.phase("checkpoint"):
                            self.save(save.save)
                    self._outside_steps += time.perf_counter() - outside
                    if watchdog is not None:
                        watchdog.progress(self.iteration)
                timers.stop("logging")
            if self.async_saver is not None:
                self.async_saver.wait()  # the last checkpoint is on disk when train() returns
        except RuntimeError as err:  # torch.distributed's errors among them: a peer gone?
            culprits = watchdog.culprits() if watchdog is not None else None
            if culprits is None:
                raise
            if not watchdog.claim():  # its thread is already saving and reporting: it ends the process
                watchdog.join()
            dead = watchdog.fail()
            saved = self.recovery.emergency_save(dead)
            watchdog.linger(dead)
            raise UserError(f"rank {launch.rank()} at iteration {self.iteration}: {type(err).__name__} in a "
                            f"collective; {culprits}{f'; {saved}' if saved else ''}", rank_local=True) from None
        finally:
            exits.close()  # the signal's previous handler back, also when a step raised
            if watchdog is not None:
                watchdog.close()
        if stop is not None:
            self.log(f"stopped after iteration {self.iteration}: {stop}")
        return records

    def _train_record(self, stats: StepStats, elapsed: float) -> dict:
        """A log interval's record: losses, kept fraction and threshold over all its tokens and micro-batches;
        times, FLOPs and throughput per iteration (means over its `iterations`); lr and grad norm of its last
        step; this rank's peak memory in the interval; the phase times at --timing-log-level 1 or 2, and at 2
        this rank's communication bytes per iteration by collective kind (`distributed/collectives.py`). Tokens/s
        and TFLOP/s count the training steps' time: the interval's evaluations and checkpoints are left out
        (they are in iteration_time_ms, and in time_eval_ms / time_checkpoint_ms). FLOPs (executed, dense,
        paper: `training/flops.py`) are per iteration; consumed_samples (= samples_trained), samples_seen and
        tokens_trained (samples_trained x --seq-length) are cumulative, host counts of the run so far."""
        tokens = self.cfg.training.global_batch_size * self.cfg.model.seq_length * stats.steps
        flops = stats.flops(self.cfg.model, self.vocab_size)
        training = elapsed - self._outside_steps
        tflops = throughput.tflops_per_gpu(flops.executed, training, launch.world_size())
        return {
            "iteration": self.iteration,
            "lm_loss": stats.loss_sum / max(stats.valid, 1),
            "kept_loss": stats.kept_loss_sum / max(stats.kept, 1),
            "kept_fraction": stats.kept / max(stats.valid + stats.dropped_valid, 1),  # of the candidates
            "threshold": stats.threshold,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_sec": tokens / training,
            "iteration_time_ms": 1000.0 * elapsed / stats.steps,
            "executed_flops": flops.executed / stats.steps,
            "dense_flops": flops.dense / stats.steps,
            "paper_flops": flops.paper / stats.steps,
            "iterations": stats.steps,
            "consumed_samples": self.consumed_samples,
            "samples_seen": self.samples_seen,
            "samples_trained": self.samples_trained,
            "tokens_trained": self.samples_trained * self.cfg.model.seq_length,
            "kept": stats.kept,
            "threshold_bound": stats.threshold_bound if stats.thresholds else None,
            "threshold_bytes": stats.threshold_bytes,
            "nonfinite": stats.nonfinite,
            "skipped_iterations": stats.skipped,
            "consecutive_skips": stats.skip_run,
            "tflops_per_gpu": tflops,
            "mfu": throughput.mfu(tflops, throughput.peak_tflops(self.device, self.cfg.logging.peak_tflops)),
            "max_memory_allocated": throughput.max_memory_allocated(self.device),
            **get_timers().interval_ms(stats.steps),
            **(collectives.interval_bytes(stats.steps) if self.cfg.logging.timing_log_level >= 2 else {}),
        }

    def _console_line(self, r: dict, elapsed: float, start_iteration: int) -> str:
        done = self.iteration - start_iteration
        todo = self.cfg.training.train_iters - start_iteration
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        return (f"{progress_bar(done, todo, elapsed)} | iter {self.iteration} | lm loss {r['lm_loss']:.4f} | "
                f"kept loss {r['kept_loss']:.4f} | kept {r['kept_fraction']:.2f} | threshold {threshold} | "
                f"lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | {r['tokens_per_sec']:.0f} tok/s | "
                f"{r['tflops_per_gpu']:.3g} TFLOP/s per GPU"
                + ("" if r["mfu"] is None else f" (MFU {100 * r['mfu']:.1f}% of bf16 peak)")
                + f" | flops {r['executed_flops'] / r['dense_flops']:.3f}x dense"
                + (f" | {r['nonfinite']} non-finite scores left out" if r["nonfinite"] else "")
                + (f" | {r['skipped_iterations']} non-finite steps skipped" if r["skipped_iterations"] else ""))

    def _first_iteration_line(self, elapsed: float, start_iteration: int) -> str:
        """After the first iteration, when it is not a logging one: its host time and the ETA it gives. It
        reads no device value (on a GPU the host may still be ahead of the queued kernels, and the first
        iteration includes warm-up: the interval lines refine the ETA)."""
        todo = self.cfg.training.train_iters - start_iteration
        return (f"{progress_bar(1, todo, elapsed)} | iter {self.iteration} | first iteration {elapsed:.1f} s "
                f"(host time); losses every --log-interval {self.cfg.logging.log_interval} iterations")

    def _recover(self, record: dict) -> None:
        """Snapshots and rollbacks at a log interval (`training/rollback.py`)."""
        event = self.recovery.check(record, self)
        if event is not None:
            self.skip_run.zero_()
            self.metrics.write(event)
            self.log(f"rolled back at iteration {self.iteration} to the {event['source']} of iteration "
                     f"{event['restored_iteration']}: {event['reason']}; going on past "
                     f"{event['skipped_batches']} samples")

    def _log_eval(self) -> None:
        record = self.evaluate()
        if record is not None:
            self.metrics.write(record)
            self.log(f"validation at iter {record['iteration']} | loss {record['val_loss']:.4f} | "
                     f"ppl {record['val_ppl']:.2f} | {record['samples']} samples")

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self, with_model: bool = True) -> dict:
        """What a checkpoint (and a snapshot) of this rank holds, RNG and layout aside: `with_model` adds the
        model and optimizer state (DeepSpeed writes those itself)."""
        state = {
            "scheduler": {"num_steps": self.iteration, **schedule_flags(self.cfg.optimizer)},
            "consumed_samples": self.consumed_samples,
            "samples_seen": self.samples_seen,
            "samples_trained": self.samples_trained,
            "config": self.cfg.to_dict(),
            "policy": self.policy.state_dict() if self.policy is not None else {},
            "vocab_size": self.tokenizer.vocab_size,  # the offline tools cut the padding rows with it
        }
        if with_model:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        return state

    def save(self, root: str) -> str:
        state = self.checkpoint_state(with_model=self.engine is None)
        if self.engine is None:
            if self.async_saver is not None:
                self.async_saver.save(root, self.iteration, state)
                return checkpointing.iteration_dir(root, self.iteration)
            path = checkpointing.save_checkpoint(root, self.iteration, state)
        else:  # DeepSpeed writes the model and its ZeRO partitions, our state goes along as client state
            path = checkpointing.save_checkpoint(root, self.iteration, state, write=self.engine.save,
                                                 deepspeed_tag=True)
        self.log(f"saved checkpoint {path}")
        return path

    def _load(self, root: str) -> None:
        """Resume from `root`, or with --finetune take only its weights; --no-load-optim and --no-load-rng
        leave the moments and the RNG fresh (docs/continual.md)."""
        ck = self.cfg.checkpoint
        load_rng, load_optim = not (ck.finetune or ck.no_load_rng), not (ck.finetune or ck.no_load_optim)
        try:
            if self.engine is None:
                state = checkpointing.load_checkpoint(root, load_rng=load_rng, fallback=ck.ckpt_fallback, log=self.log)
                if state is not None and checkpointing.saved_virtual_size(state["layout"]) != \
                        parallel_state.virtual_pipeline_model_parallel_size():  # other layers on this rank
                    state.update(regrouped_state(root, state["iteration"], self.cfg, load_optim and "optimizer" in state))
                if state is not None:
                    self.model.load_state_dict(state["model"])
                    if load_optim:
                        if "optimizer" not in state:
                            raise UserError(f"--load {root}: the checkpoint holds weights only (written by an "
                                            "offline tool); load it with --finetune or --no-load-optim")
                        load_optimizer_state(self.optimizer, state["optimizer"])
            else:
                state = checkpointing.load_checkpoint(
                    root, read=lambda directory: self._read_deepspeed(directory, load_optim), load_rng=load_rng,
                    fallback=ck.ckpt_fallback, log=self.log)
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"--load {root}: checkpoint does not fit this model ({first})") from None
        if state is None:
            self.log(f"no checkpoint under --load {root}; starting from scratch")
            self.start_point = f"fresh (no checkpoint under --load {root} yet)"
            return
        if ck.finetune:
            self.log(f"--finetune: the weights of {root} (iteration {state['iteration']}), from iteration 0")
            self.start_point = f"the weights of {root} (iteration {state['iteration']}), --finetune"
            return
        if not ck.override_opt_param_scheduler:
            check_schedule(root, state.get("scheduler", {}), self.cfg.optimizer)
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        self.samples_seen = state.get("samples_seen", self.consumed_samples)  # older checkpoints: nothing skipped
        self.samples_trained = state.get("samples_trained", self.consumed_samples)  # ... and every sample trained
        if self.policy is not None and state.get("policy"):  # alpha of ada-eslm, table of lfr
            self.policy.load_state_dict(state["policy"])
        self.log(f"resumed from {root} at iteration {self.iteration} ({self.consumed_samples} samples)")
        self.start_point = f"resumed from {root} at iteration {self.iteration}"

    def _read_deepspeed(self, directory: str, optimizer: bool) -> dict:
        state = self.engine.load(directory, optimizer)
        if state is None or "layout" not in state:
            raise UserError(f"--load {directory}: no DeepSpeed checkpoint of this run there (saved without "
                            "--deepspeed?)")
        return state

    def close(self) -> None:
        """Close the metrics sinks and leave the layout (and the process group, if this trainer joined it)."""
        self.metrics.close()
        uninstall_timers()
        parallel_state.destroy_model_parallel()
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
