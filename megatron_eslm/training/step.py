"""One training step, top to bottom (the trainer adds data, logging, evaluation and checkpoints):

  for each of this rank's micro-batches (1F1B across stages when pipelined, `pipeline_parallel/schedules`):
      hidden = model(tokens)                      # transformer forward, all tokens; on the last stage the
                                                  # model's forward goes on with the head below
      policy.prepare(tokens, labels, index)       # the policy's own passes (teacher, reference), sample ids
      out = model.loss(hidden, labels, policy)    # LM-head pass 1 over all tokens -> per-token scores;
                                                  # policy -> kept tokens (VaR threshold over the
                                                  # selection group); loss = sum of kept losses / the
                                                  # kept count over the selection group
      loss = policy.objective(model, hidden, out) # out.loss, plus distillation for eslm-kd
      (loss / num_micro_batches).backward()       # LM-head backward over kept rows only, then the
                                                  # (dense) transformer backward
  sum gradients over data-parallel replicas (and tied / sequence-parallel copies; --overlap-grad-reduce
  launches the data-parallel sums from the last micro-batch's backward), clip the global gradient norm,
  set the learning rate, optimizer step.
  (--deepspeed: DeepSpeed's engine runs the backward, the data-parallel reduction, the clipping and the
  step; `distributed/deepspeed_engine.py`.)

One ESLM threshold covers one micro-batch index across the selection group: the same micro-batch of
every data-parallel replica, i.e. the micro-batch one process would see with DP times the micro-batch
size, and under context parallelism every sequence shard of it (each rank of the context group holds two
chunks of every sequence: the batch is cut here, `context_parallel/sharding.py`). A micro-batch's
backward cannot wait for the scores of micro-batches that have not run yet (nor can a pipeline's). Each
rank divides its kept losses by the group's kept count, so the replicas' losses add up to the one-process
micro-batch loss and the gradients are summed, not averaged; dense training divides by the group's
valid-token count for the same reason. See docs/parallelism.md.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor

from megatron_eslm import host_syncs, parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.context_parallel.sharding import shard_batch
from megatron_eslm.distributed import collectives
from megatron_eslm.distributed.grad_overlap import OverlappedGradReducer
from megatron_eslm.distributed.grads import clip_grad_norm
from megatron_eslm.eslm.policies import Policy
from megatron_eslm.eslm.sequence import SequencePolicy
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import LMHeadOutput, TokenScores, fuses_dense, weight_cast_cache
from megatron_eslm.pipeline_parallel.p2p_communication import TensorSpec
from megatron_eslm.pipeline_parallel.schedules import Backward, autograd_backward, get_forward_backward_func
from megatron_eslm.training.flops import StepFlops, forward_flops, micro_batch_flops

IGNORE_INDEX = -100


# Sums a micro-batch adds on the device: nothing in the step reads them; `reduce_step_stats` does, at the
# log interval. Their order in `StepStats.sums`:
DEVICE_SUMS = ("loss_sum", "valid", "kept_loss_sum", "kept", "threshold_sum", "thresholds", "threshold_bound",
               "nonfinite", "dropped_valid")
# Known on the host from shapes and the policy's own accounting:
HOST_SUMS = ("tokens", "threshold_bytes", "policy_flops", "dropped_tokens", "scored_dropped_tokens")
# Per optimizer step, on every rank (`StepStats.add_step`):
STEP_VALUES = ("skipped", "skip_run")
SUMMED = DEVICE_SUMS + HOST_SUMS + STEP_VALUES  # what `reduce_step_stats` all-reduces, in this order
# Equal on every rank of the selection group (group totals, equal payloads, step outcomes): not added up
# over it.
_SHARED = ("threshold_bound", "threshold_bytes", "nonfinite") + STEP_VALUES


@dataclass
class StepStats:
    """Sums over the micro-batches of one or more optimizer steps (a log interval), this rank's until
    `reduce_step_stats` turns them into the global batch's host numbers.

    The micro-batch sums accumulate in one float64 device tensor, so a step reads nothing back to the host
    (on a GPU every read waits for the queued kernels). After `reduce_step_stats` the attributes named in
    DEVICE_SUMS hold the reduced host values."""
    sums: torch.Tensor | None = None  # [len(DEVICE_SUMS)] float64
    tokens: int = 0
    threshold_bytes: int = 0  # payload one rank handed to the threshold collectives
    policy_flops: float = 0.0  # the policy's own passes (teacher, reference, scoring): executed, not dense
    # --eslm-granularity sequence: candidate tokens no training pass ran (a dense step on the candidates would
    # have), and those of them the student's scoring forward saw (the paper count's forward)
    dropped_tokens: int = 0
    scored_dropped_tokens: int = 0
    selective: bool = True
    fused_dense: bool = True  # dense training ran the fused head (`model.lm_head.fuses_dense`)
    steps: int = 0  # optimizer steps summed
    lr: float = 0.0  # of the last step
    grad_norm: torch.Tensor | float = 0.0  # of the last step (a device tensor until reduced)
    # Per optimizer step, equal on every rank (decided by the global gradient norm), device tensors until
    # reduced: steps skipped as non-finite, and the run of consecutive skips at the last step.
    skipped: torch.Tensor | int = 0
    skip_run: torch.Tensor | int = 0
    # filled by reduce_step_stats:
    loss_sum: float = 0.0
    valid: int = 0
    kept_loss_sum: float = 0.0
    kept: int = 0
    threshold_sum: float = 0.0
    thresholds: int = 0  # micro-batches with a threshold
    threshold_bound: int = 0  # rank-error bounds B of the thresholds, in tokens (0 for the exact modes)
    nonfinite: int = 0  # valid tokens of the group whose score was NaN or +-inf (left out of the quantile)
    dropped_valid: int = 0  # the valid tokens of `dropped_tokens`

    def add_step(self, skipped: torch.Tensor, skip_run: torch.Tensor) -> None:
        """One optimizer step's outcome (`optimizer_step`), on the device."""
        self.skipped = skipped + self.skipped
        self.skip_run = skip_run

    def add(self, num_tokens: int, out: LMHeadOutput) -> None:
        """One micro-batch's sums, on the device (no host read)."""
        scores, selection = out.scores, out.selection
        zero = scores.loss.new_zeros((), dtype=torch.float64)
        # a threshold of +inf (no finite score in the group) is no threshold
        threshold = zero if selection.threshold is None else selection.threshold.double()
        has_threshold = torch.isfinite(threshold) & (selection.threshold is not None)
        bound = zero if selection.rank_error_bound is None else selection.rank_error_bound
        micro = torch.stack([scores.loss.sum().double(), scores.valid.sum().double(),
                             torch.where(selection.kept, scores.loss, 0.0).sum().double(),
                             selection.kept.sum().double(), torch.where(has_threshold, threshold, 0.0),
                             has_threshold.double(), torch.where(has_threshold, bound, 0.0).double(),
                             zero + selection.nonfinite, zero])
        self._add_sums(micro)
        self.tokens += num_tokens
        self.threshold_bytes += selection.bytes_sent

    def add_dropped(self, tokens: int, valid: Tensor, scored: bool, threshold: Tensor | None) -> None:
        """A sequence-granular step's candidates that no training pass ran (their valid count on the device),
        whether the student's scoring forward saw them, and the step's VaR threshold over the sequences."""
        zero = valid.new_zeros((), dtype=torch.float64)
        has_threshold = zero if threshold is None else torch.isfinite(threshold).double()
        value = zero if threshold is None else torch.where(has_threshold > 0, threshold.double(), 0.0)
        self._add_sums(torch.stack([zero, zero, zero, zero, value, has_threshold, zero, zero, valid.double()]))
        self.dropped_tokens += tokens
        self.scored_dropped_tokens += tokens if scored else 0

    def _add_sums(self, micro: Tensor) -> None:
        self.sums = micro if self.sums is None else self.sums + micro

    @property
    def threshold(self) -> float | None:
        """Mean threshold over the micro-batches, None without ESLM."""
        return self.threshold_sum / self.thresholds if self.thresholds else None

    def flops(self, cfg: ModelConfig, vocab_size: int) -> StepFlops:
        # The FLOPs of a micro-batch are linear in its token counts, so the totals give the sum.
        # A dense step on the same candidates trains the dropped ones too; the paper count charges a forward
        # to every candidate token the student saw and a backward to the trained ones.
        total = micro_batch_flops(cfg, vocab_size, self.tokens, self.valid, self.kept, self.selective,
                                  self.fused_dense)
        total.executed += self.policy_flops
        total.dense = micro_batch_flops(cfg, vocab_size, self.tokens + self.dropped_tokens,
                                        self.valid + self.dropped_valid, 0, False).dense
        total.paper += forward_flops(cfg, vocab_size, self.scored_dropped_tokens, self.scored_dropped_tokens)
        return total


