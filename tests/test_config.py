"""Flags -> Config, the --config file, derived defaults and one-line validation errors."""
import json
import math
import re
import subprocess
import sys

import pytest

from helpers import flags, run
from megatron_eslm.config import OptimizerConfig, parse_args, validate_layout
from megatron_eslm.errors import UserError
from megatron_eslm.training.lr_schedule import learning_rate


@pytest.fixture
def base(tmp_path):
    model = tmp_path / "tok.model"
    model.write_text("x")
    return ["--data-path", str(tmp_path / "d_text_document"), "--tokenizer-model", str(model)]


def test_defaults_and_derived_values(base):
    cfg = parse_args(base + ["--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                             "--micro-batch-size", "2", "--global-batch-size", "8", "--eslm-alpha", "0.3"])
    assert cfg.model.ffn_hidden_size == 256
    assert cfg.model.max_position_embeddings == 32
    assert cfg.training.global_batch_size == 8
    assert cfg.selection.eslm_alpha == 0.3
    assert cfg.selection.eslm_threshold_scope == "micro-batch"
    assert cfg.optimizer.lr_decay_iters == cfg.training.train_iters
    assert cfg.parallel.distributed_timeout_minutes == 10
    assert parse_args(base + ["--distributed-timeout-minutes", "45"]).parallel.distributed_timeout_minutes == 45


def test_each_flag_group_reaches_its_field(base):
    """One flag of every kind per group lands in its dataclass field (the config package's parser builds
    the flags from the fields of each group's module)."""
    cfg = parse_args(base + ["--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6",
                             "--weight-decay", "0.05", "--min-lr", "1e-5", "--lr-decay-style", "WSD",
                             "--lr-decay-iters", "50", "--lr-wsd-decay-iters", "10", "--ddp-bucket-size", "1000",
                             "--init-method-std", "0.01", "--lm-head-impl", "torch"])
    o = cfg.optimizer
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.min_lr) == (0.8, 0.95, 1e-6, 0.05, 1e-5)
    assert (o.lr_decay_style, o.lr_decay_iters, o.lr_wsd_decay_iters) == ("WSD", 50, 10)
    assert cfg.parallel.ddp_bucket_size == 1000 and cfg.model.init_method_std == 0.01
    assert cfg.selection.lm_head_impl == "torch"


def test_per_split_data_paths(tmp_path):
    """--train/--valid/--test-data-path (per-split blends) instead of --data-path and --split."""
    model = tmp_path / "tok.model"
    model.write_text("x")
    paths = {split: str(tmp_path / f"{split}_text_document") for split in ("train", "valid", "test")}
    cfg = parse_args(["--tokenizer-model", str(model), "--train-data-path", paths["train"],
                      "--valid-data-path", "0.5", paths["valid"], "0.5", paths["train"],
                      "--test-data-path", paths["test"]])
    assert cfg.data.train_data_path == [paths["train"]]
    assert cfg.data.valid_data_path == ["0.5", paths["valid"], "0.5", paths["train"]]
    assert cfg.data.test_data_path == [paths["test"]]


def test_config_file_with_command_line_override(base, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num-layers": 3, "hidden_size": 48, "num_attention_heads": 4, "lr": 0.01}))
    cfg = parse_args(base + ["--config", str(path), "--lr", "0.002"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.optimizer.lr) == (3, 48, 0.002)


@pytest.mark.parametrize("flags,culprit", [
    (["--eslm-alpha", "1.0"], "--eslm-alpha"),
    (["--eslm-alpha", "-0.1"], "--eslm-alpha"),
    (["--hidden-size", "100", "--num-attention-heads", "3"], "--num-attention-heads"),
    (["--seq-length", "64", "--max-position-embeddings", "32"], "--max-position-embeddings"),
    (["--micro-batch-size", "3", "--global-batch-size", "8"], "--global-batch-size"),
    (["--selection", "magic"], "--selection"),
    (["--eslm-threshold-scope", "global"], "--eslm-threshold-scope must be one of micro-batch, previous-step"),
    (["--selection", "lfr", "--eslm-threshold-scope", "previous-step"], "--eslm-threshold-scope"),
    (["--selection", "lfr", "--lfr-mode", "drop"], "--lfr-mode"),
    (["--eslm-granularity", "document"], "--eslm-granularity must be one of token, sequence"),
    (["--selection", "none", "--eslm-granularity", "sequence"], "--eslm-granularity sequence is read by"),
    (["--eslm-scorer", "teacher"], "--eslm-scorer must be one of student, proxy"),
    (["--lr-decay-style", "step"], "--lr-decay-style"),
    (["--num-layers", "two"], "--num-layers"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be positive, got 0"),
])
def test_bad_values_name_the_flag(base, flags, culprit):
    with pytest.raises(UserError, match=culprit):
        parse_args(base + flags)


def test_bad_config_file_names_the_file(base, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"no-such-flag": 1}))
    with pytest.raises(UserError, match="c.json.*no-such-flag"):
        parse_args(base + ["--config", str(path)])


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-model"):
        parse_args(["--data-path", "x", "--tokenizer-model", str(tmp_path / "missing.model")])


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "WSD"])
def test_lr_schedules(style):
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_decay_style=style, lr_warmup_iters=10, lr_decay_iters=110,
                          lr_wsd_decay_iters=20)
    assert learning_rate(cfg, 5) == pytest.approx(0.5)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    end = learning_rate(cfg, 110)
    assert end == pytest.approx(1.0 if style == "constant" else 0.1)
    mid = learning_rate(cfg, 60)
    expected = {"cosine": 0.55, "linear": 0.55, "constant": 1.0, "WSD": 1.0}[style]
    assert mid == pytest.approx(expected)
    if style == "WSD":
        assert learning_rate(cfg, 100) == pytest.approx(0.1 + 0.9 * 10 / 20)
    rates = [learning_rate(cfg, s) for s in range(10, 120)]
    assert all(a >= b - 1e-12 for a, b in zip(rates, rates[1:]))


