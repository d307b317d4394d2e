"""A newcomer's first minute with pretrain: the start block before the first step, a progress line with an
ETA after the first iteration whatever --log-interval, one line when a resumed run has nothing left, and a
hint for a --data-path given with its .bin suffix."""
import re

import pytest

from helpers import flags, run
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.training.trainer import Trainer


def test_start_block_and_first_iteration_line(tiny_corpus, tmp_path):
    metrics = str(tmp_path / "metrics.jsonl")
    lines = []
    trainer, records = run(flags(tiny_corpus, "--train-iters", "2", "--log-interval", "100",
                                 "--metrics-file", metrics), log=lines.append)
    block = {line.split(":", 1)[0]: line for line in lines[:6]}
    assert list(block) == ["model", "layout", "device", "data", "start", "metrics"], lines[:6]
    parameters = sum(p.numel() for p in trainer.model.parameters())  # one process: the whole model
    assert f"{parameters / 1e6:.2f}M parameters" in block["model"]
    assert re.search(r", [0-9.e+]+ FLOPs per token \(forward \+ backward, dense\)", block["model"])
    assert "1 process(es) = TP1 x PP1 x DP1;" in block["layout"]
    assert block["device"] == "device:  cpu, fp32"
    assert re.fullmatch(rf"data:    train {len(trainer.train_ds)} samples for 2 iterations \(\d+ epoch\(s\) of "
                        rf"its split\); valid {len(trainer.valid_ds)} samples", block["data"])
    assert block["start"] == "start:   fresh"
    assert block["metrics"] == f"metrics: metrics file {metrics}"
    # iteration 1 is no logging iteration: its line has the host time and ETA = that time x 1 remaining
    first = re.search(r"\] 1/2 elapsed (\S+) ETA (\S+) \| iter 1 \| first iteration [0-9.]+ s", lines[6])
    assert first and first.group(1) == first.group(2), lines[6]
    assert len(records) == 1 and "| iter 2 |" in lines[7]


def test_resuming_a_finished_run_says_so(tiny_corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    run(flags(tiny_corpus, "--train-iters", "2", "--save", save))
    lines = []
    _, records = run(flags(tiny_corpus, "--train-iters", "2", "--save", save, "--load", save), log=lines.append)
    assert records == []
    assert any(line.startswith("start:   resumed from") and "at iteration 2" in line for line in lines)
    assert lines[-1] == (f"nothing left to train: the checkpoint under --load {save} is at iteration 2, "
                         "--train-iters is 2 (raise it to train on)")


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_data_path_with_a_suffix_names_the_prefix(tiny_corpus, suffix):
    prefix, model = tiny_corpus
    hint = f"{prefix}{suffix}.idx: no such file (a dataset is named by its prefix: give {prefix}, without {suffix})"
    with pytest.raises(UserError, match=re.escape(hint)):
        Trainer(parse_args(flags((prefix + suffix, model))))


@pytest.mark.parametrize("rank, rank_local, printed", [("0", False, True), ("1", False, False), ("1", True, True)])
def test_user_error_printed_once_under_a_launcher(monkeypatch, capsys, rank, rank_local, printed):
    """Rank 0 prints the line, the others exit with the same code silently, unless only they can meet it."""
    monkeypatch.setenv("RANK", rank)

    @exit_on_user_error
    def main():
        raise UserError("--lr: bad", rank_local=rank_local)

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --lr: bad\n" if printed else "")