def reduce_step_stats(stats: StepStats) -> StepStats:
    """The sums over the whole global batch, on every rank, as host numbers (the one host read of a log
    interval): summed over the selection group on the last stage (which alone scores tokens), then sent to
    the other stages, so every rank logs what one process would. Thresholds are the same on every replica;
    their mean is unchanged by the sum. The `_SHARED` sums, equal on every rank of the group, are divided
    back by the group's size (exact: integers below 2^53)."""
    device = stats_device()
    local = stats.sums.to(device) if stats.sums is not None else torch.zeros(len(DEVICE_SUMS), dtype=torch.float64,
                                                                                device=device)
    values = torch.cat([local, torch.tensor([float(getattr(stats, name)) for name in HOST_SUMS],
                                            dtype=torch.float64, device=device),
                        torch.stack([torch.as_tensor(getattr(stats, name), dtype=torch.float64).to(device)
                                     for name in STEP_VALUES])])
    group = parallel_state.selection_group()
    if parallel_state.is_pipeline_last_stage() and group is not None:
        collectives.all_reduce(values, group, collectives.METRICS)
        shared = torch.tensor([name in _SHARED for name in SUMMED], device=device)
        values = torch.where(shared, values / torch.distributed.get_world_size(group), values)
    if parallel_state.pipeline_model_parallel_size() > 1:
        collectives.broadcast(values, parallel_state.pipeline_last_rank(),
                              parallel_state.pipeline_model_parallel_group(), collectives.METRICS)
    for name, value in zip(SUMMED, values.tolist()):
        setattr(stats, name, round(value) if name in STEP_VALUES else type(getattr(stats, name))(value))
    stats.grad_norm = float(stats.grad_norm)
    return stats


