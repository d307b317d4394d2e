"""Model shape flags: sizes, dropout and init of the GPT, the Llama-family options (rotary positions,
RMSNorm, SwiGLU, grouped-query attention, an untied output layer, no linear biases) and activation
recompute, with Megatron-LM's flag names. The defaults are GPT-2's."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import one_of, positive
from megatron_eslm.errors import UserError

TITLE = "model"
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")  # model/attention_backend.py

# Flags with more than one spelling (the first names the field); Megatron-LM still reads the old one.
FLAG_NAMES = {"norm_epsilon": ("--norm-epsilon", "--layernorm-epsilon")}
# Fields renamed since checkpoints stored their config: old name -> new name.
RENAMED_FIELDS = {"layernorm_epsilon": "norm_epsilon"}
# Fields a stored config keeps that are the training run's, not the model's: a tool that rebuilds the model
# (generation, a frozen KD model, conversion) takes the defaults, e.g. SDPA's kernel for its own device.
RUN_SETTINGS = ("attention_backend",)


@dataclass
class ModelConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size (with swiglu: Megatron's 8/3 rounding)
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # None: seq_length
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    keyed_dropout: bool = False
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    normalization: str = "LayerNorm"
    swiglu: bool = False
    group_query_attention: bool = False
    num_query_groups: int | None = None  # None: num_attention_heads (filled by finalize_model)
    kv_channels: int | None = None  # None: hidden_size / num_attention_heads (filled by finalize_model)
    untie_embeddings_and_output_weights: bool = False
    disable_bias_linear: bool = False
    recompute_granularity: str | None = None  # None: keep every activation (see training/recompute.py)
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    attention_backend: str = "auto"


HELP = {
    "num_layers": "transformer blocks",
    "hidden_size": "model width",
    "num_attention_heads": "attention (query) heads; must divide --hidden-size unless --kv-channels is given",
    "ffn_hidden_size": "MLP width; unset means 4x hidden, or with --swiglu Megatron's int(8/3 x hidden / 64) x 64 "
                       "(Llama instead rounds 8/3 x hidden up to a multiple of 256: 11008 for hidden 4096; "
                       "Llama-3-8B uses 14336: give it here)",
    "seq_length": "tokens per training sample",
    "max_position_embeddings": "the model's context: the learned position table's size, with rope the "
                               "window generation uses; unset means --seq-length",
    "make_vocab_size_divisible_by": "pad the tokenizer vocabulary to a multiple of this",
    "hidden_dropout": "dropout after attention/MLP and on embeddings",
    "attention_dropout": "dropout on attention probabilities",
    "keyed_dropout": "draw every dropout mask from a hash of one number drawn per dropout site and the "
                     "elements' global token positions (and heads), not from the generator's stream: masks "
                     "that do not depend on how the sequence is split, so a --context-parallel-size run "
                     "(which needs it for dropout) equals one process with it; attention then runs the math "
                     "path of context_parallel/ring.py instead of fused SDPA",
    "init_method_std": "std of the normal weight init",
    "norm_epsilon": "epsilon of every LayerNorm or RMSNorm (--layernorm-epsilon is the same flag)",
    "position_embedding_type": f"{' or '.join(POSITION_EMBEDDING_TYPES)}: a learned position table, or rotary "
                               "embeddings on queries and keys (no table)",
    "rotary_base": "rotary embeddings' base (Llama 2: 10000, Llama 3: 500000); needs rope",
    "normalization": f"{' or '.join(NORMALIZATIONS)} (RMSNorm: weight only, fp32 statistics)",
    "swiglu": "MLP silu(x W_gate) * (x W_up) then W_down (three matrices of --ffn-hidden-size) instead of GELU",
    "group_query_attention": "grouped-query attention: --num-query-groups key/value heads shared by the query heads",
    "num_query_groups": "key/value heads under --group-query-attention; must divide --num-attention-heads and "
                        "be divisible by --tensor-model-parallel-size",
    "kv_channels": "head dimension; unset means hidden / heads",
    "untie_embeddings_and_output_weights": "a separate vocab-parallel output layer instead of the input "
                                           "embedding as LM head",
    "disable_bias_linear": "no bias in any linear layer (attention and MLP projections)",
    "recompute_granularity": f"{' or '.join(RECOMPUTE_GRANULARITIES)}: keep less for the backward and run that "
                             "part of the forward again (dropout replayed exactly). full: whole transformer "
                             "layers, chosen by --recompute-method; selective: the attention core (QK^T, "
                             "softmax, dropout, AV) of every layer",
    "recompute_method": f"{' or '.join(RECOMPUTE_METHODS)}, with --recompute-granularity full: uniform keeps only "
                        "the input of each group of --recompute-num-layers consecutive layers of a pipeline "
                        "stage (the last group may be shorter); block recomputes the first "
                        "--recompute-num-layers layers of each stage one by one and keeps the rest",
    "recompute_num_layers": "layers per recomputed group (uniform) or recomputed layers per pipeline stage "
                            "(block); at most the layers of a stage",
    "attention_backend": f"{', '.join(ATTENTION_BACKENDS)}: the attention kernel (PyTorch SDPA's backends). "
                         "auto: on CUDA the fastest the shape allows (cuDNN first on Hopper, else flash; "
                         "context parallelism's lower-right mask on flash or efficient), elsewhere SDPA's own "
                         "choice; flash and cudnn need --bf16, efficient one key/value head per query head; "
                         "flash, cudnn and efficient need CUDA (docs/performance.md)",
}


def model_config_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from a stored `Config.to_dict()["model"]`, including those saved before a field was
    renamed (checkpoints keep the config they were trained with)."""
    return ModelConfig(**{RENAMED_FIELDS.get(key, key): value for key, value in values.items()
                          if key not in RUN_SETTINGS})


