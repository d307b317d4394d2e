"""Every `python tools/X.py ...` and `python -m megatron_eslm.X ...` command in README.md, docs/, examples/ and
launch_scripts/README.md names a tool that exists and only flags that tool's --help lists; the memory
estimates run as written. All in this process: each tool's --help is read once (runpy), no subprocess.
(The launch scripts' documented dry runs are run by tests/test_launch_scripts.py.)"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import runpy
import sys

import pytest

from helpers import REPO

DOCS = ["README.md", "examples/README.md", "launch_scripts/README.md", *sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
    + glob.glob(os.path.join(REPO, "examples", "*", "README.md")))]
COMMAND = re.compile(r"(?:^|`|\$ )\s*(?:[A-Z_]+=\S+ )*python3? (-m megatron_eslm\.[\w.]+|tools/\w+\.py)([^`\n]*)", re.M)
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
PRETRAIN = "-m megatron_eslm.pretrain"
# tools that hand the flags they do not know to pretrain's parser (scaling_study: those after `--`)
FORWARDS_TO_PRETRAIN = {"tools/estimate_memory.py"}


def documented_commands() -> list[tuple[str, str, str]]:
    """(document, tool, arguments) of every command, line continuations joined, comments cut."""
    found = []
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as fh:
            text = re.sub(r"\\\n\s*", " ", fh.read())
        for match in COMMAND.finditer(text):
            found.append((doc, match.group(1), match.group(2).split(" # ")[0].strip()))
    return found


@contextlib.contextmanager
def argv(args: list[str]):
    saved = sys.argv
    sys.argv = args
    try:
        yield
    finally:
        sys.argv = saved


def help_text(tool: str) -> str:
    """The tool's --help, run as `python tool --help` would run it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        if tool.startswith("-m "):
            with argv([tool[3:], "--help"]):
                runpy.run_module(tool[3:], run_name="__main__", alter_sys=False)
        else:
            with argv([tool, "--help"]):
                runpy.run_path(os.path.join(REPO, tool), run_name="__main__")
    assert done.value.code == 0, tool
    return out.getvalue()


def test_every_documented_command_uses_real_tools_and_flags(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    commands = documented_commands()
    assert len(commands) > 40
    helps: dict[str, set[str]] = {}

    def flags_of(tool: str) -> set[str]:
        if tool not in helps:
            assert tool.startswith("-m ") or os.path.isfile(os.path.join(REPO, tool)), f"{tool} is missing"
            helps[tool] = set(FLAG.findall(help_text(tool))) | {"--help"}
        return helps[tool]

    wrong = []
    for doc, tool, args in commands:
        own, _, passed = f" {args} ".partition(" -- ")
        known = flags_of(tool) | (flags_of(PRETRAIN) if tool in FORWARDS_TO_PRETRAIN else set())
        wrong += [f"{doc}: {tool} {flag}" for flag in FLAG.findall(own) if flag not in known]
        wrong += [f"{doc}: {tool} -- {flag}" for flag in FLAG.findall(passed) if flag not in flags_of(PRETRAIN)]
    assert not wrong, "documented flags the tool does not have:\n" + "\n".join(wrong)


def test_documented_memory_estimates_run_as_written(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    import estimate_memory

    runs = [args for _, tool, args in documented_commands() if tool == "tools/estimate_memory.py"
            and "..." not in args and "RECIPE" not in args]
    assert len(runs) >= 4
    for args in runs:
        estimate_memory.main(args.split())
        assert "Per-GPU memory" in capsys.readouterr().out, args
    estimate_memory.main(["--config", "examples/gpt2_124m", "--world-size", "8", "--vocab-size", "32000"])
    assert "DeepSpeed ZeRO-1" in capsys.readouterr().out  # the recipe folder's ds_config.json
    with pytest.raises(SystemExit):
        estimate_memory.main(["--config", "examples/gpt2_124m", "--world-size", "8"])
    assert "give --vocab-size" in capsys.readouterr().err