def stats_device() -> torch.device:
    """Where collectives of small host values live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.is_initialized() and \
        torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def dense_normalizer(labels: torch.Tensor) -> torch.Tensor | None:
    """Dense training's loss divisor under data parallelism: the valid tokens of the micro-batch over the
    selection group, a device tensor (None: this rank's tokens are the whole micro-batch, or no gradient
    is taken)."""
    group = parallel_state.selection_group()
    if group is None or not torch.is_grad_enabled():
        return None
    return collectives.all_reduce((labels != IGNORE_INDEX).sum(), group, collectives.DENSE_NORMALIZER)


def forward_backward(model: GPTModel, policy: Policy | None, batches: Iterator[dict], num_micro_batches: int,
                     device: torch.device, lm_head_impl: str = "torch",
                     autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                     forward_only: bool = False, grad_scale: float = 1.0,
                     backward: Backward = autograd_backward, forward: Callable | None = None,
                     stats: StepStats | None = None, accumulate_into_grad: bool = True,
                     grad_reducer: OverlappedGradReducer | None = None,
                     on_scores: Callable[[TokenScores, dict], None] | None = None) -> StepStats:
    """Accumulate the gradients of this rank's micro-batches (`forward_only`: just score them);
    `policy=None` is dense training. `autocast` wraps the forward only (bf16); backward runs outside it,
    as PyTorch recommends. Each micro-batch loss is multiplied by grad_scale / num_micro_batches and
    handed to `backward`; `forward` runs the model (default: `model` itself). DeepSpeed's engine supplies
    both (`distributed/deepspeed_engine.py`). `accumulate_into_grad`: the LM head adds the tied weight's
    gradient in place into `.grad` (never under DeepSpeed, whose ZeRO hooks the weight's autograd
    accumulation; `model/lm_head.py`). The head's bf16 weight copy is made once for all the micro-batches
    (`weight_cast_cache`: the weights do not change until the optimizer step). `grad_reducer`
    (--overlap-grad-reduce): the last micro-batch's backward launches its data-parallel sums, which the
    caller waits for (`grad_reducer.finish()`). `on_scores` sees each micro-batch's per-token scores and its batch
    (on the last stage). Returns this rank's sums
    (nonzero on the last pipeline stage only), added to `stats` when given (the trainer sums a log
    interval's steps)."""
    if stats is None:
        stats = StepStats(selective=policy is not None,
                          fused_dense=fuses_dense(lm_head_impl, parallel_state.tensor_model_parallel_size()))
    if num_micro_batches == 0:  # e.g. a validation split smaller than one micro-batch per replica
        return stats
    batches = map(shard_batch, batches)  # this context-parallel rank's chunks of every sequence
    first = next(batches)
    # Interleaved pipeline: every model chunk runs every micro-batch, in order: one stream of them per chunk.
    streams = itertools.tee(itertools.chain([first], batches), parallel_state.virtual_pipeline_model_parallel_size())
    micro_batch, seq_length = first["tokens"].shape
    if model.sequence_parallel:
        seq_length //= parallel_state.tensor_model_parallel_size()
    with autocast():  # the forward's: bf16 messages under --bf16
        message_dtype = model.activation_dtype()
    spec = TensorSpec((micro_batch, seq_length, model.cfg.hidden_size), message_dtype, device)
    forward = forward or model

    def forward_step(input_tensor: torch.Tensor | None) -> torch.Tensor:
        batch = next(streams[parallel_state.virtual_pipeline_model_parallel_rank() or 0])
        tokens = batch["tokens"].to(device, non_blocking=True)

        def head(hidden: torch.Tensor) -> tuple[torch.Tensor, LMHeadOutput]:
            labels = batch["labels"].to(device, non_blocking=True)
            if policy is not None:
                policy.prepare(tokens, labels, batch.get("index"))  # reference/teacher pass, sample ids
            normalizer = dense_normalizer(labels) if policy is None else None
            if grad_reducer is not None:
                grad_reducer.watch_head_input(hidden)
            out = model.loss(hidden, labels, policy, impl=lm_head_impl, normalizer=normalizer,
                             accumulate_into_grad=accumulate_into_grad)
            return (out.loss if policy is None else policy.objective(model, hidden, out)), out

        with autocast():
            if not parallel_state.is_pipeline_last_stage():
                return forward(tokens, input_tensor)
            loss, out = forward(tokens, input_tensor, head=head)
        stats.add(tokens.numel(), out)
        if on_scores is not None:  # the evaluation's tail metrics, LFR skip's records
            on_scores(out.scores, batch)
        if policy is not None:
            stats.policy_flops += policy.extra_flops()
        return loss * grad_scale / num_micro_batches

    if grad_reducer is not None:
        forward_step = grad_reducer.launching(forward_step, num_micro_batches)
    with weight_cast_cache():
        get_forward_backward_func()(forward_step, num_micro_batches, forward_only, spec, backward)
    return stats


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                   clip_grad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (clip_grad 0: only measure) the global gradient norm, set the rate, step, unless the norm is
    NaN or inf: then parameters and optimizer state stay untouched. Returns the norm (a 0-dim device
    tensor, read at the log interval) and whether the step was skipped (0/1 float32 on the device).

    The norm is the whole model's (summed over tensor and pipeline shards, of gradients already summed over
    data-parallel replicas), so every rank takes the same decision without another collective; a NaN loss
    on any rank reaches it through the gradient sums. The fused AdamW skips on the device (`found_inf`, as
    torch's GradScaler uses it): no host read. The foreach and loop kernels cannot, so the host reads the
    flag: one sync per step, marked inherent (CUDA's default is fused, `training/optimizer.py`)."""
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], clip_grad)
    found_inf = torch.logical_not(torch.isfinite(grad_norm)).to(torch.float32)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if optimizer.param_groups[0].get("fused"):
        optimizer.found_inf = found_inf
        optimizer.step()
    else:
        with host_syncs.inherent("the foreach/loop AdamW has no on-device skip of a non-finite step"):
            skip = bool(found_inf)
        if not skip:
            optimizer.step()
    return grad_norm, found_inf


