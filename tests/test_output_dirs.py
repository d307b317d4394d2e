"""No tool deletes or overwrites what it did not write (megatron_eslm/output_dir.py): a directory of others
is refused in one line and left exactly as it was, unless --force; --save equal to --load is refused even
with --force; a tool's own earlier output is replaced. Pretraining's --save holding checkpoints it does not
resume is refused the same way, unless --overwrite-save (training/checkpointing.py::check_save_dir)."""
from __future__ import annotations

import os
import re
import sys

import pytest

from megatron_eslm import pretrain
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.output_dir import MARKER, check_output_dir, staged_dir
from megatron_eslm.training.checkpointing import DEEPSPEED_TRACKER, TRACKER, check_save_dir, latest_iteration

from helpers import REPO, flags, run, save_refusal_on_rank
from rank_pool import run_on_ranks

sys.path.insert(0, os.path.join(REPO, "tools"))
import average_checkpoints  # noqa: E402
import export_hf  # noqa: E402
import import_hf  # noqa: E402
import merge_datasets  # noqa: E402
import preprocess_data  # noqa: E402
import reshape_checkpoint  # noqa: E402
import scaling_study  # noqa: E402
import selection_study  # noqa: E402
import threshold_scope_study  # noqa: E402
import train_tokenizer  # noqa: E402
from megatron_eslm import quickstart  # noqa: E402


def foreign(path) -> dict[str, str]:
    """A directory holding the user's files; returns them (relative path -> content)."""
    files = {"notes.txt": "mine", os.path.join("sub", "y"): "also mine"}
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w") as fh:
            fh.write(text)
    return files


def contents(path) -> dict[str, tuple[bytes, int]]:
    """Every file under `path`: relative path -> (content, mtime in ns)."""
    found = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                found[os.path.relpath(os.path.join(root, name), path)] = (
                    fh.read(), os.stat(os.path.join(root, name)).st_mtime_ns)
    return found


