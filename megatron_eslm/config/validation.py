"""Checks that span sections: derived defaults, the per-section checks in one pass, and whether the
layout fits the world size."""
from __future__ import annotations

from megatron_eslm.config.checkpoint import validate_checkpoint
from megatron_eslm.config.data import absolute_paths, validate_data
from megatron_eslm.config.deepspeed import validate_deepspeed
from megatron_eslm.config.faults import refuse_under_deepspeed, validate_faults
from megatron_eslm.config.logging import validate_logging
from megatron_eslm.config.model import ModelConfig, finalize_model, validate_model
from megatron_eslm.config.optimizer import validate_optimizer
from megatron_eslm.config.parallel import validate_parallel, virtual_pipeline_size
from megatron_eslm.config.selection import validate_selection
from megatron_eslm.config.training import validate_training
from megatron_eslm.config.tree import Config
from megatron_eslm.distributed import deepspeed_config
from megatron_eslm.errors import UserError


def finalize(cfg: Config) -> Config:
    """Fill derived defaults and reject inconsistent settings, each with one line naming the flag."""
    t, o = cfg.training, cfg.optimizer
    finalize_model(cfg.model)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if cfg.deepspeed.zero_stage is not None:
        cfg.deepspeed.deepspeed = True
    validate(cfg)
    absolute_paths(cfg.data)
    return cfg


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    validate_training(cfg.training)
    if cfg.model.attention_backend in ("flash", "cudnn") and not cfg.training.bf16:
        raise UserError(f"--attention-backend {cfg.model.attention_backend} needs --bf16 (its kernels take "
                        "16-bit inputs only)")
    validate_logging(cfg.logging)
    validate_selection(cfg.selection)
    validate_optimizer(cfg.optimizer)
    validate_data(cfg.data)
    validate_parallel(cfg.parallel)
    validate_checkpoint(cfg.checkpoint)
    validate_faults(cfg.faults, cfg.logging.log_interval)
    validate_deepspeed(cfg.deepspeed)
    if cfg.deepspeed.deepspeed:
        refuse_under_deepspeed(cfg.faults, cfg.checkpoint.async_save)