def select_sequences(model: GPTModel, policy: SequencePolicy, batches: Iterator[dict], num_micro_batches: int,
                     device: torch.device, lm_head_impl: str, autocast: Callable[[], ContextManager],
                     stats: StepStats | None = None) -> tuple[list[dict], StepStats]:
    """--eslm-granularity sequence: this step's candidates (this rank's `num_micro_batches` of the global
    batch) are scored without autograd (`eslm/sequence.py`), and this rank's micro-batches of the kept
    sequences come back: the group's kept ones in global-batch order, cut as the plain sampler cuts a global
    batch (global micro-steps of micro-batch x R sequences, rank r taking slice r), so each rank trains as
    many as the others and one process on the whole batch trains the same micro-batches. The kept
    sequences' tokens are all-gathered over the group (ints: a sliver of the activations they spare). Adds
    the scoring pass's FLOPs, the dropped candidates and the threshold to `stats` (a new one for a dense
    training pass when None), which comes back with them for that pass. Nothing is read on the host: the kept
    count is the host's `policy.keep`."""
    stats = stats or StepStats(selective=False,
                               fused_dense=fuses_dense(lm_head_impl, parallel_state.tensor_model_parallel_size()))
    candidates = [next(batches) for _ in range(num_micro_batches)]
    micro_batch = candidates[0]["tokens"].shape[0]
    candidate_tokens = sum(batch["tokens"].numel() for batch in candidates)
    group = parallel_state.selection_group()
    ranks = 1 if group is None else torch.distributed.get_world_size(group)
    last = parallel_state.is_pipeline_last_stage()
    local = None
    if policy.student_scores:
        per_sequence = []
        model.eval()  # the model's scores, without dropout; the training pass's RNG streams untouched
        with torch.no_grad():
            forward_backward(model, None, iter(candidates), num_micro_batches, device, lm_head_impl, autocast,
                             forward_only=True,
                             on_scores=lambda scores, batch: per_sequence.append(
                                 policy.sequence_scores(scores, batch["tokens"].shape[0])))
        model.train()
        if last:
            local = torch.stack(per_sequence)
            stats.policy_flops += forward_flops(model.cfg, model.vocab_size, candidate_tokens, candidate_tokens)
    elif policy.proxy is not None:
        per_sequence = []
        with autocast():
            for batch in candidates:
                scores, flops = policy.proxy_scores(batch["tokens"].to(device, non_blocking=True),
                                                    batch["labels"].to(device, non_blocking=True))
                per_sequence.append(scores)
                stats.policy_flops += flops
        local = torch.stack(per_sequence)
    candidates_global = num_micro_batches * micro_batch * ranks
    if last or not policy.student_scores:
        kept, threshold = policy.kept(local, candidates_global, device)
    else:  # a stage before the last: the kept ids from the last stage, which scored
        kept, threshold = torch.empty(policy.keep, dtype=torch.int64, device=device), None
    if policy.student_scores and parallel_state.pipeline_model_parallel_size() > 1:
        collectives.broadcast(kept, parallel_state.pipeline_last_rank(),
                              parallel_state.pipeline_model_parallel_group(), collectives.SEQUENCE_SELECTION)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    mine = kept.view(-1, ranks, micro_batch)[:, rank]  # [kept micro-batches, micro-batch]
    trained, local_fields = {}, {}
    for field in ("tokens", "labels"):
        stacked = local_fields[field] = torch.stack([batch[field] for batch in candidates]).to(device,
                                                                                                 non_blocking=True)
        if group is not None:
            stacked = collectives.all_gather_into_tensor(stacked, group, collectives.SEQUENCE_SELECTION).transpose(0, 1)
        trained[field] = stacked.reshape(-1, stacked.shape[-1])[mine]
    if last:  # this rank's candidates against its share of the kept ones
        dropped = (local_fields["labels"] != IGNORE_INDEX).sum() - (trained["labels"] != IGNORE_INDEX).sum()
        stats.add_dropped(candidate_tokens - trained["tokens"].numel(), dropped, policy.student_scores, threshold)
    return [{"tokens": tokens, "labels": labels} for tokens, labels in zip(trained["tokens"], trained["labels"])], stats
