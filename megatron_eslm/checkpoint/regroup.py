"""Resume a checkpoint saved with another number of model chunks per pipeline rank (the interleaved
schedule's --num-layers-per-virtual-pipeline-stage, or none): the same (TP, PP) ranks hold other layers
then, so this rank's model and optimizer state are cut from the whole checkpoint, as a reshape would write
them (`reader.py`, `writer.shard_state`). The files hold global layer numbers through their layout record,
so a checkpoint does not depend on the chunks of the run that reads it. Every rank reads the checkpoint
(memory-mapped; its whole model passes through host memory once, in float32); the RNG states are the
rank's own, as in any resume."""
from __future__ import annotations

from megatron_eslm import parallel_state
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.checkpoint.writer import shard_state
from megatron_eslm.config import Config


def regrouped_state(root: str, iteration: int, cfg: Config, optimizer: bool) -> dict:
    """This rank's `model` (and with `optimizer`, `optimizer`) state for `cfg`'s layout, from checkpoint
    `iteration` under `root`."""
    layout = parallel_state.layout()
    state = shard_state(read_checkpoint(root, iteration, optimizer), cfg, layout.tp_rank, layout.pp_rank, optimizer)
    return {key: state[key] for key in ("model", "optimizer") if key in state}
