"""One dataclass tree for a run, filled from Megatron-style flags (and an optional JSON file), validated
before any work starts so that a bad value fails in one line instead of deep inside a training step."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Sequence

from megatron_eslm.data.blend_spec import parse_blend
from megatron_eslm.distributed import deepspeed_config
from megatron_eslm.errors import UserError, read_json_object
from megatron_eslm.tokenizer import TOKENIZER_TYPES


@dataclass
class ModelConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # None: seq_length
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)  # PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (a blend)
    train_data_path: list[str] = field(default_factory=list)  # per-split blends instead of --data-path + --split
    valid_data_path: list[str] = field(default_factory=list)
    test_data_path: list[str] = field(default_factory=list)
    data_cache_path: str | None = None  # None: indices are built in memory by every process
    split: str = "969,30,1"
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # NullTokenizer only
    num_workers: int = 2


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant | WSD
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_wsd_decay_iters: int | None = None  # WSD: length of the final decay; None: 10% of decay iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    ddp_bucket_size: int = 25_000_000  # gradient elements per data-parallel all-reduce


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro_batch_size (no accumulation)
    train_iters: int = 1000
    bf16: bool = False
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 10


@dataclass
class SelectionConfig:
    selection: str = "eslm"  # none | eslm | random | ada-eslm | eslm-kd | rho1 | lfr
    eslm_score: str = "loss"  # loss | entropy
    eslm_alpha: float = 0.5  # confidence level: the alpha-quantile of scores is the VaR threshold
    eslm_threshold: str = "sketch-exact"  # sketch | sketch-exact | exact
    eslm_sketch_size: int = 2048
    eslm_threshold_scope: str = "micro-batch"  # micro-batch | previous-step: whose scores set the threshold
    eslm_alpha_min: float = 0.0  # ada-eslm: alpha's bounds; the schedules run from min to max
    eslm_alpha_max: float = 0.8
    ada_eslm_rule: str = "grad-mass"  # grad-mass | linear | cosine
    ada_eslm_budget: float = 0.1  # grad-mass: share of the logit-gradient mass dropped tokens may carry
    ada_eslm_momentum: float = 0.9  # grad-mass: weight of the previous alpha
    teacher_load: str | None = None  # eslm-kd: teacher checkpoint directory
    kd_alpha: float = 0.5  # eslm-kd: weight of the distillation term
    kd_temperature: float = 2.0
    kd_score: str = "student"  # eslm-kd: whose score the VaR threshold uses: student | teacher
    reference_load: str | None = None  # rho1: reference checkpoint directory
    lfr_learn_iters: int = 100  # lfr: phase lengths in steps, then the drop fraction of focus phases
    lfr_focus_iters: int = 50
    lfr_review_iters: int = 25
    lfr_drop_fraction: float = 0.3
    lm_head_impl: str = "auto"  # auto | torch | triton


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    metrics_file: str | None = None


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None


@dataclass
class DeepSpeedSection:
    """The DeepSpeed engine (ZeRO); tensor and pipeline parallelism stay our own (docs/deepspeed.md)."""
    deepspeed: bool = False
    deepspeed_config: str | None = None  # DeepSpeed JSON; None: built from our flags
    zero_stage: int | None = None  # 1 | 2 | 3; overrides the JSON's stage and implies --deepspeed


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
SELECTIONS = ("none", "eslm", "random", "ada-eslm", "eslm-kd", "rho1", "lfr")
ADA_ESLM_RULES = ("grad-mass", "linear", "cosine")
KD_SCORES = ("student", "teacher")
SCORES = ("loss", "entropy")
THRESHOLD_MODES = ("sketch", "sketch-exact", "exact")
THRESHOLD_SCOPES = ("micro-batch", "previous-step")
LM_HEAD_IMPLS = ("auto", "torch", "triton")
ZERO_STAGES = (1, 2, 3)

# Flags spelled as DeepSpeed's own `deepspeed.add_config_arguments` spells them (an underscore, not a
# dash), so launch lines written for Megatron-DeepSpeed work unchanged; tests/test_deepspeed.py checks
# they match DeepSpeed's helper. Defined here rather than by calling the helper, so that parsing flags
# does not import deepspeed (seconds) for runs that never use it.
_FLAG_NAMES = {"deepspeed_config": ("--deepspeed_config", "--deepspeed-config")}

# Flags that are not dataclass fields: the launcher's rank argument and the config file itself.
_NON_CONFIG_DESTS = {"local_rank", "config"}


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a bad flag should cost the user exactly one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_section(parser: argparse.ArgumentParser, title: str, section: type, helps: dict[str, str]) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = helps.get(f.name, "") + f" (default: {default})"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        names = _FLAG_NAMES.get(f.name, (_flag(f.name),))
        if kind == "bool":
            group.add_argument(*names, action="store_true", help=help_text)
        elif kind.startswith("list"):
            group.add_argument(*names, nargs="+", default=default, help=help_text)
        else:
            base = kind.split("|")[0].strip()
            typ = {"int": int, "float": float, "str": str}[base]
            group.add_argument(*names, type=typ, default=default, help=help_text)


_HELP = {
    "num_layers": "transformer blocks",
    "hidden_size": "model width",
    "num_attention_heads": "attention heads (must divide --hidden-size)",
    "ffn_hidden_size": "MLP width; unset means 4x hidden",
    "seq_length": "tokens per training sample",
    "max_position_embeddings": "learned position table size; unset means --seq-length",
    "make_vocab_size_divisible_by": "pad the tokenizer vocabulary to a multiple of this",
    "hidden_dropout": "dropout after attention/MLP and on embeddings",
    "attention_dropout": "dropout on attention probabilities",
    "init_method_std": "std of the normal weight init",
    "layernorm_epsilon": "LayerNorm epsilon",
    "data_path": "dataset prefix (P for P.bin/P.idx), or a blend W1 P1 W2 P2 ... (weights are normalised); "
                 "each dataset is cut by --split",
    "train_data_path": "train datasets, used whole: P or W1 P1 W2 P2 ... (instead of --data-path)",
    "valid_data_path": "validation datasets, used whole: P or W1 P1 W2 P2 ...",
    "test_data_path": "test datasets, used whole: P or W1 P1 W2 P2 ...",
    "data_cache_path": "directory for the cached sample indices (.npy), built once and shared by all ranks",
    "split": "train,valid,test proportions over documents, e.g. 969,30,1",
    "tokenizer_type": "one of " + ", ".join(TOKENIZER_TYPES),
    "tokenizer_model": "SentencePiece .model, or HuggingFace tokenizer.json (or its directory)",
    "vocab_size": "NullTokenizer: token ids in the data are below this (the eod token is this id)",
    "num_workers": "DataLoader worker processes",
    "lr": "peak learning rate",
    "min_lr": "learning rate floor after decay",
    "lr_decay_style": "one of " + ", ".join(LR_DECAY_STYLES),
    "lr_warmup_iters": "linear warmup iterations",
    "lr_decay_iters": "iterations over which to decay; unset means --train-iters",
    "lr_wsd_decay_iters": "WSD only: length of the final decay phase",
    "weight_decay": "AdamW weight decay (not applied to biases and norms)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "clip_grad": "global gradient-norm clip; 0 disables",
    "micro_batch_size": "samples per forward/backward",
    "global_batch_size": "samples per optimizer step (accumulates micro-batches)",
    "train_iters": "optimizer steps",
    "bf16": "bfloat16 autocast for the model (fp32 master weights)",
    "seed": "seed for init, dropout, data order and random selection",
    "eval_interval": "evaluate every N iterations (and at the end)",
    "eval_iters": "validation batches per evaluation",
    "tensor_model_parallel_size": "ranks that split each layer's weights (Megatron's TP)",
    "pipeline_model_parallel_size": "pipeline stages; the layers are split evenly over them",
    "sequence_parallel": "with TP: shard norms and dropout along the sequence (all-gather/reduce-scatter)",
    "ddp_bucket_size": "gradient elements per data-parallel all-reduce bucket",
    "selection": "token selection: " + ", ".join(SELECTIONS),
    "eslm_score": "per-token score for the VaR threshold: " + ", ".join(SCORES),
    "eslm_alpha": "confidence alpha in [0, 1): tokens below the alpha-quantile score are dropped",
    "eslm_threshold": "how the VaR threshold is found: " + ", ".join(THRESHOLD_MODES)
                      + " (see docs/threshold.md)",
    "eslm_sketch_size": "quantile-sketch points per rank: rank error below 1/N of the tokens",
    "eslm_threshold_scope": "whose scores set a micro-batch's VaR threshold: " + ", ".join(THRESHOLD_SCOPES)
                            + " (the merged sketch of every micro-batch of the previous step; see "
                            "docs/threshold.md)",
    "eslm_alpha_min": "ada-eslm: lowest alpha (where the linear/cosine schedules start)",
    "eslm_alpha_max": "ada-eslm: highest alpha (where the linear/cosine schedules end)",
    "ada_eslm_rule": "ada-eslm: how alpha moves: " + ", ".join(ADA_ESLM_RULES) + " (see docs/selection.md)",
    "ada_eslm_budget": "ada-eslm grad-mass: share of the logit-gradient mass the dropped tokens may carry",
    "ada_eslm_momentum": "ada-eslm grad-mass: weight of the previous alpha in each update, in [0, 1)",
    "teacher_load": "eslm-kd: teacher checkpoint directory (our layout, same tokenizer, any size)",
    "kd_alpha": "eslm-kd: weight in [0, 1] of the distillation term on the kept tokens",
    "kd_temperature": "eslm-kd: softmax temperature of the distillation term",
    "kd_score": "eslm-kd: whose --eslm-score the VaR threshold uses: " + ", ".join(KD_SCORES),
    "reference_load": "rho1: reference checkpoint directory; the score is student loss - reference loss",
    "lfr_learn_iters": "lfr: initial steps on every sample",
    "lfr_focus_iters": "lfr: steps of each focus phase (easiest samples dropped)",
    "lfr_review_iters": "lfr: steps of each review phase (every sample); also the perplexity window",
    "lfr_drop_fraction": "lfr: fraction in [0, 1) of the recent samples' perplexities below which a sample "
                         "is dropped in focus phases",
    "lm_head_impl": "LM-head kernels: " + ", ".join(LM_HEAD_IMPLS) + " (auto: triton on CUDA, else torch)",
    "log_interval": "log every N iterations",
    "tensorboard_dir": "write TensorBoard scalars here",
    "metrics_file": "append JSON lines of metrics here",
    "save": "checkpoint directory to write",
    "load": "checkpoint directory to resume from",
    "save_interval": "save every N iterations (and at the end when --save is set)",
    "deepspeed": "train with the DeepSpeed engine (ZeRO); tensor and pipeline parallelism stay ours",
    "deepspeed_config": "DeepSpeed JSON config; its batch, clipping and bf16 entries must agree with our "
                        "flags, missing ones are filled from them (needs --deepspeed)",
    "zero_stage": "ZeRO stage 1, 2 or 3: builds the DeepSpeed config from our flags (or overrides the "
                  "stage of --deepspeed_config); implies --deepspeed",
}

_SECTIONS = (
    ("model", "model", ModelConfig),
    ("data", "data", DataConfig),
    ("optimizer", "optimizer and learning rate", OptimizerConfig),
    ("training", "training", TrainingConfig),
    ("parallel", "distributed (TP x DP x PP = world size)", ParallelConfig),
    ("selection", "token selection (ESLM)", SelectionConfig),
    ("logging", "logging", LoggingConfig),
    ("checkpoint", "checkpointing", CheckpointConfig),
    ("deepspeed", "DeepSpeed (ZeRO data parallelism; see docs/deepspeed.md)", DeepSpeedSection),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m megatron_eslm.pretrain",
        description="Pretrain a GPT with ESLM token selection (Megatron-style flags).",
    )
    parser.add_argument("--config", help="JSON file of flag values (keys as flag names or dests); "
                        "flags on the command line override it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment")
    for _, title, section in _SECTIONS:
        _add_section(parser, title, section, _HELP)
    return parser


def _file_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    values = read_json_object(path, "--config")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in values.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in known or dest in _NON_CONFIG_DESTS | {"help"}:
            raise UserError(f"--config {path}: unknown key '{key}'")
        out[dest] = value
    return out


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse flags (over an optional --config file) into a validated Config."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_file_defaults(pre.config, parser))
    args = parser.parse_args(argv)
    cfg = Config()
    for name, _, section in _SECTIONS:
        sub = getattr(cfg, name)
        for f in dataclasses.fields(section):
            setattr(sub, f.name, getattr(args, f.name))
    return finalize(cfg)


def finalize_model(m: ModelConfig) -> ModelConfig:
    """Fill the model's derived sizes (MLP width, position table)."""
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    return m


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
    return cfg