def megatron_get_lr(num_steps: int, max_lr: float, min_lr: float, warmup: int, decay: int, style: str,
                    init_lr: float = 0.0, wsd_decay: int | None = None) -> float:
    """Megatron-LM's OptimizerParamScheduler.get_lr, written out (steps counted in iterations)."""
    if warmup > 0 and num_steps <= warmup:
        return init_lr + (max_lr - init_lr) * float(num_steps) / float(warmup)
    if style == "constant":
        return max_lr
    if num_steps > decay:
        return min_lr
    num_steps_, decay_steps_ = num_steps - warmup, decay - warmup
    ratio = float(num_steps_) / float(decay_steps_)
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # WSD, linear decay phase
        if num_steps <= decay - wsd_decay:
            coeff = 1.0
        else:
            coeff = 1.0 - float(num_steps_ - (decay_steps_ - wsd_decay)) / float(wsd_decay)
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "WSD"])
def test_training_runs_megatrons_rates(tiny_corpus, style):
    """Megatron steps its scheduler after the update: update k runs at get_lr(k - 1), the first at the
    initial rate. The trainer's records against get_lr written out."""
    records = run(flags(tiny_corpus, "--train-iters", "6", "--lr-warmup-iters", "2", "--lr", "1e-3", "--min-lr",
                        "1e-4", "--lr-decay-style", style, "--lr-wsd-decay-iters", "2", "--lr-warmup-init", "1e-5"))[1]
    expected = [megatron_get_lr(k - 1, 1e-3, 1e-4, 2, 6, style, init_lr=1e-5, wsd_decay=2) for k in range(1, 7)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)
    assert records[0]["lr"] == 1e-5


def test_llama_flags(base, tmp_path):
    cfg = parse_args(base + ["--hidden-size", "64", "--num-attention-heads", "8", "--position-embedding-type", "rope",
                             "--rotary-base", "500000", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6",
                             "--swiglu", "--ffn-hidden-size", "176", "--group-query-attention", "--num-query-groups",
                             "2", "--kv-channels", "16", "--untie-embeddings-and-output-weights",
                             "--disable-bias-linear"]).model
    assert (cfg.position_embedding_type, cfg.rotary_base, cfg.normalization, cfg.norm_epsilon) == ("rope", 500000,
                                                                                                "RMSNorm", 1e-6)
    assert (cfg.swiglu, cfg.ffn_hidden_size, cfg.group_query_attention, cfg.num_query_groups, cfg.kv_channels) == (
        True, 176, True, 2, 16)
    assert cfg.untie_embeddings_and_output_weights and cfg.disable_bias_linear
    gpt = parse_args(base + ["--hidden-size", "64", "--num-attention-heads", "8"]).model  # derived sizes
    assert (gpt.num_query_groups, gpt.kv_channels, gpt.ffn_hidden_size, gpt.norm_epsilon) == (8, 8, 256, 1e-5)
    assert parse_args(base + ["--hidden-size", "768", "--swiglu"]).model.ffn_hidden_size == 2048  # int(8/3 h / 64) 64
    assert parse_args(base + ["--layernorm-epsilon", "1e-6"]).model.norm_epsilon == 1e-6  # Megatron's old name
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"layernorm-epsilon": 1e-4}))
    assert parse_args(base + ["--config", str(path)]).model.norm_epsilon == 1e-4


@pytest.mark.parametrize("flags,message", [
    (["--position-embedding-type", "alibi"], "--position-embedding-type must be one of learned_absolute, rope"),
    (["--normalization", "BatchNorm"], "--normalization must be one of LayerNorm, RMSNorm"),
    (["--norm-epsilon", "0"], "--norm-epsilon must be positive, got 0.0"),
    (["--rotary-base", "500000"], "--rotary-base 500000 needs --position-embedding-type rope"),
    (["--position-embedding-type", "rope", "--kv-channels", "7"], "rope needs an even head dimension"),
    (["--group-query-attention"], "--group-query-attention needs --num-query-groups"),
    (["--num-query-groups", "2"], "--num-query-groups 2 needs --group-query-attention"),
    (["--group-query-attention", "--num-query-groups", "5"], "--num-query-groups 5 does not divide "
                                                              "--num-attention-heads 12"),
    (["--group-query-attention", "--num-query-groups", "0"], "--num-query-groups must be positive, got 0"),
    (["--hidden-size", "100", "--num-attention-heads", "3"], "(or give --kv-channels)"),
    (["--kv-channels", "0"], "--kv-channels must be positive, got 0"),
])
def test_bad_llama_flags_fail_in_one_line(base, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(base + flags)


@pytest.mark.parametrize("tp,error", [(2, None), (4, "--num-query-groups 2 is not divisible by "
                                                     "--tensor-model-parallel-size 4")])
def test_query_groups_split_over_tensor_parallel_ranks(base, tp, error):
    """Each TP rank holds whole key/value groups (and the query heads that use them)."""
    cfg = parse_args(base + ["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size",
                             str(tp), "--micro-batch-size", "1", "--global-batch-size", "4"])
    if error is None:
        assert validate_layout(cfg, 4) == 4 // tp
    else:
        with pytest.raises(UserError, match=re.escape(error)):
            validate_layout(cfg, 4)


def test_the_flag_checks_import_no_torch():
    """The launch scripts run parse_args and validate_layout before every launch (launch_scripts/common.sh's
    check_config): without torch that check takes 0.2 s, with it 2.8 s."""
    code = "import sys, megatron_eslm.config; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
