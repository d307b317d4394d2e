"""One evaluation, in training (`Trainer.evaluate`) and of a checkpoint (`python -m megatron_eslm.evaluate`):
the same numbers either way.

  val_loss, val_ppl        the mean loss over every valid token of the validation batches (each sample once)
  samples                  how many samples that was
  datasets                 with a blend of validation datasets: {name: {val_loss, val_ppl, tokens}} per
                           dataset (token-weighted, they average back to val_loss)
  val_cvar50, val_cvar90   the mean of the worst half / tenth of the token losses (`eslm/tail_metrics.py`)
  val_above_threshold      the share of tokens whose score is at or above the last training threshold

Sums are taken on the last pipeline stage over the selection group, then sent to the other stages, so every
rank returns the same record. The exact tail needs every validation token's loss: the last stage keeps the
evaluation's per-token scores on the device until the end (9 bytes a token of this rank: loss, entropy,
valid), e.g. 0.2 GiB for 25 M tokens per rank.
"""
from __future__ import annotations

import math
from typing import Callable, ContextManager, Iterable, Iterator

import torch

from megatron_eslm import parallel_state
from megatron_eslm.config import SelectionConfig
from megatron_eslm.distributed import collectives, watchdog
from megatron_eslm.eslm.distributed_threshold import group_collectives
from megatron_eslm.eslm.policies import token_score
from megatron_eslm.eslm.tail_metrics import above_threshold_fraction, cvar_over
from megatron_eslm.model.lm_head import TokenScores
from megatron_eslm.training.step import forward_backward, reduce_step_stats, stats_device

# the policies whose training threshold is on the loss or entropy score, comparable on validation tokens
THRESHOLD_SCORED = ("eslm", "eslm-is", "ada-eslm")


def _alive_each(loader: Iterable[dict]) -> Iterator[dict]:
    """The loader's batches, telling the watchdog of each (every stage draws each micro-batch): a long
    evaluation is progress, not a stall."""
    for batch in loader:
        watchdog.alive()
        yield batch


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def evaluate(model, dataset, loader, device: torch.device, lm_head_impl: str,
             autocast: Callable[[], ContextManager], selection: SelectionConfig, train_threshold: float | None,
             samples: int, forward: Callable | None = None) -> dict:
    """The record of one pass over `loader` (batches of `dataset`), without `iteration`."""
    names = getattr(dataset, "names", None)
    scores: list[TokenScores] = []
    per_dataset = torch.zeros(len(names) if names else 0, 2, dtype=torch.float64, device=device)

    def on_scores(micro: TokenScores, batch: dict) -> None:
        scores.append(micro)
        if names:  # the samples' blend member, repeated over their tokens (batch-major, as the scores)
            ids = batch["dataset"].to(device, non_blocking=True)
            ids = ids.repeat_interleave(micro.valid.numel() // ids.numel())
            sums = torch.stack([torch.where(micro.valid, micro.loss, 0.0).double(), micro.valid.double()], 1)
            per_dataset.index_add_(0, ids, sums)

    was_training = model.training
    model.eval()
    stats = reduce_step_stats(forward_backward(model, None, _alive_each(loader), len(loader), device, lm_head_impl,
                                               autocast, forward_only=True, forward=forward, on_scores=on_scores))
    model.train(was_training)
    val_loss = stats.loss_sum / max(stats.valid, 1)
    record = {"split": "valid", "val_loss": val_loss, "val_ppl": ppl(val_loss), "samples": samples}
    if names:
        sums = _to_every_stage(per_dataset, over_group=True).tolist()
        record["datasets"] = {name: {"val_loss": loss / max(tokens, 1), "val_ppl": ppl(loss / max(tokens, 1)),
                                     "tokens": int(tokens)} for name, (loss, tokens) in zip(names, sums)}
    return {**record, **_tail(scores, selection, train_threshold)}


def _to_every_stage(values: torch.Tensor, over_group: bool) -> torch.Tensor:
    """`values` of the last stage (summed over the selection group with `over_group`), on every rank."""
    values = values.to(stats_device())
    group = parallel_state.selection_group()
    if over_group and parallel_state.is_pipeline_last_stage() and group is not None:
        collectives.all_reduce(values, group, collectives.METRICS)
    if parallel_state.pipeline_model_parallel_size() > 1:
        collectives.broadcast(values, parallel_state.pipeline_last_rank(),
                              parallel_state.pipeline_model_parallel_group(), collectives.METRICS)
    return values


def _tail(scores: list[TokenScores], selection: SelectionConfig, train_threshold: float | None) -> dict:
    """val_cvar50, val_cvar90 and val_above_threshold (None before a training threshold is logged, and for
    the policies that threshold another score, or sequences' means: --eslm-granularity sequence)."""
    values = torch.full((3,), math.nan, dtype=torch.float64)
    comparable = (selection.selection in THRESHOLD_SCORED and selection.eslm_granularity == "token") or \
        (selection.selection == "eslm-kd" and selection.kd_score == "student")
    threshold = train_threshold if comparable else None
    if parallel_state.is_pipeline_last_stage() and scores:
        comm = group_collectives(parallel_state.selection_group())
        loss, valid = torch.cat([s.loss for s in scores]), torch.cat([s.valid for s in scores])
        above = torch.tensor(math.nan, dtype=torch.float64, device=loss.device)
        if threshold is not None:
            score = torch.cat([token_score(s, selection.eslm_score) for s in scores])
            above = above_threshold_fraction(comm, score, valid, threshold)
        values = torch.stack([cvar_over(comm, loss, valid, 0.5), cvar_over(comm, loss, valid, 0.9), above])
    cvar50, cvar90, above = _to_every_stage(values, over_group=False).tolist()
    return {"val_cvar50": cvar50, "val_cvar90": cvar90, "val_above_threshold": None if math.isnan(above) else above}
