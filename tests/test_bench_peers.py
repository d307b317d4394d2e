"""tools/bench_peers.py: its table at the --tiny shape on the CPU (every row, ours at 1.00, the peers holding
as many parameters as ours) and --tiny's shape under a preset. The numbers are not checked."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_eslm.config import ModelConfig
from megatron_eslm.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_peers  # noqa: E402
from test_bench_tools import table  # noqa: E402


@pytest.mark.slow  # transformers' GPT-2 modules load and torch.compile traces: about 10 s on 2 busy cores
def test_tiny_table_on_cpu(capsys):
    """Every row, in order, at --tiny with one layer; the compiled peer traced by torch.compile's eager
    backend (inductor's C++ compile takes a minute here); megatron-core's row says why it cannot run on the
    CPU."""
    pytest.importorskip("transformers")
    bench_peers.main(["--tiny", "--num-layers", "1", "--steps", "1", "--warmup", "1", "--threads", "1",
                      "--device", "cpu", "--compile-backend", "eager"])
    out = capsys.readouterr().out
    assert "gpt2 shape: layers 1, hidden 64, heads 4 (4 query groups), ffn 256, seq 64, vocab 512" in out
    header, rows = table(out)
    assert list(rows) == ["ours", "ours, --compile", "transformers GPT2LMHeadModel",
                          "transformers GPT2LMHeadModel, compiled", "megatron-core GPTModel (local spec)"]
    column = {name: [cells[i] for cells in rows.values()] for i, name in enumerate(header)}
    assert column["tokens/s vs ours"][0] == "1.00"
    measured = [i for i, ratio in enumerate(column["tokens/s vs ours"]) if ratio != "-"]
    assert measured == ([0, 1, 2, 3] if hasattr(ModelConfig(), "compile") else [0, 2, 3])
    assert len({column["params"][i] for i in measured}) == 1  # the same model everywhere
    if not hasattr(ModelConfig(), "compile"):
        assert column["note"][1] == "n/a (--compile not built)"
    assert column["note"][4].startswith(("n/a on cpu", "not importable"))


def test_rows_without_the_peer_packages(monkeypatch):
    """Where transformers and megatron-core do not import, their rows say so."""
    find_spec = bench_peers.importlib.util.find_spec
    monkeypatch.setattr(bench_peers.importlib.util, "find_spec",
                        lambda name: None if name.split(".")[0] in ("transformers", "megatron") else find_spec(name))
    cfg = bench_peers.model_config(bench_peers.parse(["--tiny", "--preset", "llama-1b"]))
    rows = dict(bench_peers.plan(cfg, bench_peers.torch.device("cpu")))
    assert rows == {"ours": "", "ours, --compile": rows["ours, --compile"],
                    "transformers LlamaForCausalLM": "not importable (pip install transformers)",
                    "transformers LlamaForCausalLM, compiled": "not importable (pip install transformers)",
                    "megatron-core GPTModel (local spec)": "not importable (pip install megatron-core)"}


def test_tiny_under_a_preset_keeps_its_options():
    """--tiny's sizes over llama-1b's (query groups that divide the tiny heads), its Llama options kept,
    a size flag given winning; --warmup 0 refused (the compiled rows would time their compile)."""
    args = bench_peers.parse(["--tiny", "--preset", "llama-1b", "--seq-length", "32"])
    cfg = bench_peers.model_config(args)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.ffn_hidden_size, cfg.seq_length) == \
           (2, 64, 2, 256, 32)
    assert cfg.swiglu and cfg.untie_embeddings_and_output_weights
    with pytest.raises(UserError, match=r"--warmup must be at least 1 .*, got 0"):
        bench_peers.parse(["--tiny", "--warmup", "0"])
