"""Flags -> Config, the --config file, derived defaults and one-line validation errors."""
import json

import pytest

from megatron_eslm.config import OptimizerConfig, parse_args
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