def finalize_model(m: ModelConfig) -> ModelConfig:
    """Fill the model's derived sizes (MLP width, position window, head dimension, key/value groups).
    Idempotent, so configs stored in checkpoints (already filled) pass through it unchanged. Raises where
    a size cannot be derived."""
    if m.ffn_hidden_size is None:
        # Megatron-LM's default: two input projections of 8/3 hidden keep the parameters near a 4x GELU MLP.
        m.ffn_hidden_size = int(4 * m.hidden_size * 2 / 3 / 64) * 64 if m.swiglu else 4 * m.hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.kv_channels is None:
        positive(m.num_attention_heads, "--num-attention-heads")
        if m.hidden_size % m.num_attention_heads:
            raise UserError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                            f"{m.num_attention_heads} (or give --kv-channels)")
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if m.group_query_attention and m.num_query_groups is None:
        raise UserError("--group-query-attention needs --num-query-groups")
    if not m.group_query_attention and m.num_query_groups not in (None, m.num_attention_heads):
        raise UserError(f"--num-query-groups {m.num_query_groups} needs --group-query-attention")
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    return m


def validate_model(m: ModelConfig) -> None:
    """A finalized model section (derived sizes filled)."""
    for value, flag in ((m.num_layers, "--num-layers"), (m.hidden_size, "--hidden-size"),
                        (m.num_attention_heads, "--num-attention-heads"), (m.seq_length, "--seq-length"),
                        (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by"),
                        (m.norm_epsilon, "--norm-epsilon"), (m.rotary_base, "--rotary-base"),
                        (m.num_query_groups, "--num-query-groups"), (m.kv_channels, "--kv-channels")):
        positive(value, flag)
    one_of(m.position_embedding_type, POSITION_EMBEDDING_TYPES, "--position-embedding-type")
    one_of(m.normalization, NORMALIZATIONS, "--normalization")
    if m.num_attention_heads % m.num_query_groups:
        raise UserError(f"--num-query-groups {m.num_query_groups} does not divide --num-attention-heads "
                        f"{m.num_attention_heads}")
    if m.seq_length > m.max_position_embeddings:
        raise UserError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                        f"{m.max_position_embeddings}")
    if m.position_embedding_type == "rope" and m.kv_channels % 2:
        raise UserError(f"--position-embedding-type rope needs an even head dimension, got --kv-channels "
                        f"{m.kv_channels}")
    if m.position_embedding_type != "rope" and m.rotary_base != ModelConfig.rotary_base:
        raise UserError(f"--rotary-base {m.rotary_base} needs --position-embedding-type rope")
    for value, flag in ((m.hidden_dropout, "--hidden-dropout"), (m.attention_dropout, "--attention-dropout")):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    validate_recompute(m)
    validate_attention_backend(m)


def validate_attention_backend(m: ModelConfig) -> None:
    """The shapes an explicit --attention-backend has no kernel for (its dtype: `validation.py`)."""
    one_of(m.attention_backend, ATTENTION_BACKENDS, "--attention-backend")
    if m.attention_backend == "efficient" and m.num_query_groups != m.num_attention_heads:
        raise UserError(f"--attention-backend efficient needs a key/value head per query head (PyTorch's "
                        f"memory-efficient kernel has no grouped-query form), got --num-query-groups "
                        f"{m.num_query_groups} of {m.num_attention_heads} heads: use auto, flash, cudnn or math")
    if m.attention_backend == "flash" and m.kv_channels > 256:
        raise UserError(f"--attention-backend flash runs head dimensions up to 256, got --kv-channels "
                        f"{m.kv_channels}")


def validate_recompute(m: ModelConfig) -> None:
    """Megatron's rules: full needs a method and a layer count, selective takes neither. Whether the count
    fits a pipeline stage is `validate_layout`'s check."""
    method, layers = m.recompute_method, m.recompute_num_layers
    if m.recompute_granularity is not None:
        one_of(m.recompute_granularity, RECOMPUTE_GRANULARITIES, "--recompute-granularity")
    if m.recompute_granularity != "full":
        if method is not None or layers is not None:
            flag = "--recompute-method" if method is not None else "--recompute-num-layers"
            if m.recompute_granularity is None:
                raise UserError(f"{flag} needs --recompute-granularity full")
            raise UserError(f"{flag} is not supported with --recompute-granularity selective (it recomputes "
                            "the attention core of every layer)")
        return
    if method is None:
        raise UserError(f"--recompute-granularity full needs --recompute-method ({' or '.join(RECOMPUTE_METHODS)})")
    one_of(method, RECOMPUTE_METHODS, "--recompute-method")
    if layers is None:
        raise UserError("--recompute-granularity full needs --recompute-num-layers")
    positive(layers, "--recompute-num-layers")
