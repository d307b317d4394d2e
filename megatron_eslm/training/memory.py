"""Per-GPU memory of a training run, computed from its config and layout (computed, not measured): the
parameters, gradients and optimizer states as our own data parallelism or DeepSpeed ZeRO 1-3 hold them,
and the activations autograd saves. `tools/estimate_memory.py` prints it; tests/test_estimate_memory.py
checks the model states against what tiny CPU runs allocate and the activations against what autograd
saves, so the arithmetic here follows the code, tensor by tensor.

Model states, per rank of each pipeline stage (context-parallel ranks are replicas, like data-parallel ones:
DP below is DP x CP):
  ours (no ZeRO)  fp32 parameters, fp32 `.grad` (also under --bf16: autocast), AdamW's fp32 moments and a
                  4-byte `step` per tensor; data parallelism sums the gradients in fp32 buckets.
  DeepSpeed       --bf16 only (docs/deepspeed.md's table): bf16 parameters; fp32 master weights and Adam
                  moments over each flat parameter group, split over DP;
                  ZeRO-1 (BF16_Optimizer) fp32 gradient sums of the whole model, plus each backward's bf16
                          `.grad`; groups padded to a multiple of 2 x DP elements;
                  ZeRO-2  fp32 gradient sums of this rank's partition (DeepSpeed 0.19.8 on; before, of
                          the whole parameters that overlap it); reduce buckets during the backward;
                  ZeRO-3  parameters, gradients and master weights split per tensor (ceil(n / DP) each), the
                          parameters of at most stage3_param_persistence_threshold elements also whole
                          (padded to DP x ceil(n / DP)); a bf16 reduce bucket held for the whole run.
Activations, per micro-batch, with the layout's shards (TP heads and MLP width, SP rows, CP's s / CP tokens
of each sequence, with the whole sequence's keys and values gathered in each layer by the all-gather form,
only its own by the ring): each layer's
norm inputs and statistics, the QKV input and output, the rotated queries and keys, flash attention's
output and log-sum-exp, the MLP's intermediates, dropout masks; the embedding's indices, the final norm,
and the LM head's hidden, log-sum-exp, labels and rows (all tokens: an upper bound on the kept ones).
Under --bf16 without DeepSpeed the parameters stay fp32, and the matmuls and LayerNorms save bf16 copies of
their weights, per micro-batch (the LM head's once per step). 1F1B keeps PP - stage micro-batches in
flight on a stage; under DeepSpeed it also keeps each sent output (DeepSpeed's backward reads it).
Interleaved (VP model chunks a rank): (PP - stage - 1) x 2 + (VP - 1) x PP + 1 micro-batch-chunks of L / (PP
VP) layers in flight (`pipeline_parallel/timetable.py`'s warmup and one), each counted with the stage's
embedding or head: an upper bound (those belong to one chunk only).
Activation recompute (--recompute-granularity full|selective, `layer_units`): a checkpointed block or
group of blocks keeps only its input, and the backward adds one recomputed unit on top of the forward's
end; selective drops the attention core's own tensors (under flash: its log-sum-exp).
Attention is assumed to run a flash kernel (no [s, s] probabilities saved; nor does the ring's math path,
which one process also runs with --keyed-dropout and attention dropout, counted as flash). Not counted: the
dense LM head's fused gradients (--selection none on one tensor-parallel rank, either --lm-head-impl), the
frozen models of eslm-kd and rho1, ZeRO-3's gathered parameters, the CUDA context and the allocator's
fragmentation.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

from megatron_eslm.config import Config, ModelConfig, validate_layout
from megatron_eslm.config.parallel import cp_comm_type, virtual_pipeline_size
from megatron_eslm.distributed import deepspeed_config
from megatron_eslm.errors import UserError
from megatron_eslm.model.gpt import padded_vocab_size
from megatron_eslm.training.recompute import layer_groups, recompute_name

FP32, BF16, INT64 = 4, 2, 8
# DeepSpeed 0.19's defaults for the ZeRO keys read here (deepspeed/runtime/zero/config.py); overlap_comm
# defaults to True at stage 3 only.
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_param_persistence_threshold": 100_000,
                 "sub_group_size": 1_000_000_000, "contiguous_gradients": True}
ZERO_ALIGNMENT = 2  # DeepSpeed pads each flat group to a multiple of 2 x DP elements (nccl_start_alignment_factor)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    cp: int = 1  # context parallel: a rank holds s / cp tokens of each sequence
    vp: int = 1  # model chunks per pipeline rank (the interleaved schedule)
    cp_comm_type: str = "all_gather"  # --cp-comm-type as resolved: the ring (p2p), or the all-gather form

    def describe(self) -> str:
        """`TP2 x CP2 x PP2 x DP1, sequence parallel` (CP named when it splits, VP when interleaved): one
        spelling for the estimate and the training run's start block."""
        return (f"TP{self.tp}{f' x CP{self.cp}' if self.cp > 1 else ''} x PP{self.pp}"
                f"{f' x VP{self.vp}' if self.vp > 1 else ''} x DP{self.dp}"
                f"{', sequence parallel' if self.sequence_parallel else ''}")