def refused(main, argv, capsys, *words: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("main, flags", [
    (export_hf.main, ["--load", "{load}", "--output", "{out}"]),
    (reshape_checkpoint.main, ["--load", "{load}", "--save", "{out}"]),
    (average_checkpoints.main, ["--load", "{load}", "--last", "1", "--save", "{out}"]),
    (import_hf.main, ["--input", "{load}", "--save", "{out}"]),
    (selection_study.main, ["--text", "stdlib", "--work-dir", "{load}", "--out-dir", "{out}"]),
    (scaling_study.main, ["--config", os.path.join(REPO, "examples", "gpt2_124m", "pretrain.json"),
                          "--out-dir", "{out}"]),
    (threshold_scope_study.main, ["--work-dir", "{out}"]),
    (quickstart.main, ["--output-dir", "{out}"]),
], ids=["export_hf", "reshape_checkpoint", "average_checkpoints", "import_hf", "selection_study", "scaling_study",
        "threshold_scope_study", "quickstart"])
def test_a_directory_of_others_is_refused_and_untouched(main, flags, tmp_path, capsys):
    load, out = tmp_path / "load", tmp_path / "out"
    load.mkdir()
    foreign(out)
    mine = contents(out)
    argv = [arg.format(load=load, out=out) for arg in flags]
    refused(main, argv, capsys, str(out), "--force", "notes.txt")
    assert contents(out) == mine


@pytest.mark.parametrize("main, flags, written", [
    (preprocess_data.main, ["--input", "{dir}/in.txt", "--output-prefix", "{dir}/corpus", "--tokenizer-type",
                            "NullTokenizer", "--vocab-size", "10"], ["corpus_text_document.bin"]),
    (merge_datasets.main, ["--input", "{dir}/a", "--output-prefix", "{dir}/ab"], ["ab.idx"]),
    (train_tokenizer.main, ["--input", "{dir}/in.txt", "--vocab-size", "100", "--output-prefix", "{dir}/tok"],
     ["tok.model"]),
    (threshold_scope_study.main, ["--work-dir", "{dir}/work", "--csv", "{dir}/rows.csv"], ["rows.csv"]),
], ids=["preprocess_data", "merge_datasets", "train_tokenizer", "threshold_scope_study-csv"])
def test_an_existing_output_file_is_refused_and_untouched(main, flags, written, tmp_path, capsys):
    """Output files carry no marker: one that exists may be the user's, and is replaced only with --force."""
    for name in ["in.txt", *written]:
        (tmp_path / name).write_text("mine")
    mine = contents(tmp_path)
    refused(main, [arg.format(dir=tmp_path) for arg in flags], capsys, written[0], "--force")
    assert contents(tmp_path) == mine


@pytest.mark.parametrize("main, flags", [
    (reshape_checkpoint.main, ["--load", "{ckpt}", "--save", "{ckpt}", "--force"]),
    (reshape_checkpoint.main, ["--load", "{ckpt}", "--save", "{ckpt}/inner"]),
    (average_checkpoints.main, ["--load", "{ckpt}", "--last", "1", "--save", "{ckpt}/"]),
    (import_hf.main, ["--input", "{ckpt}", "--save", "{ckpt}"]),
], ids=["reshape", "reshape-nested", "average", "import_hf"])
def test_save_equal_to_load_is_refused_even_with_force(main, flags, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    foreign(ckpt)
    mine = contents(ckpt)
    refused(main, [arg.format(ckpt=ckpt) for arg in flags], capsys, "--load" if "--load" in flags else "--input")
    assert contents(ckpt) == mine


def test_own_output_is_replaced_and_force_overrides(tmp_path):
    out = str(tmp_path / "out")
    assert check_output_dir(out, "tool", "--output", False)  # absent
    with staged_dir(out, "tool") as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert sorted(os.listdir(out)) == [MARKER, "a"]
    assert check_output_dir(out, "tool", "--output", False)  # our own earlier output
    with staged_dir(out, "tool") as tmp:
        open(os.path.join(tmp, "b"), "w").close()
    assert sorted(os.listdir(out)) == [MARKER, "b"]
    with pytest.raises(Exception, match="not an earlier output of other"):
        check_output_dir(out, "other", "--output", False)  # another tool's output
    assert not check_output_dir(out, "other", "--output", True)  # forced: not the other tool's to mark
    with pytest.raises(RuntimeError), staged_dir(out, "tool") as tmp:  # a failed write leaves the old output
        raise RuntimeError
    assert sorted(os.listdir(out)) == [MARKER, "b"]
    assert [name for name in os.listdir(tmp_path) if name != "out"] == []  # no temporary left behind


def test_selection_study_writes_under_an_untracked_default():
    args = selection_study.parse(["--text", "stdlib"])
    assert args.out_dir.startswith("runs" + os.sep) or args.out_dir.startswith("runs/")
    assert args.work_dir.startswith(args.out_dir)


def test_pretrain_save_holding_checkpoints_is_refused_and_untouched(tiny_corpus, tmp_path, capsys):
    """A fresh run, or one loading another directory, into a --save that holds a run's checkpoints stops in
    one line before anything is built, naming --save, the iteration and the ways out; the checkpoint stays
    byte for byte as it was. --save nested with --load is refused even with --overwrite-save; with it alone,
    the earlier checkpoints are replaced (the user's other files in --save kept)."""
    save = str(tmp_path / "ckpt")
    run(flags(tiny_corpus, "--train-iters", "2", "--save", save))
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    before, entries = contents(save), sorted(os.listdir(save))
    ways_out = (f"--save {save} already holds checkpoints (iteration 2)", f"--load {save}", "another --save",
                "--overwrite-save")
    refused(pretrain.main, flags(tiny_corpus, "--save", save), capsys, *ways_out)
    base = str(tmp_path / "base")
    refused(pretrain.main, flags(tiny_corpus, "--load", base, "--save", save), capsys, *ways_out, f"--load {base}")
    for nested in (["--load", save, "--save", os.path.join(save, "inner")], ["--load", os.path.join(save, "x"),
                                                                             "--save", save]):
        refused(pretrain.main, flags(tiny_corpus, *nested, "--overwrite-save"), capsys, "nested with --load")
    assert contents(save) == before and sorted(os.listdir(save)) == entries
    with pytest.raises(UserError, match="--overwrite-save needs --save"):
        parse_args(flags(tiny_corpus, "--overwrite-save"))

    lines = []
    run(flags(tiny_corpus, "--train-iters", "1", "--lr-warmup-iters", "0", "--save", save, "--overwrite-save"), log=lines.append)
    assert sorted(os.listdir(save)) == ["iter_0000001", TRACKER, "notes.txt"] and latest_iteration(save) == 1
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    assert any(line.startswith(f"--overwrite-save: removed the earlier checkpoints under {save} ("
                               f"{TRACKER}, iter_0000002)") for line in lines), lines


@pytest.mark.parametrize("held, load, overwrite, outcome", [
    ([], None, False, []),  # absent: a fresh run
    ([], "{save}", False, []),  # the first launch of --load S --save S
    ([TRACKER, "iter_0000003"], "{save}", False, []),  # a resume
    ([TRACKER, "iter_0000003"], "{save}/", False, []),  # the same directory, spelt otherwise
    (["notes.txt"], None, False, []),  # the user's files alone are no checkpoint
    ([DEEPSPEED_TRACKER, "iter_0000003"], None, False, "(iter_0000003)"),  # a DeepSpeed run's tracker
    (["iter_0000004.emergency"], "{tmp}/base", False,  # a survivors' unfinished snapshot
     "(iter_0000004.emergency) that this run, which loads --load {tmp}/base, would replace"),
    ([TRACKER, DEEPSPEED_TRACKER, "iter_0000003", "notes.txt"], None, True,
     [TRACKER, DEEPSPEED_TRACKER, "iter_0000003"]),  # --overwrite-save: what it removes, trackers first
    ([], "{save}/inner", True, "nested with --load"),
])
def test_which_save_a_run_may_write(tmp_path, held, load, overwrite, outcome):
    """`check_save_dir`'s table: the entries --overwrite-save removes, or the refusal's words."""
    save = tmp_path / "ckpt"
    for name in held:
        (save / name).parent.mkdir(exist_ok=True)
        if name.startswith("iter_"):
            (save / name).mkdir()
        else:
            (save / name).write_text("3\n" if name == TRACKER else "iter_0000003")
    load = load and load.format(save=save, tmp=tmp_path)
    if isinstance(outcome, list):
        assert check_save_dir(str(save), load, overwrite) == outcome
    else:
        with pytest.raises(UserError, match=re.escape(outcome.format(tmp=tmp_path))):
            check_save_dir(str(save), load, overwrite)


@pytest.mark.slow
def test_every_rank_refuses_and_rank_0_alone_reads_the_save(tiny_corpus, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / TRACKER).write_text("5\n")
    per_rank = run_on_ranks(2, save_refusal_on_rank, flags(tiny_corpus, "--save", str(save)))
    message = f"--save {save} already holds checkpoints (iteration 5)"
    assert [(error.startswith(message), reads) for error, reads in per_rank] == [(True, 1), (True, 0)], per_rank
    assert per_rank[0][0] == per_rank[1][0]
