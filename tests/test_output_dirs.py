"""No tool deletes or overwrites what it did not write (megatron_eslm/output_dir.py): a directory of others
is refused in one line and left exactly as it was, unless --force; --save equal to --load is refused even
with --force; a tool's own earlier output is replaced."""
from __future__ import annotations

import os
import sys

import pytest

from megatron_eslm.output_dir import MARKER, check_output_dir, staged_dir

from helpers import REPO

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


def contents(path) -> dict[str, tuple[str, int]]:
    """Every file under `path`: relative path -> (content, mtime in ns)."""
    found = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name)) as fh:
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
