"""Every `python tools/X.py ...` and `python -m megatron_eslm.X ...` command in README.md, docs/, examples/ and
launch_scripts/README.md, bare or under torchrun/deepspeed/srun, names a tool that exists and only flags that
tool's --help lists; the memory estimates run as written; launch_scripts/README.md's `$ ...` dry runs run as
written (off Slurm: SLURM_HOSTS, no scontrol) and print what the README shows. Each tool's --help is read once
in this process (runpy); the dry runs are bash subprocesses."""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import runpy
import subprocess
import sys

import pytest

from helpers import REPO

DOCS = ["README.md", "examples/README.md", "launch_scripts/README.md", *sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
    + glob.glob(os.path.join(REPO, "examples", "*", "README.md")))]
# a python command, bare (`python -m X`, `python tools/X.py`) or under a launcher (`torchrun ... -m X`,
# `deepspeed ... --module X`, `srun ... torchrun ... tools/X.py`); the launcher's own flags are not the tool's
COMMAND = re.compile(r"(?:^|`|\$ )\s*(?:[A-Z_]+=\S+ )*(?:python3? |(?:srun [^`\n]*?)?(?:torchrun|deepspeed) [^`\n]*?)"
                     r"((?:-m|--module) megatron_eslm\.[\w.]+|tools/\w+\.py)([^`\n]*)", re.M)
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
            tool = re.sub(r"^--module ", "-m ", match.group(1))
            found.append((doc, tool, match.group(2).split(" # ")[0].strip()))
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


def readme_dry_runs() -> list[tuple[str, list[str]]]:
    """launch_scripts/README.md's example dry runs: each `$ command` with the lines the README shows after it."""
    with open(os.path.join(REPO, "launch_scripts", "README.md")) as fh:
        block = fh.read().split("## Example dry runs", 1)[1].split("```\n", 2)[1]
    runs = []
    for entry in block.strip().split("\n\n"):
        command, *shown = entry.splitlines()
        assert command.startswith("$ "), entry
        runs.append((command[2:], shown))
    return runs


def test_launch_readme_dry_runs_print_what_it_shows(tmp_path):
    """Each example as written, in the environment the README states; off Slurm (no scontrol on PATH: the
    Slurm examples name their hosts with SLURM_HOSTS). The README's checkout (/work/main) and demo folder
    (/tmp/demo) are this checkout and a temporary folder."""
    runs = readme_dry_runs()
    assert len(runs) == 6
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    (demo / "data" / "tok.model").write_text("dummy")
    (demo / "hostfile").write_text("node01 slots=4\nnode02 slots=4\n")
    bin_dir = tmp_path / "bin"  # python only: no scontrol, srun or launcher
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGATRON_ESLM_", "NCCL_", "GLOO_"))
            and k not in {"NUM_GPUS", "GPUS_PER_NODE", "CPUS_PER_NODE", "SAVE_DIR", "DS_CONFIG", "HOSTFILE",
                          "NUM_NODES", "MASTER_ADDR", "MASTER_PORT"}}
    env = {**keep, "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "PYTHON": sys.executable,
           "DATA_PATH": "/data/corpus_text_document", "TOKENIZER_MODEL": f"{demo}/data/tok.model"}
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[01-02]",
             "SLURM_HOSTS": "gpu-node-01 gpu-node-02", "SLURM_CPUS_ON_NODE": "32", "GPUS_PER_NODE": "4"}
    for command, shown in runs:
        command = command.replace("/tmp/demo", str(demo))
        proc = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**env, **(slurm if ".sbatch" in command else {})})
        printed = [line for line in proc.stderr.splitlines() if line.startswith(("dry run:", "error:"))]
        printed += proc.stdout.splitlines()
        expected = [line.replace("/work/main", REPO).replace("/tmp/demo", str(demo)) for line in shown]
        assert printed == expected, f"{command}\n{proc.stderr}"
        assert proc.returncode == (2 if expected[0].startswith("error:") else 0), command
    assert not os.path.exists(os.path.join(REPO, "runs", "gpt2_1.3b", "hostfile-4242")), "a dry run writes nothing"


# a launch script as the docs run it: `launch_scripts/X.sh examples/R [pretrain flags]` (or `sbatch ...`)
LAUNCH = re.compile(r"launch_scripts/(\w+\.(?:sh|sbatch))(?: (examples/[\w.]+))?([^`\n]*)")


def test_documented_launch_script_commands_name_real_scripts_recipes_and_flags(monkeypatch):
    """Every launch-script command in the docs names a script and a recipe folder that exist, with pretrain
    flags only after it (test_launch_scripts.py dry-runs every script with every recipe folder)."""
    monkeypatch.chdir(REPO)
    found, wrong = 0, []
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as fh:
            text = re.sub(r"\\\n\s*", " ", fh.read())
        for script, recipe, rest in LAUNCH.findall(text):
            found += 1
            wrong += [f"{doc}: launch_scripts/{script} is missing"] * (not os.path.isfile(f"launch_scripts/{script}"))
            wrong += [f"{doc}: {recipe} is missing"] * bool(recipe and not os.path.isfile(f"{recipe}/pretrain.json"))
            flags = set(FLAG.findall(rest.split(" # ")[0]))
            pretrain = set(FLAG.findall(help_text(PRETRAIN))) if flags else set()
            wrong += [f"{doc}: launch_scripts/{script} {flag}" for flag in sorted(flags - pretrain)]
    assert found >= 20
    assert not wrong, "\n".join(wrong)
