"""The DeepSpeed JSON config of a run: built from our flags (`--zero-stage N`), or read from
`--deepspeed_config` and checked against them. One source of truth per quantity: the batch sizes,
gradient clipping and bf16 come from our flags; a JSON that says otherwise is an error, not a silent
override, because DeepSpeed would otherwise train with other numbers than the logs and the LR schedule
assume. Gradients always accumulate over micro-batches in fp32. Pure JSON work (no deepspeed import), so
a bad config fails in one line before any process group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_eslm.errors import UserError, read_json_object

if TYPE_CHECKING:
    from megatron_eslm.config import Config

# Defaults a JSON may override: our trainer does the logging.
_DEFAULTS = {"steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False}

# What `--zero-stage N` asks of ZeRO. Stage 1 does not overlap its reduction with the backward: our step
# first sums the gradients that tensor/pipeline parallelism share (sequence-parallel norms, the tied
# embedding) and only then hands them to DeepSpeed (megatron_eslm/distributed/deepspeed_engine.py).
_ZERO_DEFAULTS = {
    1: {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e8},
    2: {"overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True, "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8},
    3: {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
        "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5},
}


# "auto" and DeepSpeed's own spellings of float32 (`deepspeed.runtime.config.DtypeEnum`).
_FP32_NAMES = ("auto", "fp32", "float32", "float", "torch.float32")


def _agree(ds: dict, key: str, ours, flag: str, where: str) -> None:
    """Fill `key` from our flags, or check that the JSON already says the same."""
    if key not in ds or ds[key] == "auto":
        ds[key] = ours
    elif ds[key] != ours:
        raise UserError(f"{where}: {key} is {ds[key]} but {flag} gives {ours}; make them agree")


def _fp32_accumulation(ds: dict, where: str) -> dict:
    """The `data_types` block, with gradients summed over micro-batches in fp32. DeepSpeed's default is
    the model's dtype, bf16 under --bf16, where a micro-batch's gradient added to a sum more than 256
    times larger is lost entirely; Megatron accumulates bf16 runs in fp32 for the same reason. bf16
    accumulation is refused, not honoured: it would need its own tested path at each ZeRO stage."""
    data_types = dict(ds.get("data_types", {}))
    accum = data_types.get("grad_accum_dtype", "auto")
    if accum not in _FP32_NAMES:
        raise UserError(f"{where}: data_types.grad_accum_dtype is {accum}, but gradients must accumulate in fp32 "
                        "over micro-batches (bf16 sums drop small micro-batch gradients); remove it or set \"fp32\"")
    return {**data_types, "grad_accum_dtype": "fp32"}


def resolve(cfg: Config, dp: int) -> dict:
    """The config passed to `deepspeed.initialize` for a run with `dp` data-parallel replicas."""
    d, t, p = cfg.deepspeed, cfg.training, cfg.parallel
    where = f"--deepspeed_config {d.deepspeed_config}" if d.deepspeed_config else "--zero-stage"
    ds = read_json_object(d.deepspeed_config, "--deepspeed_config") if d.deepspeed_config else {}
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise UserError(f"{where}: remove the '{block}' block; megatron-eslm passes its own AdamW and "
                            "learning-rate schedule (--lr, --lr-decay-style, --weight-decay, --adam-*)")
    if ds.get("fp16", {}).get("enabled"):
        raise UserError(f"{where}: fp16 is not supported; use --bf16")
    zero = dict(ds.get("zero_optimization", {}))
    if d.zero_stage is not None:
        if "stage" not in zero or zero["stage"] != d.zero_stage:  # the flag wins over the file's stage
            zero = {**_ZERO_DEFAULTS[d.zero_stage], **{k: v for k, v in zero.items() if k != "stage"}}
        zero["stage"] = d.zero_stage
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise UserError(f"{where}: zero_optimization.stage must be 1, 2 or 3, got {stage} (for plain data "
                        "parallelism run without --deepspeed)")
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    _agree(ds, "train_batch_size", t.global_batch_size, "--global-batch-size", where)
    _agree(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "--micro-batch-size", where)
    _agree(ds, "gradient_accumulation_steps", micro_batches,
           f"--global-batch-size / (--micro-batch-size x data-parallel size {dp})", where)
    _agree(ds, "gradient_clipping", cfg.optimizer.clip_grad, "--clip-grad", where)
    bf16 = dict(ds.get("bf16", {}))
    if bf16.get("enabled", "auto") not in ("auto", t.bf16):
        raise UserError(f"{where}: bf16.enabled is {bf16['enabled']} but --bf16 is {'on' if t.bf16 else 'off'}")
    bf16["enabled"] = t.bf16
    data_types = _fp32_accumulation(ds, where)
    if stage >= 2 and p.pipeline_model_parallel_size > 1:
        raise UserError(f"ZeRO stage {stage} cannot run with --pipeline-model-parallel-size "
                        f"{p.pipeline_model_parallel_size}: DeepSpeed partitions gradients from stage 2 on, "
                        "which pipelining accumulates over micro-batches; use --zero-stage 1")
    if stage >= 2 and p.sequence_parallel:
        raise UserError(f"ZeRO stage {stage} cannot run with --sequence-parallel: the norms' gradients must be "
                        "summed over the tensor-parallel group before DeepSpeed partitions them; use "
                        "--zero-stage 1")
    if p.overlap_grad_reduce:  # ZeRO's name for it; without the flag the stage's default or the JSON decides
        if stage == 1:
            raise UserError("--overlap-grad-reduce cannot run with ZeRO stage 1: the step sums tensor- and "
                            "pipeline-shared gradients before DeepSpeed reduces them; use --zero-stage 2 or 3")
        if zero.get("overlap_comm", True) is not True:
            raise UserError(f"{where}: zero_optimization.overlap_comm is {zero['overlap_comm']} but "
                            "--overlap-grad-reduce asks for it; make them agree")
        zero["overlap_comm"] = True
    if stage == 1 and zero.get("overlap_comm"):
        raise UserError(f"{where}: zero_optimization.overlap_comm must be false with stage 1: the step sums "
                        "tensor- and pipeline-shared gradients before DeepSpeed reduces them")
    if stage == 3:
        # The model is built inside zero.Init, which with this on replaces torch.nn.functional.linear for the
        # rest of the process (its own autograd function: other numbers, other saved tensors, every model).
        if zero.get("memory_efficient_linear", False):
            raise UserError(f"{where}: zero_optimization.memory_efficient_linear must be false: zero.Init would "
                            "replace torch.nn.functional.linear in the whole process")
        zero["memory_efficient_linear"] = False
    # ZeRO wraps our own AdamW (torch's), which DeepSpeed calls "untested" and refuses unless told.
    return {**_DEFAULTS, **ds, "zero_allow_untested_optimizer": True, "zero_optimization": zero, "bf16": bf16,
            "data_types": data_types}