def _positive(value: int | float, flag: str) -> None:
    if value <= 0:
        raise UserError(f"{flag} must be positive, got {value}")


def _validate_selection_family(s: SelectionConfig) -> None:
    """The flags of ada-eslm, eslm-kd, rho1 and lfr (docs/selection.md)."""
    if not 0.0 <= s.eslm_alpha_min <= s.eslm_alpha_max < 1.0:
        raise UserError(f"--eslm-alpha-min {s.eslm_alpha_min} and --eslm-alpha-max {s.eslm_alpha_max} must "
                        "satisfy 0 <= min <= max < 1")
    if s.ada_eslm_rule not in ADA_ESLM_RULES:
        raise UserError(f"--ada-eslm-rule must be one of {', '.join(ADA_ESLM_RULES)}, got '{s.ada_eslm_rule}'")
    if not 0.0 <= s.ada_eslm_budget <= 1.0:
        raise UserError(f"--ada-eslm-budget must be in [0, 1], got {s.ada_eslm_budget}")
    if not 0.0 <= s.ada_eslm_momentum < 1.0:
        raise UserError(f"--ada-eslm-momentum must be in [0, 1), got {s.ada_eslm_momentum}")
    if not 0.0 <= s.kd_alpha <= 1.0:
        raise UserError(f"--kd-alpha must be in [0, 1], got {s.kd_alpha}")
    _positive(s.kd_temperature, "--kd-temperature")
    if s.kd_score not in KD_SCORES:
        raise UserError(f"--kd-score must be one of {', '.join(KD_SCORES)}, got '{s.kd_score}'")
    for path, flag, selection in ((s.teacher_load, "--teacher-load", "eslm-kd"),
                                  (s.reference_load, "--reference-load", "rho1")):
        if (path is None) != (s.selection != selection):
            raise UserError(f"--selection {selection} needs {flag}" if path is None
                            else f"{flag} is only read by --selection {selection}")
    if s.lfr_learn_iters < 0 or s.lfr_focus_iters < 0:
        raise UserError(f"--lfr-learn-iters and --lfr-focus-iters must be >= 0, got {s.lfr_learn_iters} "
                        f"and {s.lfr_focus_iters}")
    _positive(s.lfr_review_iters, "--lfr-review-iters")
    if not 0.0 <= s.lfr_drop_fraction < 1.0:
        raise UserError(f"--lfr-drop-fraction must be in [0, 1), got {s.lfr_drop_fraction}")
    if s.selection == "lfr" and s.eslm_threshold_scope != "micro-batch":
        raise UserError("--eslm-threshold-scope previous-step is not read by --selection lfr (its quantile "
                        "is over a table of samples)")


