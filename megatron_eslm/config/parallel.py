"""Tensor, sequence, pipeline and data parallel flags; whether they fit the world size is checked by
`validate_layout`, once the world size is known."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import one_of, positive

TITLE = "distributed (TP x CP x DP x PP = world size)"
CP_COMM_TYPES = ("p2p", "all_gather")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None  # None: one model chunk per pipeline rank
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    cp_comm_type: str | None = None  # None: all_gather, p2p with attention dropout (`cp_comm_type`)
    ddp_bucket_size: int = 25_000_000  # gradient elements per data-parallel all-reduce
    overlap_grad_reduce: bool = False
    distributed_timeout_minutes: float = 10  # Megatron's default


HELP = {
    "tensor_model_parallel_size": "ranks that split each layer's weights (Megatron's TP)",
    "pipeline_model_parallel_size": "pipeline stages; the layers are split evenly over them",
    "num_layers_per_virtual_pipeline_stage": "with PP: the interleaved 1F1B schedule (Megatron's): the layers "
                                             "in virtual stages of N, assigned round-robin to the pipeline ranks "
                                             "(each holds num-layers / (PP x N) model chunks), which cuts the "
                                             "pipeline bubble by that factor; needs the micro-batch count a "
                                             "multiple of PP (docs/parallelism.md)",
    "sequence_parallel": "with TP: shard norms and dropout along the sequence (all-gather/reduce-scatter)",
    "context_parallel_size": "ranks that split every sequence (Megatron's CP): each holds 2 of its 2 x CP "
                             "chunks, chunks r and 2CP-1-r, and attention all-gathers the keys and values "
                             "(docs/parallelism.md); needs --seq-length divisible by 2 x CP, and with dropout "
                             "--keyed-dropout",
    "cp_comm_type": f"{' or '.join(CP_COMM_TYPES)}: how context-parallel attention gets the other chunks' keys "
                    "and values: passed around the ring, overlapped with each block's attention and never held "
                    "whole (p2p), or all-gathered once per layer (all_gather: the fused SDPA kernels, the whole "
                    "sequence's keys and values held and saved); unset means all_gather (the ring's blocks run "
                    "the math path, not a fused kernel, so it is opt-in until measured on GPUs), and p2p with "
                    "attention dropout, which the all-gather form does not run",
    "ddp_bucket_size": "gradient elements per data-parallel all-reduce bucket",
    "overlap_grad_reduce": "launch each bucket's data-parallel all-reduce from the last micro-batch's backward, "
                           "as soon as its gradients are final, instead of after the backward (nothing to "
                           "do without data parallelism; under --deepspeed: ZeRO-2/3's overlap_comm)",
    "distributed_timeout_minutes": "how long a collective, or a rank waiting while rank 0 alone writes a "
                                   "checkpoint or builds the index cache, may wait before the job fails "
                                   "(NCCL's collectives: twice this, so that the watchdog acts first); "
                                   "also how long a rank may make no progress before it exits naming the "
                                   "stuck rank (distributed/watchdog.py; a dead one is named within five "
                                   "heartbeats, a sixth of this each)",
}


def validate_parallel(p: ParallelConfig) -> None:
    for value, flag in ((p.tensor_model_parallel_size, "--tensor-model-parallel-size"),
                        (p.pipeline_model_parallel_size, "--pipeline-model-parallel-size"),
                        (p.context_parallel_size, "--context-parallel-size"),
                        (p.ddp_bucket_size, "--ddp-bucket-size"),
                        (p.distributed_timeout_minutes, "--distributed-timeout-minutes")):
        positive(value, flag)
    if p.num_layers_per_virtual_pipeline_stage is not None:
        positive(p.num_layers_per_virtual_pipeline_stage, "--num-layers-per-virtual-pipeline-stage")
    if p.cp_comm_type is not None:
        one_of(p.cp_comm_type, CP_COMM_TYPES, "--cp-comm-type")


def virtual_pipeline_size(p: ParallelConfig, num_layers: int) -> int:
    """Model chunks per pipeline rank (Megatron's virtual pipeline size): 1 without interleaving."""
    if p.num_layers_per_virtual_pipeline_stage is None:
        return 1
    return num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)


def cp_comm_type(p: ParallelConfig) -> str:
    """--cp-comm-type, or its default: the all-gather form, whose two SDPA calls per layer run the fused
    kernels. Megatron defaults to the ring, but ours computes each block on the math path, holding an
    [L, 2L] float32 score block per head (4 GiB a block at the llama3_8b_32k recipe's shape): it is opt-in
    until a fused block kernel is measured on GPUs. Attention dropout runs in the ring whatever this says
    (`CoreAttention`)."""
    return p.cp_comm_type or "all_gather"
