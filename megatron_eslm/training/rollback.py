"""In-memory snapshots and rollback: what a run does when its steps keep going non-finite or its loss spikes
(what PaLM and OPT did by hand: restore an earlier state and go on past the batches that led there).

Decisions are taken at log intervals, where `reduce_step_stats` has read the interval's numbers to the host
anyway, so none of this adds a host sync; `--log-interval 1` checks every iteration. The numbers are the
same on every rank (global loss sums, and skip flags decided by the global gradient norm), so every rank
takes the same decision without a collective.

  skip      a step whose gradient norm is NaN/inf leaves parameters and optimizer state untouched
            (`step.optimizer_step`); counted as skipped_iterations in the records
  rollback  when the last --max-consecutive-skips steps were all skipped, or the interval's loss exceeds
            --rollback-on-spike x its running average (an exponential average over intervals, weight 0.1
            for the newest): restore model, optimizer and selection state from the last vetted snapshot
            (else the last checkpoint under --save; else stop with one line). Iteration, data position and
            random streams go on: the iterations since the snapshot become skipped iterations, exactly as
            if each had been non-finite (tests/test_rollback.py checks that equality).
  snapshot  every --snapshot-interval iterations, after its interval passed the checks: a copy of this
            rank's whole checkpoint state in CPU memory (model, optimizer, selection state, data position,
            RNG; `host_copy.HostCopy`: pinned buffers reused across snapshots, copied with non_blocking on
            the compute stream, so the host does not wait and the next step's kernels run after the copy);
            a rollback restores its model, optimizer and selection state, and `snapshot_replicas.py` writes
            it whole. A snapshot holds its last update, whose effect on the loss shows only in the next
            interval, so it becomes the rollback target ("vetted") only after the next interval passes
            without a skip or a spike; until then the previous one stays the target. Two copies of the state
            in CPU memory (vetted, pending); three in a multi-rank run with --save, which keeps the vetted
            one before too, for the emergency write when ranks die (the survivors may hold different
            vettings: `snapshot_replicas.py`); five with --snapshot-replicas (the peer's last two).
"""
from __future__ import annotations

from megatron_eslm.config.faults import FaultsConfig
from megatron_eslm.distributed import launch
from megatron_eslm.errors import UserError
from megatron_eslm.training import checkpointing, snapshot_replicas
from megatron_eslm.training.host_copy import HostCopy
from megatron_eslm.training.optimizer import load_optimizer_state

LOSS_AVERAGE_WEIGHT = 0.1  # of the newest interval in the running loss average


class Snapshot:
    """One rank's checkpoint state (`checkpointing.full_state`, plus its shard directory's name) at
    `iteration`, in CPU memory."""

    def __init__(self) -> None:
        self.iteration: int | None = None
        self._copy = HostCopy()

    def take(self, iteration: int, state: dict) -> None:
        self.iteration = iteration
        self._copy.take(state)

    def state(self) -> dict:
        """The copied state, once the copies have landed."""
        return self._copy.result()


class Recovery:
    """Skip accounting, snapshots and rollbacks of one run (see the module docstring)."""

    def __init__(self, cfg: FaultsConfig, save_dir: str | None):
        self.cfg = cfg
        self.save_dir = save_dir
        # the vetted snapshot first; in a multi-rank run with --save the one vetted before it too, which the
        # emergency write needs when survivors hold different vettings (`snapshot_replicas.py`)
        self.kept = [Snapshot() for _ in range(2 if save_dir is not None and launch.world_size() > 1 else 1)]
        self.pending = Snapshot()
        self.peer = snapshot_replicas.Mirror()  # the vetted snapshots of the rank one node behind (--snapshot-replicas)
        self.loss_average: float | None = None
        if cfg.snapshot_replicas:
            snapshot_replicas.check_peers(cfg.snapshot_replicas)

    def _reason(self, record: dict) -> str | None:
        cfg, loss = self.cfg, record["lm_loss"]
        if cfg.max_consecutive_skips and record["consecutive_skips"] >= cfg.max_consecutive_skips:
            return f"{record['consecutive_skips']} consecutive non-finite steps (--max-consecutive-skips " \
                   f"{cfg.max_consecutive_skips})"
        if cfg.rollback_on_spike and self.loss_average is not None and loss > cfg.rollback_on_spike * self.loss_average:
            return f"training loss {loss:.4f} above {cfg.rollback_on_spike} x its running average " \
                   f"{self.loss_average:.4f} (--rollback-on-spike)"
        return None

    def check(self, record: dict, trainer) -> dict | None:
        """At a log interval: roll back if `record` (the interval's) says so, returning the event's record;
        else vet the pending snapshot, update the loss average and take a snapshot when one is due."""
        reason = self._reason(record)
        if reason is None:
            if record["skipped_iterations"] == 0 and self.pending.iteration is not None:
                self.kept.insert(0, self.pending)  # the oldest kept copy takes the next snapshot
                self.pending = self.kept.pop()
                self.pending.iteration = None
                if self.cfg.snapshot_replicas:  # collective: every rank vets at the same iteration
                    self.peer.exchange(self.vetted.state())
            loss = record["lm_loss"]
            if loss == loss and abs(loss) != float("inf"):
                self.loss_average = loss if self.loss_average is None else \
                    (1 - LOSS_AVERAGE_WEIGHT) * self.loss_average + LOSS_AVERAGE_WEIGHT * loss
            every = self.cfg.snapshot_interval
            if every and trainer.iteration % every == 0:
                state = checkpointing.full_state(trainer.iteration, trainer.checkpoint_state())
                self.pending.take(trainer.iteration, {**state, "shard": checkpointing.shard_dir()})
            return None
        restored, source = self._restore(trainer, reason)
        self.pending.iteration = None  # taken after the restored state: no longer a descendant of it
        return {"iteration": trainer.iteration, "event": "rollback", "reason": reason,
                "restored_iteration": restored, "source": source,
                "skipped_batches": (trainer.iteration - restored) * trainer.cfg.training.global_batch_size}

    @property
    def vetted(self) -> Snapshot:
        """The rollback target."""
        return self.kept[0]

    def _restore(self, trainer, reason: str) -> tuple[int, str]:
        if self.vetted.iteration is not None:
            state, restored, source = self.vetted.state(), self.vetted.iteration, "snapshot"
        else:
            loaded = checkpointing.load_checkpoint(self.save_dir, load_rng=False) if self.save_dir else None
            if loaded is None:
                raise UserError(f"iteration {trainer.iteration}: {reason}, and no snapshot (--snapshot-interval) "
                                "or checkpoint (--save) to roll back to")
            state, restored, source = loaded, loaded["iteration"], f"checkpoint {self.save_dir}"
        trainer.model.load_state_dict(state["model"])
        load_optimizer_state(trainer.optimizer, state["optimizer"])
        if trainer.policy is not None and state.get("policy"):
            trainer.policy.load_state_dict(state["policy"])
        return restored, source

    def emergency_save(self, dead: set[int]) -> str | None:
        """Ranks `dead` died: write the vetted snapshots this rank holds (its own last two, its peer's) and is
        the one writer of as a checkpoint under --save (`snapshot_replicas.py`); returns what happened, None
        without a snapshot or --save."""
        if self.save_dir is None or self.vetted.iteration is None:
            return None
        held = {launch.rank(): [kept.state() for kept in self.kept if kept.iteration is not None]}
        if self.peer.held():
            held[snapshot_replicas.peer_behind(launch.rank())] = self.peer.held()
        return snapshot_replicas.write_emergency_checkpoint(self.save_dir, held, dead,
                                                             mirrored=bool(self.cfg.snapshot_replicas))
