"""Checkpoint integrity (checkpoint/integrity.py) and --async-save (training/async_save.py): every published
checkpoint lists its files' sizes and CRC-32s; a damaged or partial one is one line naming the file, or with
--ckpt-fallback the newest older one that checks out is loaded; an async save writes the same checkpoint
as a synchronous one, and a resumed run from it equals the uninterrupted run."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import flags, launch_pretrain, run, without_timing
from megatron_eslm.checkpoint import integrity
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.errors import UserError
from megatron_eslm.training import checkpointing
from megatron_eslm.training.checkpointing import TRACKER, iteration_dir, latest_iteration

ITERS = 6
SHARD = os.path.join("mp_rank_00", checkpointing.FILENAME)


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    """A 6-iteration run saved every 2 iterations, and its records."""
    save = str(tmp_path_factory.mktemp("integrity") / "ckpt")
    _, records = run(flags(tiny_corpus, "--save", save, "--save-interval", "2"))
    return save, records


def copy_of(saved_root: str, tmp_path) -> str:
    import shutil
    root = str(tmp_path / "copy")
    shutil.copytree(saved_root, root)
    return root


def resume(corpus, root, *extra):
    return run(flags(corpus, "--load", root, *extra))


@pytest.mark.slow
def test_manifest_lists_every_file_with_size_and_crc(saved):
    save, _ = saved
    for iteration in (2, 4, 6):
        directory = iteration_dir(save, iteration)
        manifest = integrity.read_manifest(directory)
        assert list(manifest) == [SHARD] == integrity.files_under(directory)
        assert manifest[SHARD] == integrity.checksum_file(os.path.join(directory, SHARD))
        assert integrity.verify(directory)
    assert not any(name.endswith((".tmp", ".old")) for name in os.listdir(save))


@pytest.mark.parametrize("damage, message", [
    (lambda path: _flip(path, os.path.getsize(path) // 2), "checksum mismatch"),
    (lambda path: _truncate(path, os.path.getsize(path) - 100), "bytes, the manifest says"),
    (os.remove, "missing, although the checkpoint's manifest lists it"),
], ids=["flipped-byte", "truncated", "missing"])
def test_damaged_checkpoint_is_one_line_naming_the_file(tiny_corpus, saved, tmp_path, damage, message):
    root = copy_of(saved[0], tmp_path)
    path = os.path.join(iteration_dir(root, 6), SHARD)
    damage(path)
    with pytest.raises(UserError, match=message) as err:
        resume(tiny_corpus, root)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=message):  # the offline tools check too
        read_checkpoint(root)


def test_fallback_loads_the_newest_good_checkpoint(tiny_corpus, saved, tmp_path):
    """Iteration 6 damaged, 4 good: --ckpt-fallback resumes from 4, equal to a run resumed from 4."""
    root = copy_of(saved[0], tmp_path)
    _flip(os.path.join(iteration_dir(root, 6), SHARD), 1000)
    lines = []
    _, records = run(flags(tiny_corpus, "--load", root, "--ckpt-fallback"), log=lines.append)
    assert any(line.startswith("--ckpt-fallback: ") and "checksum mismatch" in line and "trying iteration 4" in line
               for line in lines)
    assert [r["iteration"] for r in records] == [5, 6]
    assert without_timing(records) == without_timing(saved[1][4:])


def test_fallback_past_a_damaged_tracker(tiny_corpus, saved, tmp_path):
    root = copy_of(saved[0], tmp_path)
    with open(os.path.join(root, TRACKER), "w") as fh:
        fh.write("garbage")
    with pytest.raises(UserError, match="expected an iteration number"):
        resume(tiny_corpus, root)
    lines = []
    run(flags(tiny_corpus, "--load", root, "--ckpt-fallback", "--train-iters", "8", "--lr-decay-iters", "6"),
        log=lines.append)
    assert any("resumed from" in line and "at iteration 6" in line for line in lines)


def test_checkpoint_without_manifest_loads_unverified(tiny_corpus, saved, tmp_path):
    """Written by an older version or another tool: loaded, and the log says it was not checked."""
    root = copy_of(saved[0], tmp_path)
    os.remove(os.path.join(iteration_dir(root, 6), integrity.MANIFEST))
    lines = []
    run(flags(tiny_corpus, "--load", root, "--train-iters", "7", "--lr-decay-iters", "6"), log=lines.append)
    assert any("no manifest.json" in line and "without checking" in line for line in lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_checkpoint_loads_exactly_or_fails_in_one_line(saved, tmp_path_factory, data):
    """Random byte flips, truncations and appended bytes in the shard file or the manifest: the loader
    either returns exactly the saved state (a flip that changes nothing, e.g. JSON whitespace) or raises
    the one-line UserError; never another exception, never a silently different state."""
    root = copy_of(os.path.join(saved[0]), tmp_path_factory.mktemp("fuzz"))
    directory = iteration_dir(root, 6)
    path = os.path.join(directory, data.draw(st.sampled_from([SHARD, integrity.MANIFEST])))
    size = os.path.getsize(path)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if kind == "flip":
        _flip(path, data.draw(st.integers(0, size - 1)), data.draw(st.integers(1, 255)))
    elif kind == "truncate":
        _truncate(path, data.draw(st.integers(0, size - 1)))
    else:
        with open(path, "ab") as fh:
            fh.write(data.draw(st.binary(min_size=1, max_size=64)))
    try:
        state = checkpointing.load_checkpoint(root, log=lambda line: None)
    except UserError as err:
        assert "\n" not in str(err)
        return
    expected = torch.load(os.path.join(iteration_dir(saved[0], 6), SHARD), weights_only=False)
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name


@pytest.mark.slow
def test_async_save_writes_what_a_synchronous_save_writes(tiny_corpus, saved, tmp_path):
    """Same checkpoints (every tensor equal), manifests that check out, and resuming from the async run's
    iteration 4 equals the uninterrupted run."""
    save = str(tmp_path / "async")
    lines = []
    _, records = run(flags(tiny_corpus, "--save", save, "--save-interval", "2", "--async-save"), log=lines.append)
    assert without_timing(records) == without_timing(saved[1])
    assert sum("(written in the background)" in line for line in lines) == 3
    for iteration in (2, 4, 6):
        assert integrity.verify(iteration_dir(save, iteration))
        a, b = (torch.load(os.path.join(iteration_dir(root, iteration), SHARD), weights_only=False)
                for root in (save, saved[0]))
        for key in ("model",):
            assert all(torch.equal(a[key][name], b[key][name]) for name in b[key])
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    with open(os.path.join(save, TRACKER), "w") as fh:
        fh.write("4\n")
    _, rest = resume(tiny_corpus, save)
    assert without_timing(rest) == without_timing(saved[1][4:])


@pytest.mark.slow
def test_async_save_on_two_ranks(tiny_corpus, tmp_path):
    """DP2: both ranks' writes finish before the publish (the tracker names the last iteration, the
    manifest the one shard), and the records equal the synchronous run's."""
    sync_root, async_root = str(tmp_path / "sync"), str(tmp_path / "async")
    common = ("--train-iters", "4", "--save-interval", "2")
    sync = launch_pretrain(tiny_corpus, str(tmp_path), 2, (1, 1), "gpt2", *common, "--save", sync_root)
    asynchronous = launch_pretrain(tiny_corpus, str(tmp_path), 2, (1, 1), "gpt2", *common, "--save", async_root,
                                   "--async-save")
    assert without_timing(sync) == without_timing(asynchronous)
    assert latest_iteration(async_root) == 4 and integrity.verify(iteration_dir(async_root, 4))
    assert json.load(open(os.path.join(iteration_dir(async_root, 4), integrity.MANIFEST)))["files"].keys() == {SHARD}