def validate_layout(cfg: Config, world_size: int) -> int:
    """Reject a layout that cannot split this model and batch over `world_size` ranks; returns the
    data-parallel size. Called before the process group exists, so a bad layout costs one line on every
    rank instead of a hang in the first collective."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if world_size % (tp * pp * cp):
        context = f" x --context-parallel-size {cp}" if cp > 1 else ""
        raise UserError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp}{context}")
    dp = world_size // (tp * pp * cp)
    validate_model_split(m, tp, pp, p.num_layers_per_virtual_pipeline_stage)
    chunk = m.num_layers // (pp * virtual_pipeline_size(p, m.num_layers))  # the layers a model chunk runs
    if m.recompute_num_layers is not None and m.recompute_num_layers > chunk:
        what = "model chunk" if p.num_layers_per_virtual_pipeline_stage else "pipeline stage"
        raise UserError(f"--recompute-num-layers {m.recompute_num_layers} exceeds the {chunk} layers of a {what}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                        f"{t.micro_batch_size} x data-parallel size {dp}")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        validate_virtual_pipeline(cfg, t.global_batch_size // (t.micro_batch_size * dp))
    if p.sequence_parallel and tp == 1:
        raise UserError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if p.sequence_parallel and m.seq_length % tp:
        raise UserError(f"--sequence-parallel: --seq-length {m.seq_length} is not divisible by "
                        f"--tensor-model-parallel-size {tp}")
    if cp > 1:
        validate_context_parallel(cfg, cp)
    if cfg.selection.selection in ("eslm-kd", "rho1") and tp * pp > 1:
        raise UserError(f"--selection {cfg.selection.selection} runs a whole frozen model on every rank: it needs "
                        "--tensor-model-parallel-size 1 and --pipeline-model-parallel-size 1")
    if cfg.selection.eslm_granularity == "sequence":
        validate_sequence_granularity(cfg, dp)
    if cfg.deepspeed.deepspeed:
        deepspeed_config.resolve(cfg, dp)  # a JSON that disagrees with the flags fails here, in one line
    return dp


def validate_context_parallel(cfg: Config, cp: int) -> None:
    """What --context-parallel-size cannot split, each in one line with the reason."""
    m, p = cfg.model, cfg.parallel
    if m.seq_length % (2 * cp):
        raise UserError(f"--context-parallel-size {cp}: --seq-length {m.seq_length} is not divisible by 2 x {cp} "
                        "(each sequence is cut into 2 x CP equal chunks)")
    if p.sequence_parallel and m.seq_length // cp % p.tensor_model_parallel_size:
        raise UserError(f"--sequence-parallel with --context-parallel-size {cp}: a rank's {m.seq_length // cp} "
                        f"tokens of --seq-length {m.seq_length} are not divisible by --tensor-model-parallel-size "
                        f"{p.tensor_model_parallel_size}")
    if (m.hidden_dropout or m.attention_dropout) and not m.keyed_dropout:
        raise UserError(f"--context-parallel-size {cp} with --hidden-dropout {m.hidden_dropout} and "
                        f"--attention-dropout {m.attention_dropout} needs --keyed-dropout: masks drawn from a "
                        "stream would differ with the sequence's split over the ranks")
    if m.attention_dropout and p.cp_comm_type == "all_gather":
        raise UserError(f"--cp-comm-type all_gather with --attention-dropout {m.attention_dropout}: the keyed "
                        "attention dropout runs in the ring (--cp-comm-type p2p)")
    if cfg.selection.selection == "lfr":
        raise UserError(f"--selection lfr does not run with --context-parallel-size {cp}: it ranks whole samples "
                        "by perplexity, and context parallelism splits every sample over ranks")
    if m.attention_backend == "cudnn":
        raise UserError(f"--attention-backend cudnn does not run with --context-parallel-size {cp}: cuDNN has no "
                        "kernel for the lower-right causal mask of a rank's chunks (flash and efficient do)")


def sequence_keep(alpha: float, global_batch_size: int) -> int:
    """--eslm-granularity sequence: the sequences a step trains, G - floor(alpha G) of the G candidates (the
    VaR rule's kept count, ties broken by position: docs/selection.md)."""
    from megatron_eslm.eslm.threshold import var_index  # imports torch: the config checks run without it

    return global_batch_size - var_index(alpha, global_batch_size)


def validate_sequence_granularity(cfg: Config, dp: int) -> None:
    """What --eslm-granularity sequence cannot run with, each in one line with the reason."""
    p, t = cfg.parallel, cfg.training
    if p.context_parallel_size > 1:
        raise UserError(f"--eslm-granularity sequence does not run with --context-parallel-size "
                        f"{p.context_parallel_size}: it ranks whole sequences, which context parallelism splits "
                        "over ranks")
    if cfg.deepspeed.deepspeed:
        raise UserError("--eslm-granularity sequence does not run with --deepspeed: a step trains fewer "
                        "micro-batches than the engine's fixed gradient accumulation")
    if cfg.selection.eslm_scorer == "proxy" and p.tensor_model_parallel_size * p.pipeline_model_parallel_size > 1:
        raise UserError("--eslm-scorer proxy runs a whole frozen model on every rank: it needs "
                        "--tensor-model-parallel-size 1 and --pipeline-model-parallel-size 1")
    keep = sequence_keep(cfg.selection.eslm_alpha, t.global_batch_size)
    if keep % (t.micro_batch_size * dp):
        raise UserError(f"--eslm-granularity sequence: --eslm-alpha {cfg.selection.eslm_alpha} keeps {keep} of the "
                        f"{t.global_batch_size} sequences of a global batch, not a multiple of --micro-batch-size "
                        f"{t.micro_batch_size} x data-parallel size {dp} (whole micro-batches on every rank)")
    if p.num_layers_per_virtual_pipeline_stage is not None and keep // (t.micro_batch_size * dp) \
            % p.pipeline_model_parallel_size:
        raise UserError(f"--eslm-granularity sequence with --num-layers-per-virtual-pipeline-stage: --eslm-alpha "
                        f"{cfg.selection.eslm_alpha} keeps {keep // (t.micro_batch_size * dp)} micro-batches a rank, "
                        f"not a multiple of --pipeline-model-parallel-size {p.pipeline_model_parallel_size} (the "
                        "interleaved schedule's rule)")


def validate_virtual_pipeline(cfg: Config, num_micro_batches: int) -> None:
    """What the interleaved schedule (--num-layers-per-virtual-pipeline-stage) cannot run with, each in one
    line with the reason (the layer split is `validate_model_split`'s)."""
    p, flag = cfg.parallel, f"--num-layers-per-virtual-pipeline-stage {cfg.parallel.num_layers_per_virtual_pipeline_stage}"
    if p.pipeline_model_parallel_size == 1:
        raise UserError(f"{flag} needs --pipeline-model-parallel-size > 1")
    if num_micro_batches % p.pipeline_model_parallel_size:
        raise UserError(f"{flag}: the {num_micro_batches} micro-batches of a step (--global-batch-size / "
                        "(--micro-batch-size x data-parallel size)) are not a multiple of "
                        f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size} (Megatron's rule for the "
                        "interleaved schedule)")
    if cfg.deepspeed.deepspeed:
        raise UserError(f"{flag} does not run with --deepspeed: the engine takes one forward and one backward per "
                        "micro-batch, the interleaved schedule runs one per model chunk")
    if p.context_parallel_size > 1:
        raise UserError(f"{flag} does not run with --context-parallel-size {p.context_parallel_size}: not tested "
                        "together yet")


def validate_model_split(m: ModelConfig, tp: int, pp: int, layers_per_virtual_stage: int | None = None) -> None:
    """Reject a tensor x pipeline (x virtual pipeline) split of this model's layers, heads, groups and MLP
    (also for the checkpoint tools, which write layouts no run has launched yet)."""
    if m.num_layers % pp:
        raise UserError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if layers_per_virtual_stage is not None and m.num_layers % (pp * layers_per_virtual_stage):
        raise UserError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp} x "
                        f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage}")
    if m.num_attention_heads % tp:
        raise UserError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                        f"--tensor-model-parallel-size {tp}")
    if m.num_query_groups % tp:  # each rank holds whole key/value groups and the query heads that use them
        raise UserError(f"--num-query-groups {m.num_query_groups} is not divisible by --tensor-model-parallel-size "
                        f"{tp}")
    if m.ffn_hidden_size % tp:
        raise UserError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