def _validate_data(d: DataConfig) -> None:
    """Dataset and tokenizer flags; the files themselves are checked when the datasets are built."""
    per_split = (d.train_data_path, d.valid_data_path, d.test_data_path)
    if d.data_path and any(per_split):
        raise UserError("--data-path cannot be combined with --train-data-path/--valid-data-path/--test-data-path")
    if not d.data_path and not d.train_data_path:
        raise UserError("--data-path (or --train-data-path) is required")
    for values, flag in zip((d.data_path, *per_split), ("--data-path", "--train-data-path", "--valid-data-path",
                                                        "--test-data-path")):
        if values:
            parse_blend(values, flag)
    if d.tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got '{d.tokenizer_type}'")
    if d.tokenizer_type == "NullTokenizer":
        if d.vocab_size is None or d.vocab_size < 1:
            raise UserError(f"--tokenizer-type NullTokenizer needs a positive --vocab-size, got {d.vocab_size}")
        return
    if d.tokenizer_model is None:
        raise UserError("--tokenizer-model is required")
    if not os.path.exists(d.tokenizer_model):
        raise UserError(f"--tokenizer-model {d.tokenizer_model}: file not found")


def validate(cfg: Config) -> None:
    m, t, o, s, d = cfg.model, cfg.training, cfg.optimizer, cfg.selection, cfg.data
    for value, flag in ((m.num_layers, "--num-layers"), (m.hidden_size, "--hidden-size"),
                        (m.num_attention_heads, "--num-attention-heads"), (m.seq_length, "--seq-length"),
                        (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by"),
                        (t.micro_batch_size, "--micro-batch-size"), (t.global_batch_size, "--global-batch-size"),
                        (t.train_iters, "--train-iters"), (t.eval_interval, "--eval-interval"),
                        (cfg.logging.log_interval, "--log-interval"), (o.lr_decay_iters, "--lr-decay-iters")):
        _positive(value, flag)
    if m.hidden_size % m.num_attention_heads:
        raise UserError(f"--hidden-size {m.hidden_size} is not divisible by "
                        f"--num-attention-heads {m.num_attention_heads}")
    if m.seq_length > m.max_position_embeddings:
        raise UserError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                        f"{m.max_position_embeddings}")
    for value, flag in ((m.hidden_dropout, "--hidden-dropout"), (m.attention_dropout, "--attention-dropout")):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(f"--global-batch-size {t.global_batch_size} is not divisible by "
                        f"--micro-batch-size {t.micro_batch_size}")
    if t.eval_iters < 0:
        raise UserError(f"--eval-iters must be >= 0, got {t.eval_iters}")
    if not 0.0 <= s.eslm_alpha < 1.0:
        raise UserError(f"--eslm-alpha must be in [0, 1), got {s.eslm_alpha}")
    if s.selection not in SELECTIONS:
        raise UserError(f"--selection must be one of {', '.join(SELECTIONS)}, got '{s.selection}'")
    if s.eslm_score not in SCORES:
        raise UserError(f"--eslm-score must be one of {', '.join(SCORES)}, got '{s.eslm_score}'")
    if s.eslm_threshold not in THRESHOLD_MODES:
        raise UserError(f"--eslm-threshold must be one of {', '.join(THRESHOLD_MODES)}, got '{s.eslm_threshold}'")
    if s.eslm_sketch_size < 2:
        raise UserError(f"--eslm-sketch-size must be at least 2, got {s.eslm_sketch_size}")
    if s.eslm_threshold_scope not in THRESHOLD_SCOPES:
        raise UserError(f"--eslm-threshold-scope must be one of {', '.join(THRESHOLD_SCOPES)}, "
                        f"got '{s.eslm_threshold_scope}'")
    _validate_selection_family(s)
    if s.lm_head_impl not in LM_HEAD_IMPLS:
        raise UserError(f"--lm-head-impl must be one of {', '.join(LM_HEAD_IMPLS)}, got '{s.lm_head_impl}'")
    if o.lr_decay_style not in LR_DECAY_STYLES:
        raise UserError(f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)}, got '{o.lr_decay_style}'")
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise UserError(f"--min-lr {o.min_lr} must be in [0, --lr {o.lr}]")
    if o.lr_warmup_iters < 0 or o.lr_warmup_iters > o.lr_decay_iters:
        raise UserError(f"--lr-warmup-iters {o.lr_warmup_iters} must be in [0, --lr-decay-iters {o.lr_decay_iters}]")
    if o.lr_wsd_decay_iters is not None and not 0 <= o.lr_wsd_decay_iters <= o.lr_decay_iters - o.lr_warmup_iters:
        raise UserError(f"--lr-wsd-decay-iters {o.lr_wsd_decay_iters} must fit after warmup within "
                        f"--lr-decay-iters {o.lr_decay_iters}")
    if o.clip_grad < 0:
        raise UserError(f"--clip-grad must be >= 0, got {o.clip_grad}")
    _validate_data(d)
    if d.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {d.num_workers}")
    p = cfg.parallel
    for value, flag in ((p.tensor_model_parallel_size, "--tensor-model-parallel-size"),
                        (p.pipeline_model_parallel_size, "--pipeline-model-parallel-size"),
                        (p.ddp_bucket_size, "--ddp-bucket-size")):
        _positive(value, flag)
    ck = cfg.checkpoint
    if ck.save_interval is not None and ck.save_interval <= 0:
        raise UserError(f"--save-interval must be positive, got {ck.save_interval}")
    if ck.save_interval is not None and ck.save is None:
        raise UserError("--save-interval needs --save")
    _validate_deepspeed(cfg.deepspeed)