def test_async_save_needs_save_and_no_deepspeed(tiny_corpus):
    from megatron_eslm.config import parse_args
    with pytest.raises(UserError, match="--async-save needs --save"):
        parse_args(flags(tiny_corpus, "--async-save"))
    with pytest.raises(UserError, match="--async-save is not available under --deepspeed"):
        parse_args(flags(tiny_corpus, "--async-save", "--save", "x", "--deepspeed"))
    with pytest.raises(UserError, match="--ckpt-fallback needs --load"):
        parse_args(flags(tiny_corpus, "--ckpt-fallback"))


def _flip(path: str, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ mask]))


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def test_device_rng_state_is_this_devices_and_eight_saved_states_load_on_one(monkeypatch):
    """A checkpoint keeps the CUDA generator of the rank's own device only; an older one holding every
    device's (8, `get_rng_state_all`) loads on a node with fewer devices: this device's entry, else the
    first, never an IndexError. (CUDA faked here; on a GPU: tests/test_nccl_readiness.py, nccl_faults in
    tools/device_check.sh.)"""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    device, restored = [0], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device_="cuda": states[device[0]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device_="cuda": restored.append(state))
    device[0] = 5
    saved = checkpointing.rng_state()
    assert saved["cuda"] is states[5]
    checkpointing.set_rng_state(saved)
    older = {**saved, "cuda": states}
    for device[0] in (0, 3):
        checkpointing.set_rng_state(older)
    checkpointing.set_rng_state({**saved, "cuda": states[:2]})  # device 3, two saved: the first
    assert [int(state[0]) for state in restored] == [5, 0, 3, 0]
