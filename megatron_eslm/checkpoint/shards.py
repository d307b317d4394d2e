"""How one shard of a layout names, splits and orders its parameters, learned from the model itself.

A miniature of the checkpoint's model (the same layers, heads, groups, normalization, biases, positions
and tying, but one channel per head, an MLP and a vocabulary of TP rows) is built for the shard in one
process (`parallel_state.offline_layout`): its parameters carry the same names, the same
`partition_dim` attributes (`tensor_parallel/layers.py`) and the same AdamW grouping as the real one,
while drawing a few numbers instead of billions. So the tools follow the model code, not a copy of its
sharding rules.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from megatron_eslm import parallel_state
from megatron_eslm.config import ModelConfig
from megatron_eslm.config.model import finalize_model
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.parallel_state import Layout
from megatron_eslm.training.optimizer import param_groups

LAYER = re.compile(r"^layers\.(\d+)\.")
TIED_COPY = "word_embeddings.weight"


@dataclass
class ShardSpec:
    names: list[str]  # the shard's state_dict keys (its local layer indices)
    partition_dims: dict[str, int | None]  # None: replicated over the tensor-parallel ranks
    optimizer_order: list[str]  # AdamW's parameter indices 0, 1, ... in name form
    layer_numbers: tuple[int, ...]  # global index of each local layer (non-contiguous under interleaving)
    has_tied_copy: bool  # a later stage's own copy of the tied word embedding (the LM head)

    def canonical(self, name: str) -> str:
        """The TP1/PP1 name of a local parameter name (global layer index)."""
        match = LAYER.match(name)
        if match is None:
            return name
        return f"layers.{self.layer_numbers[int(match.group(1))]}.{name[match.end():]}"


def miniature(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The same architecture with the smallest sizes the layout can split."""
    cfg = finalize_model(dataclasses.replace(cfg))
    return dataclasses.replace(
        cfg, hidden_size=cfg.num_attention_heads, kv_channels=1, ffn_hidden_size=tp, seq_length=1,
        max_position_embeddings=1, recompute_granularity=None, recompute_method=None, recompute_num_layers=None)


def shard_spec(cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int, vp: int = 1) -> ShardSpec:
    """Shard (tp_rank, pp_rank) of a TP x PP layout with `vp` model chunks per pipeline rank."""
    with parallel_state.offline_layout(Layout(tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank, vp=vp)):
        model = GPTModel(miniature(cfg, tp), vocab_size=tp)
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in param_groups(model, 0.0) for param in group["params"]]
    dims = {name: (param.partition_dim if getattr(param, "tensor_model_parallel", False) else None)
            for name, param in model.named_parameters()}
    return ShardSpec(names=list(model.state_dict()), partition_dims=dims, optimizer_order=order,
                     layer_numbers=model.layer_numbers,
                     has_tied_copy=pp_rank > 0 and model.tied and model.post_process)