class ParamTensor(NamedTuple):
    numel: int  # this rank's elements
    matrix: bool  # 2-D: AdamW's decayed group; biases and norm weights (1-D) are not decayed


# ------------------------------------------------------------------------------------------- parameters
def _norm(m: ModelConfig) -> list[ParamTensor]:
    """LayerNorm: weight and bias; RMSNorm: weight. Replicated over TP."""
    return [ParamTensor(m.hidden_size, False)] * (1 if m.normalization == "RMSNorm" else 2)


def _linear(out_features: int, in_features: int, bias: int | None) -> list[ParamTensor]:
    """A TP shard's weight [out, in] and, when the layer has one, its bias of `bias` elements."""
    return [ParamTensor(out_features * in_features, True)] + ([ParamTensor(bias, False)] if bias else [])


def layer_parameters(m: ModelConfig, tp: int) -> list[ParamTensor]:
    """One transformer block's parameters on one TP rank, in `TransformerBlock.parameters()` order."""
    h, d, f = m.hidden_size, m.kv_channels, m.ffn_hidden_size
    bias = not m.disable_bias_linear
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d // tp
    up = (2 if m.swiglu else 1) * f // tp
    return [*_norm(m),
            *_linear(qkv, h, qkv if bias else None),  # column-parallel: bias split
            *_linear(h, m.num_attention_heads * d // tp, h if bias else None),  # row-parallel: bias whole
            *_norm(m),
            *_linear(up, h, up if bias else None),
            *_linear(h, f // tp, h if bias else None)]


def stage_parameters(m: ModelConfig, vocab_size: int, layout: Layout, stage: int) -> list[ParamTensor]:
    """This rank's parameters on pipeline stage `stage`, in `GPTModel.parameters()` order. `vocab_size`
    is the padded vocabulary. The first stage holds the word embedding (vocabulary rows split over TP)
    and the learned positions (whole); the last the final norm and the head: the untied output layer, or
    (PP > 1) its own copy of the tied embedding."""
    first, last = stage == 0, stage == layout.pp - 1
    tied = not m.untie_embeddings_and_output_weights
    rows = ParamTensor(vocab_size // layout.tp * m.hidden_size, True)
    params = [rows] if first or (last and tied) else []
    if first and m.position_embedding_type == "learned_absolute":
        params.append(ParamTensor(m.max_position_embeddings * m.hidden_size, True))
    params += layer_parameters(m, layout.tp) * (m.num_layers // layout.pp)
    if last:
        params += _norm(m) + ([] if tied else [rows])
    return params


# ----------------------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class ModelStates:
    """Bytes one rank holds for the model and its optimizer; `buffers` are transient communication
    buckets (the data-parallel sum's, DeepSpeed's reduce buckets) and ZeRO-3's persistent one."""
    parameters: int
    gradients: int
    optimizer: int
    buffers: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers


def _groups(params: list[ParamTensor]) -> list[list[int]]:
    """AdamW's parameter groups (`training/optimizer.param_groups`): the matrices, then the rest."""
    return [[p.numel for p in params if p.matrix], [p.numel for p in params if not p.matrix]]


def _padded(numel: int, multiple: int) -> int:
    return -(-numel // multiple) * multiple


def _largest_bucket(params: list[ParamTensor], bucket_elements: int) -> int:
    """Elements of the largest flat bucket `distributed.grads` sums the gradients in (last layer first)."""
    largest = size = 0
    for p in reversed(params):
        size = p.numel if size and size + p.numel > bucket_elements else size + p.numel
        largest = max(largest, size)
    return largest


def _ours(params: list[ParamTensor], dp: int, zero: dict, ddp_bucket_size: int) -> ModelStates:
    """Our data parallelism: everything fp32 and whole; the data-parallel sum's flat bucket."""
    numel = sum(p.numel for p in params)
    bucket = FP32 * _largest_bucket(params, ddp_bucket_size) if dp > 1 else 0
    return ModelStates(FP32 * numel, FP32 * numel, 2 * FP32 * numel + FP32 * len(params), bucket)


def _master_and_adam(partition_numels: list[int]) -> int:
    """fp32 master copies and Adam's two moments of flat partitions, and a `step` per flat tensor."""
    return 3 * FP32 * sum(partition_numels) + FP32 * len(partition_numels)


def _zero1(params: list[ParamTensor], dp: int, zero: dict, ddp_bucket_size: int) -> ModelStates:
    """BF16_Optimizer: its fp32 gradient sums are reduced by our bucketed data-parallel sum."""
    flat = [_padded(sum(group), ZERO_ALIGNMENT * dp) for group in _groups(params)]
    numel = sum(p.numel for p in params)
    bucket = FP32 * _largest_bucket(params, ddp_bucket_size) if dp > 1 else 0
    return ModelStates(BF16 * sum(flat), FP32 * sum(flat) + BF16 * numel,
                       _master_and_adam([n // dp for n in flat]), bucket)


def _overlapping(numels: list[int], dp: int) -> int:
    """Most elements any rank holds of the whole tensors that overlap its share of a flat padded group."""
    size = _padded(sum(numels), ZERO_ALIGNMENT * dp) // dp
    held = [0] * dp
    start = 0
    for n in numels:
        for rank in range(start // size, min((start + n - 1) // size, dp - 1) + 1):
            held[rank] += n
        start += n
    return max(held)


def zero2_sums_the_partition() -> bool:
    """Whether the installed DeepSpeed's ZeRO-2 sums a step's gradients in an fp32 buffer of the rank's
    partition (0.19.8 on: `_build_compact_grad_partition_buffer`) rather than in the whole tensors that
    overlap it (before). Without DeepSpeed installed, the newer."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return True
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3]) >= (0, 19, 8)


def _zero2(params: list[ParamTensor], dp: int, zero: dict, ddp_bucket_size: int) -> ModelStates:
    """DeepSpeedZeroOptimizer: each micro-batch's gradients summed in fp32, in the rank's partition or in
    the whole parameters overlapping it (by DeepSpeed release, `zero2_sums_the_partition`); during a
    backward, bf16 reduce buckets (two with overlap_comm) and, with contiguous_gradients, a bf16 copy of
    the overlapping parameters' gradients."""
    flat = [_padded(sum(group), ZERO_ALIGNMENT * dp) for group in _groups(params)]
    overlapping = sum(_overlapping(group, dp) for group in _groups(params))
    partition = [n // dp for n in flat]
    buckets = zero["reduce_bucket_size"] * (2 if zero.get("overlap_comm", False) else 1)
    contiguous = overlapping if zero["contiguous_gradients"] else 0
    sums = sum(partition) if zero2_sums_the_partition() else overlapping
    return ModelStates(BF16 * sum(flat), FP32 * sums, _master_and_adam(partition), BF16 * (buckets + contiguous))


def _sub_groups(partitions: list[int], sub_group_size: int) -> list[int]:
    """Elements of each flat sub-group ZeRO-3 steps one at a time (`_create_fp16_sub_groups`)."""
    if sum(partitions) <= sub_group_size:
        return [sum(partitions)]
    sizes, size = [], 0
    for i, n in enumerate(partitions):
        size += n
        if size >= sub_group_size or i == len(partitions) - 1:
            sizes.append(size)
            size = 0
    return sizes


def _zero3(params: list[ParamTensor], dp: int, zero: dict, ddp_bucket_size: int) -> ModelStates:
    """DeepSpeedZeroOptimizer_Stage3: every tensor split, small ones also kept whole; fp32 gradient
    partitions; master weights and Adam in flat sub-groups of at most sub_group_size elements."""
    threshold = zero["stage3_param_persistence_threshold"]
    partitions = [[-(-n // dp) for n in group] for group in _groups(params)]
    persistent = sum(_padded(p.numel, dp) for p in params if p.numel <= threshold)  # gathered: padded
    flat = [size for group in partitions if group for size in _sub_groups(group, zero["sub_group_size"])]
    partition = sum(map(sum, partitions))
    return ModelStates(BF16 * (partition + persistent), FP32 * partition, _master_and_adam(flat),
                       BF16 * zero["reduce_bucket_size"] if zero["contiguous_gradients"] else 0)


ZERO_STAGES: dict[int, Callable[[list[ParamTensor], int, dict, int], ModelStates]] = {
    0: _ours, 1: _zero1, 2: _zero2, 3: _zero3}


def model_states(params: list[ParamTensor], zero_stage: int, dp: int, zero: dict | None = None,
                 ddp_bucket_size: int = 25_000_000) -> ModelStates:
    """What one rank holding `params` keeps under ZeRO `zero_stage` (0: our data parallelism) with `dp`
    replicas; `zero` is the ds_config's zero_optimization block (DeepSpeed's defaults fill the rest)."""
    return ZERO_STAGES[zero_stage](params, dp, {**ZERO_DEFAULTS, **(zero or {})}, ddp_bucket_size)


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Kernels:
    """What the device's kernels save where CUDA and the CPU differ (the tests measure on the CPU)."""
    dropout_mask_bytes: int | None  # per element; None: the activation's (the CPU keeps the scaled mask)
    layernorm_stats_fp32: bool  # CUDA's layer_norm keeps mean and rstd in fp32, the CPU's in its input dtype


CUDA = Kernels(dropout_mask_bytes=1, layernorm_stats_fp32=True)
CPU = Kernels(dropout_mask_bytes=None, layernorm_stats_fp32=False)


@dataclass(frozen=True)
class Shapes:
    """One micro-batch on one rank: its tokens and the sizes of what a layer saves."""
    m: ModelConfig
    layout: Layout
    micro_batch: int
    act: int  # bytes of an activation element: 2 under --bf16, else 4
    kernels: Kernels

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.sequence

    @property
    def sequence(self) -> int:
        """This rank's tokens of one sequence: its 2 of 2 x CP chunks under context parallelism."""
        return self.m.seq_length // self.layout.cp

    @property
    def rows(self) -> int:
        """Rows of the residual stream on this rank: the sequence shard under sequence parallelism."""
        return self.tokens // (self.layout.tp if self.layout.sequence_parallel else 1)

    def norm(self) -> int:
        """A norm's saved input and per-row statistics (LayerNorm: mean and rstd; RMSNorm: fp32 rstd)."""
        if self.m.normalization == "RMSNorm":
            return self.rows * (self.m.hidden_size * self.act + FP32)
        return self.rows * (self.m.hidden_size * self.act + 2 * (FP32 if self.kernels.layernorm_stats_fp32
                                                                 else self.act))

    def dropout(self, p: float) -> int:
        """A dropout mask over the residual stream (none at p = 0)."""
        return self.rows * self.m.hidden_size * (self.kernels.dropout_mask_bytes or self.act) if p else 0


def _attention_kept_by_selective(s: Shapes) -> int:
    """The QKV input and output, the rotated queries and keys (rope), the output projection's input: what a
    layer's attention saves outside its core, the core's inputs (q, k, v) and output included. Without rope
    the queries are views of the QKV output unless grouped-query attention regroups them into a copy."""
    m, t, n = s.m, s.tokens, s.m.num_attention_heads // s.layout.tp
    g = m.num_query_groups // s.layout.tp
    d = m.kv_channels
    saved = t * m.hidden_size * s.act + t * (n + 2 * g) * d * s.act + t * n * d * s.act
    if m.position_embedding_type == "rope":
        return saved + t * (n + g) * d * s.act
    return saved + (t * n * d * s.act if n != g else 0)


def _attention_saved(s: Shapes) -> int:
    """Everything a layer's attention saves, nothing recomputed. One sequence on one rank: the above, and
    flash attention's fp32 log-sum-exp (its output is the projection's input).

    Under context parallelism's all-gather form (`context_parallel/attention.py`) the core's keys and
    values are the whole sequence's, gathered ([2, b, s, groups, d], one storage, saved by both chunks' SDPA
    calls), and its output is the two chunks' SDPA outputs, saved by them, plus their concatenation, the
    projection's input. Its local keys and values go into the all-gather, which saves nothing: the rotated
    keys are not saved, nor the QKV output, unless the queries are views of it (no rope, no grouped-query
    copy). The ring (`context_parallel/ring.py`) saves the same but for the keys and values: only this
    rank's, stacked ([2, b, groups, s / CP, d]), the other ranks' pass through; its output in the grouped
    layout and the projection's input (a copy) are the two outputs' worth."""
    m, t, n = s.m, s.tokens, s.m.num_attention_heads // s.layout.tp
    lse = t * n * FP32
    if s.layout.cp == 1:
        return _attention_kept_by_selective(s) + lse
    g, d = m.num_query_groups // s.layout.tp, m.kv_channels
    rope = m.position_embedding_type == "rope"
    queries = t * n * d * s.act if rope or n != g else t * (n + 2 * g) * d * s.act  # a copy, or the QKV output
    keys_values = 2 * (t if s.layout.cp_comm_type == "p2p" else s.micro_batch * m.seq_length) * g * d * s.act
    return t * m.hidden_size * s.act + queries + keys_values + 2 * t * n * d * s.act + lse


def _mlp_saved(s: Shapes) -> int:
    """The MLP's input, and GELU's input and output, or SwiGLU's gate+up projection, silu(gate) and the
    product."""
    width = s.m.ffn_hidden_size // s.layout.tp
    return s.tokens * (s.m.hidden_size + (4 if s.m.swiglu else 2) * width) * s.act


def _layer_saved(s: Shapes) -> int:
    """Everything one transformer block saves, nothing recomputed."""
    return 2 * s.norm() + _attention_saved(s) + _mlp_saved(s) + 2 * s.dropout(s.m.hidden_dropout)


def _layer_input(s: Shapes) -> int:
    """A block's input [b, s(/TP under SP), h]: all a checkpointed block (or group) keeps."""
    return s.rows * s.m.hidden_size * s.act


def _attention_core_saved(s: Shapes) -> int:
    """What the attention core (`CoreAttention`: the scaled_dot_product_attention call) saves beyond its
    inputs and output, i.e. what selective recompute drops per layer.

    Without recompute a flash kernel saves q, k, v, its output and the fp32 log-sum-exp [b, heads, s]
    (CUDA's also two philox scalars for the dropout; CUDA's memory-efficient kernel, which fp32 runs,
    pads the log-sum-exp to a multiple of 32 rows). q, k and v are views of the QKV output or the rotated
    copies and the output is the projection's input, so those stay saved under selective recompute (the
    checkpoint keeps q, k, v as its inputs): it drops the log-sum-exp only, which this returns.
    The math kernel (SDPA's on the CPU with attention dropout, and its fallback where no fused kernel
    applies) saves instead contiguous copies of the scaled q, of k^T and of v (its bmm operands), the
    [b, heads, s, s] softmax output, the dropout mask and the dropped probabilities; under selective
    recompute the checkpoint keeps q, k, v themselves (the QKV output's storage, whole, without rope) and
    none of those. The estimate assumes flash throughout, so it counts none of them.
    Under context parallelism it also drops the (gathered or own) keys and values and the chunks'
    outputs, and keeps the rotated keys and the QKV output as its inputs: what stays is what it keeps
    without CP."""
    return _attention_saved(s) - _attention_kept_by_selective(s)


class LayerUnits(NamedTuple):
    """How the layers of a stage save under the recompute config: `saved` per micro-batch at the end of
    its forward, and `recomputed` the most bytes one recompute adds in the backward on top of them; the
    counts of layers whose bf16 weight copies are saved and recomputed (`_weight_copies`)."""
    saved: int
    recomputed: int
    layers_saved: int
    layers_recomputed: int


def layer_units(s: Shapes, layers: int) -> LayerUnits:
    """The activations of a stage's `layers` blocks under --recompute-granularity/-method/-num-layers.

    none        every block saves everything (`_layer_saved`).
    selective   every block saves everything but the attention core's own tensors (`_attention_core_saved`).
    full        uniform N: each consecutive group of N blocks (the stage's last may be shorter) keeps only
                its input; in the backward one group is recomputed at a time and holds all its blocks'
                saved tensors (their inputs but the first included) until its backward frees them.
                block N: the first N blocks keep only their inputs, the others everything; by the time
                the backward recomputes block N-1 the blocks after it have freed more than one block's
                worth, so recompute adds nothing to the end of the forward, unless N is every block of
                the stage: then one block (uniform 1).
    The peak modelled is the end of the forward of every micro-batch in flight plus one recomputed unit:
    an upper bound by what the backward has freed before that unit (the LM head's tensors on the last
    stage, the later groups' inputs)."""
    m, full = s.m, _layer_saved(s)
    if m.recompute_granularity == "selective":
        return LayerUnits(layers * (full - _attention_core_saved(s)), 0, layers, 0)
    recomputed = [group for group in layer_groups(m, layers) if group.recomputed]  # the model's own groups
    if not recomputed:
        return LayerUnits(layers * full, 0, layers, 0)
    kept = layers - sum(len(group.layers) for group in recomputed)
    if kept:  # block N < layers: the kept blocks free more than one recomputed block before its turn
        return LayerUnits(len(recomputed) * _layer_input(s) + kept * full, 0, kept, 0)
    largest = max(len(group.layers) for group in recomputed)
    return LayerUnits(len(recomputed) * _layer_input(s), largest * full - _layer_input(s), 0, largest)


def _embedding_saved(s: Shapes) -> int:
    """The lookup's int64 indices (TP: this rank's masked copy and the bool mask of ids outside its rows),
    the learned positions' indices, the embedding dropout's mask."""
    m = s.m
    saved = s.tokens * (INT64 + (1 if s.layout.tp > 1 else 0)) + s.dropout(m.hidden_dropout)
    return saved + (s.sequence * INT64 if m.position_embedding_type == "learned_absolute" else 0)


def _head_saved(s: Shapes) -> int:
    """The final norm; the LM head's hidden (gathered under SP), fp32 log-sum-exp, int64 labels and
    int64 rows of its backward (every token: at least as many as any policy keeps)."""
    return s.norm() + s.tokens * (s.m.hidden_size * s.act + FP32 + 2 * INT64)


def _weight_copies(s: Shapes, layers: int, final_norm: bool) -> int:
    """bf16 copies of fp32 weights autograd saves under autocast for `layers` blocks (and the final norm):
    every block matrix, and each LayerNorm's weight and bias (RMSNorm saves its fp32 weight itself); the
    embeddings save none. A checkpointed block saves none; its recompute makes them again."""
    layer = sum(p.numel for p in layer_parameters(s.m, s.layout.tp) if p.matrix)
    norm = 0 if s.m.normalization == "RMSNorm" else 2 * s.m.hidden_size
    return BF16 * ((layer + 2 * norm) * layers + (norm if final_norm else 0))


@dataclass(frozen=True)
class Activations:
    """Bytes of activations on one rank of a stage: `saved` and `weight_copies` per micro-batch, times the
    micro-batches in flight, plus one recompute in the backward (`layer_units`) and copies made once per
    step."""
    saved: int  # what autograd saves for one micro-batch at the end of its forward (and DeepSpeed's kept
    # stage output)
    weight_copies: int  # per micro-batch: bf16 casts of fp32 weights under --bf16 without DeepSpeed
    recomputed: int  # what one recomputed block or group adds in the backward, its weight casts included
    step_copies: int  # once per step: the LM head's bf16 weight cast (same condition)
    in_flight: int

    @property
    def end_of_forward(self) -> int:
        """What the forwards in flight leave for their backwards, before any recompute."""
        return self.in_flight * (self.saved + self.weight_copies) + self.step_copies

    @property
    def total(self) -> int:
        return self.end_of_forward + self.recomputed


def activations(m: ModelConfig, vocab_size: int, layout: Layout, stage: int, micro_batch: int,
                micro_batches: int, bf16: bool, deepspeed: bool, kernels: Kernels = CUDA) -> Activations:
    """Activations of pipeline stage `stage` (one rank) with `micro_batches` per step per replica, under
    `m`'s recompute config."""
    s = Shapes(m, layout, micro_batch, BF16 if bf16 else FP32, kernels)
    first, last = stage == 0, stage == layout.pp - 1
    units = layer_units(s, m.num_layers // (layout.pp * layout.vp))  # a model chunk's (the stage's without VP)
    saved = units.saved
    if m.position_embedding_type == "rope":
        saved += 2 * s.sequence * m.kv_channels * FP32  # the stage's cos and sin tables, this rank's positions
    saved += (_embedding_saved(s) if first else 0) + (_head_saved(s) if last else 0)
    if deepspeed and layout.pp > 1 and not last:
        saved += s.rows * m.hidden_size * s.act
    casts = bf16 and not deepspeed
    weight_copies = _weight_copies(s, units.layers_saved, last) if casts else 0
    recomputed = units.recomputed + (_weight_copies(s, units.layers_recomputed, False) if casts else 0)
    step_copies = BF16 * vocab_size // layout.tp * m.hidden_size if casts and last else 0
    in_flight = min(layout.pp - stage, micro_batches)
    if layout.vp > 1:  # micro-batch-chunks: the interleaved warmup and one
        in_flight = min((layout.pp - stage - 1) * 2 + (layout.vp - 1) * layout.pp + 1, layout.vp * micro_batches)
    return Activations(saved, weight_copies, recomputed, step_copies, in_flight)


# --------------------------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class StageEstimate:
    stage: int
    parameters: int  # elements on one rank
    states: ModelStates
    activations: Activations

    @property
    def total(self) -> int:
        return self.states.total + self.activations.total


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    vocab_size: int  # padded
    zero_stage: int  # 0: our data parallelism
    bf16: bool
    micro_batches: int  # per step per replica
    recompute: str  # `recompute_name`
    stages: list[StageEstimate]
    largest: StageEstimate  # the stage with the largest total
    by_zero_stage: dict[int, ModelStates]  # the largest stage's model states at each ZeRO stage modelled


def estimate(cfg: Config, tokenizer_vocab_size: int, world_size: int, kernels: Kernels = CUDA) -> Estimate:
    """Per-GPU memory of `cfg` on `world_size` GPUs; raises UserError where the layout does not fit (the
    checks every rank runs first) or the run is one this model does not cover."""
    dp = validate_layout(cfg, world_size)
    p, t, m = cfg.parallel, cfg.training, cfg.model
    keyed_attention_dropout = m.attention_dropout and m.keyed_dropout  # runs in the ring (`CoreAttention`)
    layout = Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, dp, p.sequence_parallel,
                    p.context_parallel_size, virtual_pipeline_size(p, m.num_layers),
                    "p2p" if keyed_attention_dropout else cp_comm_type(p))
    replicas = dp * layout.cp  # the data x context ranks: ZeRO partitions, and our reduction sums, over them
    zero: dict = {}
    if cfg.deepspeed.deepspeed:
        if not t.bf16:
            raise UserError("--deepspeed without --bf16: the estimate covers DeepSpeed's bf16 path only "
                            "(docs/deepspeed.md); add --bf16, or estimate without --deepspeed")
        zero = deepspeed_config.resolve(cfg, dp)["zero_optimization"]
    zero_stage = zero.get("stage", 0)
    vocab = padded_vocab_size(tokenizer_vocab_size, m.make_vocab_size_divisible_by * layout.tp)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    params = [stage_parameters(m, vocab, layout, stage) for stage in range(layout.pp)]
    stages = [StageEstimate(stage, sum(q.numel for q in params[stage]),
                            model_states(params[stage], zero_stage, replicas, zero, p.ddp_bucket_size),
                            activations(m, vocab, layout, stage, t.micro_batch_size, micro_batches, t.bf16,
                                        cfg.deepspeed.deepspeed, kernels))
              for stage in range(layout.pp)]
    largest = max(stages, key=lambda stage: stage.total)
    by_zero_stage = {stage: model_states(params[largest.stage], stage, replicas, zero, p.ddp_bucket_size)
                     for stage in ZERO_STAGES if stage == 0 or t.bf16}
    return Estimate(layout, vocab, zero_stage, t.bf16, micro_batches, recompute_name(m), stages, largest,
                    by_zero_stage)