def _validate_deepspeed(ds: DeepSpeedSection) -> None:
    """The flags alone; the JSON and its agreement with our flags are checked in `validate_layout`, which
    knows the data-parallel size."""
    if ds.zero_stage is not None and ds.zero_stage not in ZERO_STAGES:
        raise UserError(f"--zero-stage must be one of {', '.join(map(str, ZERO_STAGES))}, got {ds.zero_stage} "
                        "(without --deepspeed, data parallelism is our own all-reduce)")
    if ds.deepspeed_config is not None and not ds.deepspeed:
        raise UserError("--deepspeed_config needs --deepspeed (or --zero-stage)")
    if ds.deepspeed_config is not None and not os.path.isfile(ds.deepspeed_config):
        raise UserError(f"--deepspeed_config {ds.deepspeed_config}: file not found")


def validate_layout(cfg: Config, world_size: int) -> int:
    """Reject a layout that cannot split this model and batch over `world_size` ranks; returns the
    data-parallel size. Called before the process group exists, so a bad layout costs one line on every
    rank instead of a hang in the first collective."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    if m.num_layers % pp:
        raise UserError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if m.num_attention_heads % tp:
        raise UserError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                        f"--tensor-model-parallel-size {tp}")
    if m.ffn_hidden_size % tp:
        raise UserError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                        f"{t.micro_batch_size} x data-parallel size {dp}")
    if p.sequence_parallel and tp == 1:
        raise UserError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if p.sequence_parallel and m.seq_length % tp:
        raise UserError(f"--sequence-parallel: --seq-length {m.seq_length} is not divisible by "
                        f"--tensor-model-parallel-size {tp}")
    if cfg.selection.selection in ("eslm-kd", "rho1") and tp * pp > 1:
        raise UserError(f"--selection {cfg.selection.selection} runs a whole frozen model on every rank: it needs "
                        "--tensor-model-parallel-size 1 and --pipeline-model-parallel-size 1")
    if cfg.deepspeed.deepspeed:
        deepspeed_config.resolve(cfg, dp)  # a JSON that disagrees with the flags fails here, in one line
    return dp
