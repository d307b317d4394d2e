"""The recipes under examples/ and the launch scripts under launch_scripts/: CPU only, nothing is launched
(DRY_RUN=1 prints the command a script would run; Slurm's scontrol is faked)."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eslm.config import parse_args, validate_layout
from megatron_eslm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch_scripts"
RECIPES = sorted(p for p in (REPO / "examples").iterdir() if (p / "pretrain.json").exists())
RECIPE_IDS = [p.name for p in RECIPES]
WORLD = 8  # the recipes are sized for one node of 8 GPUs ...
RECIPE_WORLD = {"llama3_8b": 16, "llama3_8b_32k": 16}  # ... but for these, sized for two

# script -> (launcher it runs, environment it needs on top of the common one)
SCRIPTS = {
    "deepspeed_single_node.sh": ("deepspeed", {}),
    "torchrun_single_node.sh": ("torchrun", {}),
    "deepspeed_multi_node.sh": ("deepspeed", {"GPUS_PER_NODE": "4"}),  # + HOSTFILE (2 hosts) below
    "slurm_deepspeed.sbatch": ("deepspeed", {"GPUS_PER_NODE": "4"}),
    "slurm_torchrun.sbatch": ("torchrun", {"GPUS_PER_NODE": "4"}),
}
SLURM = {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node[01-02]",
         "SLURM_CPUS_ON_NODE": "32"}
NET = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA")


@pytest.fixture
def tokenizer_model(tmp_path):
    path = tmp_path / "tok.model"
    path.write_text("dummy")
    return str(path)


@pytest.fixture
def env(tmp_path, tokenizer_model):
    """A clean environment for the scripts: dry run, data and tokenizer set, a fake scontrol (two
    hosts) first on PATH, a two-host hostfile; no Slurm or launcher variables from the caller."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'node01\\nnode02\\n'\n")
    scontrol.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# host slots=GPUS\nnode01 slots=4\nnode02 slots=4\n")
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MEGATRON_ESLM_", *NET))
            and k not in {"NUM_GPUS", "GPUS_PER_NODE", "CPUS_PER_NODE", "SAVE_DIR", "DS_CONFIG", "HOSTFILE",
                          "NUM_NODES", "MASTER_ADDR", "MASTER_PORT"}}
    keep.update(SLURM, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable,
                DRY_RUN="1", DATA_PATH=str(tmp_path / "corpus_text_document"), TOKENIZER_MODEL=tokenizer_model,
                HOSTFILE=str(hostfile))
    return keep


def run_script(script, env, *args, cwd):
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def dry_run(script, env, recipe, tmp_path, *extra):
    proc = run_script(script, {**env, **gpu_env(script, recipe)}, f"examples/{recipe.name}", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def world(recipe) -> int:
    return RECIPE_WORLD.get(recipe.name, WORLD)


def gpu_env(script, recipe) -> dict:
    """The GPU count of a dry run: the script's default (8 GPUs, or 2 nodes of 4), or 2 nodes of 8 for a
    two-node recipe (only the multi-node scripts launch those)."""
    if recipe.name in RECIPE_WORLD:
        return {"GPUS_PER_NODE": str(RECIPE_WORLD[recipe.name] // 2)}
    return SCRIPTS[script][1]


def load_recipe(recipe, tmp_path):
    cfg = parse_args(["--config", str(recipe / "pretrain.json"), "--data-path", "x",
                      "--tokenizer-model", str(tmp_path / "tok.model"), "--save", str(tmp_path / "ckpt")])
    return cfg, json.loads((recipe / "ds_config.json").read_text())


# ------------------------------------------------------------------------------------------- recipes
def test_recipes_exist():
    assert RECIPE_IDS == ["gpt2_1.3b", "gpt2_124m", "gpt2_350m", "llama3_8b", "llama3_8b_32k", "llama_1b"]
    for recipe in RECIPES:
        assert (recipe / "ds_config.json").is_file() and (recipe / "README.md").is_file()
    assert (REPO / "examples" / "README.md").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_recipe_parses_and_fits_its_gpus(recipe, tmp_path, tokenizer_model):
    cfg, ds = load_recipe(recipe, tmp_path)
    m, t, p = cfg.model, cfg.training, cfg.parallel
    assert m.seq_length == m.max_position_embeddings and m.make_vocab_size_divisible_by == 128
    assert t.bf16
    assert cfg.selection.selection == "eslm" and cfg.selection.eslm_score == "loss"
    assert cfg.selection.eslm_alpha == 0.5 and cfg.selection.lm_head_impl == "auto"
    assert cfg.optimizer.lr_decay_style == "cosine" and cfg.optimizer.clip_grad == 1.0
    assert (cfg.optimizer.weight_decay, cfg.optimizer.adam_beta2) == (0.1, 0.95)
    dp = validate_layout(cfg, world(recipe))
    assert dp == world(recipe) // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                   * p.context_parallel_size)

    assert ds["train_batch_size"] == t.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    assert ds["gradient_accumulation_steps"] == t.global_batch_size // (t.micro_batch_size * dp)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp
    assert ds["gradient_clipping"] == cfg.optimizer.clip_grad
    assert ds["bf16"]["enabled"] == t.bf16
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    stage = ds["zero_optimization"]["stage"]
    if p.pipeline_model_parallel_size > 1 or p.sequence_parallel:
        assert stage < 2, "ZeRO-2/3 are refused with pipeline and sequence parallelism"
    if stage == 1:  # our step sums TP/PP-shared gradients before DeepSpeed reduces them: no overlap
        assert ds["zero_optimization"]["overlap_comm"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # our AdamW and LR schedule are passed in
    assert ds["wall_clock_breakdown"] is False


def _knows_deepspeed_flags():
    from megatron_eslm.config import build_parser
    return any("--deepspeed_config" in action.option_strings for action in build_parser()._actions)


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_recipe_ds_config_resolves_on_its_gpus(recipe, tmp_path, tokenizer_model):
    """With --deepspeed --deepspeed_config (as the launch scripts pass them), validate_layout also checks
    the ds_config against the flags at the recipe's GPU count."""
    if not _knows_deepspeed_flags():
        pytest.skip("parse_args has no --deepspeed_config yet")
    cfg = parse_args(["--config", str(recipe / "pretrain.json"), "--data-path", "x", "--tokenizer-model",
                      tokenizer_model, "--save", str(tmp_path / "ckpt"), "--deepspeed",
                      "--deepspeed_config", str(recipe / "ds_config.json")])
    assert cfg.deepspeed.deepspeed and cfg.deepspeed.deepspeed_config == str(recipe / "ds_config.json")
    validate_layout(cfg, world(recipe))
    p = cfg.parallel
    replica = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    for other in (world(recipe) // 2, 2 * world(recipe)):  # the recipes' accumulation is for their count only
        if other % replica == 0:  # (fewer GPUs than one model replica fail on the world size instead)
            with pytest.raises(UserError, match="gradient_accumulation_steps"):
                validate_layout(cfg, other)


@pytest.mark.parametrize("recipe,sizes,batch,layout,stage", [
    ("gpt2_124m", (12, 768, 12), (1024, 512), (1, 1), 1),
    ("gpt2_350m", (24, 1024, 16), (1024, 512), (2, 1), 2),
    ("gpt2_1.3b", (24, 2048, 16), (1024, 512), (2, 2), 1),
    ("llama_1b", (16, 2048, 32), (4096, 256), (1, 1), 1),
    ("llama3_8b", (32, 4096, 32), (8192, 512), (4, 2), 1),
    ("llama3_8b_32k", (32, 4096, 32), (32768, 128), (4, 2), 1),
])
def test_recipe_sizes_and_layouts(recipe, sizes, batch, layout, stage, tmp_path, tokenizer_model):
    """Layers, hidden, heads; sequence length and global batch (sequences); TP x PP; ZeRO stage (and CP 2
    for the 32k recipe only)."""
    cfg, ds = load_recipe(REPO / "examples" / recipe, tmp_path)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == sizes
    assert (cfg.model.seq_length, cfg.training.global_batch_size) == batch
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == layout
    assert ds["zero_optimization"]["stage"] == stage
    assert cfg.parallel.context_parallel_size == (2 if recipe == "llama3_8b_32k" else 1)


@pytest.mark.parametrize("recipe,ffn,groups,rotary_base", [
    ("llama_1b", 8192, 8, 10000),
    ("llama3_8b", 14336, 8, 500000),
    ("llama3_8b_32k", 14336, 8, 500000),
])
def test_llama_recipes_are_llama_shaped(recipe, ffn, groups, rotary_base, tmp_path, tokenizer_model):
    m = load_recipe(REPO / "examples" / recipe, tmp_path)[0].model
    assert (m.ffn_hidden_size, m.num_query_groups, m.rotary_base) == (ffn, groups, rotary_base)
    assert m.swiglu and m.group_query_attention and m.untie_embeddings_and_output_weights and m.disable_bias_linear
    assert (m.position_embedding_type, m.normalization, m.norm_epsilon) == ("rope", "RMSNorm", 1e-5)
    assert m.hidden_dropout == m.attention_dropout == 0.0


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_recipe_pretrain_json_has_no_paths(recipe):
    keys = {k.lstrip("-").replace("-", "_") for k in json.loads((recipe / "pretrain.json").read_text())}
    assert not keys & {"data_path", "tokenizer_model", "save", "load", "tensorboard_dir", "metrics_file"}


def test_ds_configs_pass_deepspeeds_own_checks(monkeypatch):
    """DeepSpeed's config class on each ds_config, at the recipe's data-parallel size (no process group:
    the rank query is patched and the data-parallel size comes from a stub mpu)."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    dp_sizes = {"gpt2_124m": 8, "gpt2_350m": 4, "gpt2_1.3b": 2, "llama_1b": 8, "llama3_8b": 2, "llama3_8b_32k": 1}
    for recipe in RECIPES:
        class Mpu:
            def get_data_parallel_world_size(self, dp=dp_sizes[recipe.name]):
                return dp

        conf = ds_config.DeepSpeedConfig(str(recipe / "ds_config.json"), mpu=Mpu())
        ds = json.loads((recipe / "ds_config.json").read_text())
        assert conf.world_size == dp_sizes[recipe.name]
        assert (conf.train_batch_size, conf.train_micro_batch_size_per_gpu, conf.gradient_accumulation_steps) == (
            ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
        assert conf.zero_optimization_stage == ds["zero_optimization"]["stage"]
        assert conf.bfloat16_config.enabled and conf.gradient_clipping == 1.0


# ------------------------------------------------------------------------------------ launch scripts
@pytest.mark.parametrize("script", sorted(SCRIPTS) + ["common.sh"])
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_is_executable_and_strict(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "common.sh" in text
    assert "set -euo pipefail" in (LAUNCH / "common.sh").read_text()


# every script with every recipe, but the two-node recipes with the multi-node scripts only
DRY_RUNS = [(script, recipe) for recipe in RECIPES for script in sorted(SCRIPTS)
            if recipe.name not in RECIPE_WORLD or "single_node" not in script]


@pytest.mark.parametrize("script,recipe", DRY_RUNS, ids=[f"{s}-{r.name}" for s, r in DRY_RUNS])
def test_dry_run_prints_the_command(script, recipe, env, tmp_path):
    cmd = dry_run(script, env, recipe, tmp_path)
    launcher, _ = SCRIPTS[script]
    assert cmd[0] == ("srun" if script.startswith("slurm") else launcher)
    assert launcher in cmd
    assert "megatron_eslm.pretrain" in cmd
    assert cmd[cmd.index("--config") + 1] == str(recipe / "pretrain.json")
    assert cmd[cmd.index("--deepspeed_config") + 1] == str(recipe / "ds_config.json")
    assert "--deepspeed" in cmd
    assert cmd[cmd.index("--data-path") + 1] == env["DATA_PATH"]
    assert cmd[cmd.index("--tokenizer-model") + 1] == env["TOKENIZER_MODEL"]
    assert cmd[cmd.index("--save") + 1] == cmd[cmd.index("--load") + 1] == f"runs/{recipe.name}"
    assert not (tmp_path / "runs").exists(), "a dry run must not create anything"


def test_dry_run_launcher_flags(env, tmp_path):
    recipe = REPO / "examples" / "gpt2_1.3b"
    cmd = dry_run("deepspeed_single_node.sh", env, recipe, tmp_path)
    assert cmd[:6] == ["deepspeed", "--num_gpus", "8", "--master_port", "29500", "--module"]
    cmd = dry_run("torchrun_single_node.sh", env, recipe, tmp_path)
    assert cmd[:4] == ["torchrun", "--nnodes", "1", "--nproc-per-node"] and "-m" in cmd
    cmd = dry_run("deepspeed_multi_node.sh", {**env, "MASTER_ADDR": "10.0.0.1"}, recipe, tmp_path)
    assert cmd[:3] == ["deepspeed", "--hostfile", env["HOSTFILE"]]
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and "--master_port" in cmd
    cmd = dry_run("slurm_torchrun.sbatch", env, recipe, tmp_path)
    assert cmd[:cmd.index("torchrun")] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "32",
                                           "--cpu-bind=cores", "--kill-on-bad-exit=1"]
    head = cmd[cmd.index("torchrun"):cmd.index("-m")]
    assert head == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "node01:29500", "--rdzv-id", "1"]
    cmd = dry_run("slurm_deepspeed.sbatch", {k: v for k, v in env.items() if k != "HOSTFILE"}, recipe, tmp_path)
    inner = cmd.index("bash")
    assert cmd[inner + 1] == "-c" and "deepspeed --no_ssh --node_rank=\"$SLURM_NODEID\"" in cmd[inner + 2]
    rest = cmd[inner + 4:cmd.index("--module")]
    assert rest == ["--hostfile", "runs/gpt2_1.3b/hostfile-1", "--num_nodes", "2", "--num_gpus", "4",
                    "--master_addr", "node01", "--master_port", "29500"]
    # Slurm signals the job steps 180 s before the time limit, and the ranks save and exit on it
    assert "--exit-signal-handler" in cmd
    for script in ("slurm_torchrun.sbatch", "slurm_deepspeed.sbatch"):
        assert "#SBATCH --signal=TERM@180\n" in open(os.path.join(REPO, "launch_scripts", script)).read()


def test_slurm_deepspeed_expands_the_node_rank_per_node(env, tmp_path):
    """Run the sbatch script for real with a fake srun (two 'nodes') and a fake deepspeed that prints
    its arguments: each node's launcher gets its own --node_rank; the hostfile lists both nodes."""
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 != bash ]]; do shift; done\n'
                                  'for n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    (bin_dir / "deepspeed").write_text('#!/usr/bin/env bash\necho "$@"\n')
    for name in ("srun", "deepspeed"):
        (bin_dir / name).chmod(0o755)
    save = tmp_path / "save"
    run_env = {**env, "DRY_RUN": "0", "GPUS_PER_NODE": "4", "SAVE_DIR": str(save)}
    run_env.pop("HOSTFILE")
    proc = run_script("slurm_deepspeed.sbatch", run_env, "examples/gpt2_124m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["--no_ssh", "--node_rank=0"], ["--no_ssh", "--node_rank=1"]]
    assert (save / "hostfile-1").read_text() == "node01 slots=4\nnode02 slots=4\n"


def test_every_launcher_gets_the_network_interface(env, tmp_path):
    """MEGATRON_ESLM_IFNAME and MEGATRON_ESLM_IB_HCA reach the environment of every launcher (fake ones
    that print it; a fake srun that starts its command), the pdsh launcher's ./.deepspeed_env (keeping its
    other lines), and each script's line naming the master address and the interface."""
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do [[ $1 == *=* ]] && shift || shift 2; '
                                  'done\nSLURM_NODEID=0 exec "$@"\n')
    for name in ("deepspeed", "torchrun"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho {name}; env | grep -E "^({"|".join(NET)})=" | sort\n')
    for name in ("srun", "deepspeed", "torchrun"):
        (bin_dir / name).chmod(0o755)
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\nGLOO_SOCKET_IFNAME=old0\n")
    run_env = {**env, "DRY_RUN": "0", "PYTHON": "no-such-python", "SAVE_DIR": str(tmp_path / "save"),
               "MEGATRON_ESLM_IFNAME": "ib0", "MEGATRON_ESLM_IB_HCA": "mlx5_0,mlx5_1"}
    expected = ["GLOO_SOCKET_IFNAME=ib0", "NCCL_IB_HCA=mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME==ib0"]
    for script, (launcher, extra) in sorted(SCRIPTS.items()):
        proc = run_script(script, {**run_env, **extra}, "examples/gpt2_124m", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [launcher, *expected], (script, proc.stdout)
        line = next(line for line in proc.stderr.splitlines() if line.startswith("launch: master "))
        master = "127.0.0.1" if "single" in script else "node01"
        assert line.startswith(f"launch: master {master}") and line.endswith(
            "port 29500; interface NCCL_SOCKET_IFNAME==ib0 GLOO_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5_0,mlx5_1"), line
    assert (tmp_path / ".deepspeed_env").read_text().splitlines() == [
        "NCCL_DEBUG=WARN", "NCCL_SOCKET_IFNAME==ib0", "GLOO_SOCKET_IFNAME=ib0", "NCCL_IB_HCA=mlx5_0,mlx5_1"]
    proc = run_script("deepspeed_multi_node.sh", {**env, "GPUS_PER_NODE": "4", "MEGATRON_ESLM_IFNAME": "ib0"},
                      cwd=tmp_path)
    assert "dry run: not writing .deepspeed_env (NCCL_SOCKET_IFNAME==ib0 GLOO_SOCKET_IFNAME=ib0)" in proc.stderr
    proc = run_script("torchrun_single_node.sh", env, cwd=tmp_path)
    assert "interface not chosen (NCCL and gloo pick one each; on a cluster set MEGATRON_ESLM_IFNAME)" in proc.stderr


def test_slurm_scripts_stop_by_the_clock(env, tmp_path):
    """Under Slurm, --exit-duration-in-mins is the job's time left (SLURM_TIME_LEFT, else SLURM_JOB_END_TIME,
    else squeue's %L) minus SAVE_MINUTES, printed before the launch; not when the flags set it, and not
    without a known limit."""
    recipe = REPO / "examples" / "gpt2_1.3b"

    def clock(script, *flags, **extra):
        proc = run_script(script, {**env, "GPUS_PER_NODE": "4", **extra}, f"examples/{recipe.name}", *flags,
                          cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        cmd = shlex.split(proc.stdout)
        values = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--exit-duration-in-mins"]
        return values, next((line for line in proc.stderr.splitlines() if "exit-duration" in line or "clock" in line),
                            None)

    for script in ("slurm_torchrun.sbatch", "slurm_deepspeed.sbatch"):
        values, line = clock(script, SLURM_TIME_LEFT="4:00:00", SAVE_MINUTES="15")
        assert values == ["225"] and line == ("launch: --exit-duration-in-mins 225: the job's 240 minutes left "
                                              "(SLURM_TIME_LEFT) minus SAVE_MINUTES=15 for the last save"), line
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "squeue").write_text('#!/bin/sh\n[ "$*" = "-h -j 1 -o %L" ] && echo 1-00:00:00\n')
    (bin_dir / "squeue").chmod(0o755)
    values, line = clock("slurm_torchrun.sbatch")
    assert values == ["1430"] and "1440 minutes left (squeue) minus SAVE_MINUTES=10" in line, line
    values, _ = clock("slurm_torchrun.sbatch", SLURM_JOB_END_TIME=str(int(time.time()) + 3630))
    assert values == ["50"]
    values, line = clock("slurm_torchrun.sbatch", "--exit-duration-in-mins", "60")
    assert values == ["60"] and "not derived" in line
    (bin_dir / "squeue").write_text("#!/bin/sh\necho UNLIMITED\n")
    values, line = clock("slurm_torchrun.sbatch")
    assert values == [] and "stopping on the signal only" in line, line
    proc = run_script("slurm_torchrun.sbatch", {**env, "GPUS_PER_NODE": "4", "SLURM_TIME_LEFT": "8:00"}, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == ("error: the job has 8 minutes left (SLURM_TIME_LEFT), not more "
                                                    "than SAVE_MINUTES=10 for the last save\n")


@pytest.mark.parametrize("name,value", [("MEGATRON_ESLM_IFNAME", "ib0 eth0"), ("MEGATRON_ESLM_IB_HCA", "mlx5_0;x"),
                                        ("SLURM_CPUS_ON_NODE", "0"), ("SLURM_TIME_LEFT", "4h"),
                                        ("SAVE_MINUTES", "ten")])
def test_bad_network_cpu_or_clock_variable_is_one_line(name, value, env, tmp_path):
    proc = run_script("slurm_torchrun.sbatch", {**env, "GPUS_PER_NODE": "4", name: value}, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"'{value}'" in lines[0], lines


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("missing", ["DATA_PATH", "TOKENIZER_MODEL"])
def test_missing_required_env_is_one_line(script, missing, env, tmp_path):
    run_env = {**env, **SCRIPTS[script][1]}
    run_env.pop(missing)
    proc = run_script(script, run_env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {missing} is not set ("), proc.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("lacking", ["pretrain.json", "ds_config.json"])
def test_recipe_folder_lacking_a_file_is_one_line(script, lacking, env, tmp_path):
    recipe = tmp_path / "broken"
    shutil.copytree(REPO / "examples" / "gpt2_124m", recipe)
    (recipe / lacking).unlink()
    proc = run_script(script, {**env, **SCRIPTS[script][1]}, str(recipe), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: recipe folder {recipe} has no {lacking}"]


def test_unknown_recipe_folder(env, tmp_path):
    proc = run_script("deepspeed_single_node.sh", env, "examples/nope", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: recipe folder examples/nope not found")


@pytest.mark.parametrize("recipe,message", [("llama3_8b", "gradient_accumulation_steps"),
                                            ("llama3_8b_32k", "world size 8 is not divisible by")])
def test_two_node_recipe_on_one_node_is_one_line(recipe, message, env, tmp_path):
    """One node holds a replica of the 8B recipe (but not its accumulation), not one of the 32k recipe."""
    proc = run_script("deepspeed_single_node.sh", env, f"examples/{recipe}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_ds_config_must_fit_the_world_size(env, tmp_path):
    """The recipes are for 8 GPUs: on 16 the ds_config's accumulation is wrong, caught before launch by
    the checks every rank would run (parse_args + validate_layout at the launch's world size)."""
    proc = run_script("slurm_torchrun.sbatch", {**env, "GPUS_PER_NODE": "8"}, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gradient_accumulation_steps" in lines[0], lines
    proc = run_script("deepspeed_single_node.sh", {**env, "NUM_GPUS": "6"}, "examples/gpt2_1.3b", cwd=tmp_path)
    assert proc.returncode == 2 and "world size 6" in proc.stderr
    proc = run_script("deepspeed_single_node.sh", {**env, "NUM_GPUS": "4"}, "examples/gpt2_1.3b", cwd=tmp_path)
    assert proc.returncode == 2 and "gradient_accumulation_steps" in proc.stderr


def test_bad_pass_through_flag_is_caught_before_launch(env, tmp_path):
    proc = run_script("torchrun_single_node.sh", env, "examples/gpt2_350m", "--eslm-alpha", "1.5", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: --eslm-alpha must be in [0, 1), got 1.5"]


def test_ds_config_zero2_with_pipeline_is_refused(env, tmp_path):
    recipe = tmp_path / "pp_zero2"
    shutil.copytree(REPO / "examples" / "gpt2_1.3b", recipe)
    ds = json.loads((recipe / "ds_config.json").read_text())
    ds["zero_optimization"]["stage"] = 2
    (recipe / "ds_config.json").write_text(json.dumps(ds))
    proc = run_script("deepspeed_single_node.sh", env, str(recipe), cwd=tmp_path)
    assert proc.returncode == 2 and "ZeRO stage 2" in proc.stderr and "pipeline" in proc.stderr


def test_pass_through_flags_and_default_recipe(env, tmp_path):
    proc = run_script("deepspeed_single_node.sh", env, "--train-iters", "1000", "--eslm-alpha", "0.3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[cmd.index("--config") + 1] == str(REPO / "examples" / "gpt2_124m" / "pretrain.json")
    assert cmd[-4:] == ["--train-iters", "1000", "--eslm-alpha", "0.3"]
    # a pass-through flag that changes the layout is seen by the ds_config check
    proc = run_script("deepspeed_single_node.sh", env, "--tensor-model-parallel-size", "2", cwd=tmp_path)
    assert proc.returncode == 2 and "gradient_accumulation_steps" in proc.stderr


def test_data_path_blend_is_split_into_words(env, tmp_path):
    cmd = dry_run("deepspeed_single_node.sh", {**env, "DATA_PATH": "0.7 /d/a 0.3 /d/b"},
                  REPO / "examples" / "gpt2_124m", tmp_path)
    at = cmd.index("--data-path")
    assert cmd[at + 1:at + 5] == ["0.7", "/d/a", "0.3", "/d/b"]


def test_dry_run_arguments_parse_as_pretrain_flags(env, tmp_path):
    """What deepspeed_single_node.sh hands to megatron_eslm.pretrain parses with parse_args (the
    --deepspeed flags are left out while parse_args does not know them yet)."""
    cmd = dry_run("deepspeed_single_node.sh", env, REPO / "examples" / "gpt2_350m", tmp_path)
    argv = cmd[cmd.index("megatron_eslm.pretrain") + 1:]
    try:
        cfg = parse_args(argv)
    except UserError as err:
        if "deepspeed" not in str(err):
            raise
        at = argv.index("--deepspeed_config")
        argv = argv[:at] + argv[at + 2:]
        argv.remove("--deepspeed")
        cfg = parse_args(argv)
    assert cfg.data.data_path == [env["DATA_PATH"]]
    assert cfg.checkpoint.save == cfg.checkpoint.load == "runs/gpt2_350m"
    assert cfg.logging.tensorboard_dir == "runs/gpt2_350m/tensorboard"
    assert cfg.model.num_layers == 24 and validate_layout(cfg, WORLD) == 4
