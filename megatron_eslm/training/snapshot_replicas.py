"""Snapshots that outlive a node: each vetted snapshot (`rollback.py`) mirrored to the rank one node ahead
(--snapshot-replicas 1), and written as a checkpoint by the survivors when ranks die.

A snapshot is exactly what the rank's checkpoint file would hold (`checkpointing.full_state`: model, AdamW
state, selection state, data position, every data-parallel replica's RNG states), plus the name of its
shard directory. When the watchdog (`distributed/watchdog.py`) finds dead or stopped ranks, each shard of
the layout is written under --save by one survivor (`writer`): the first living one, in an order every
survivor computes alike, among the ranks holding it (data- and context-parallel replicas hold the same
model and optimizer state, and a mirror its peer's). One writer per shard, not every holder: at a thousand
ranks each shard would otherwise be written 2 x DP x CP times. A shard is lost only when every rank
holding it (its replicas and their peers) died.

Which iteration. A rank may die in the middle of the exchange at a vetting (snapshots every N iterations):
the ranks that completed it then hold the new snapshot S of their own shard and of their peer's, while the
peer of the dead rank holds only S - N of the dead rank's shard; the directory of S can never be complete.
No agreement is needed (the store lives on rank 0's host, which may be the one gone): every rank keeps the
previous vetted snapshot besides the vetted one (`rollback.Recovery.kept`), and the receiver the peer's
previous one until the next exchange starts overwriting it (`Mirror.held`), so every survivor holds S - N
of each shard it holds, and S of those whose exchange completed. Each writer writes every iteration at
which it holds all of the shards it writes and that is newer than --save's checkpoint (S and S - N at most)
into iter_<that>.emergency/, one file per shard through a temporary name and a rename. The writer that
finds a directory complete claims it (renames it to a name of its own: one publisher, even when two
writers finish together), writes its manifest and publishes it (rename, tracker). Two writers may publish
S - N and S at once: each then re-reads the tracker after writing it and points it at the newest published
one, so the last write names S (`_track_newest`). `--load` resumes from the newest snapshot every shard of
which survived: a lost node costs the iterations since the last vetted snapshot (or the one before), not
since the last disk checkpoint. A writer that holds nothing newer than --save's checkpoint writes nothing:
that checkpoint is as recent, and the resume from it as exact. Its line names the newest iteration at
which it holds all of its shards, which is what the drill checks (`tools/fault_drill.py`).

The mirror is a point-to-point exchange on the host's gloo group at each vetting, ring-wise: even nodes
send first, odd ones receive first. Only a small header is pickled (the state's structure with each tensor
replaced by its dtype and shape, and the non-tensor values); the tensors go as they are, one `dist.send`
each, straight from the snapshot's CPU buffers (pinned on a GPU), into exact-size buffers on the receiver,
reused from exchange to exchange: no pickled copy of the state, nothing allocated once the sizes are known.
The receiver keeps two sets of buffers: the peer's last snapshot, and the previous one, which the next
exchange overwrites (a peer dying mid-transfer leaves the last one whole). Not one flat buffer per copy:
torch.save refuses tensors of different dtypes viewing one storage, so the emergency write would need a
copy. It blocks training for its transfer (a copy of the rank's state over the network per vetted
snapshot: choose --snapshot-interval accordingly).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from megatron_eslm import parallel_state
from megatron_eslm.checkpoint import integrity
from megatron_eslm.distributed import launch
from megatron_eslm.errors import UserError
from megatron_eslm.training import checkpointing

SUFFIX = ".emergency"  # iter_S.emergency: written by the survivors, renamed once complete


def ranks_per_node() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's launcher's LOCAL_SIZE; one node for the
    whole job without either)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or launch.world_size())


def check_peers(replicas: int) -> None:
    """--snapshot-replicas needs a rank on another node to mirror to."""
    if replicas and launch.world_size() <= ranks_per_node():
        raise UserError(f"--snapshot-replicas {replicas}: every rank is on one node (LOCAL_WORLD_SIZE or "
                        f"LOCAL_SIZE {ranks_per_node()} of {launch.world_size()} ranks): there is no other node "
                        "to mirror to")


def peer_behind(rank: int) -> int:
    """The rank one node behind `rank`, whose snapshot `rank` mirrors."""
    return (rank - ranks_per_node()) % launch.world_size()


def writer(owner: int, dead: set[int], mirrored: bool) -> int | None:
    """The one rank that writes the snapshot shard of rank `owner` when ranks `dead` died: the first living
    rank among those holding that shard, in an order every survivor computes alike: the ranks of the
    shard's (tensor rank, stage) ascending, then (`mirrored`) their mirrors one node ahead. None when every
    holder died."""
    layout, world, per_node = parallel_state.layout(), launch.world_size(), ranks_per_node()

    def shard(rank: int) -> tuple[int, int]:
        return rank % layout.tp, rank // (layout.tp * layout.cp * layout.dp)

    owners = [rank for rank in range(world) if shard(rank) == shard(owner)]
    holders = owners + ([(rank + per_node) % world for rank in owners] if mirrored else [])
    return next((rank for rank in holders if rank not in dead), None)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor's place in a pickled header: what the receiver allocates; the bytes follow on their own."""
    dtype: torch.dtype
    shape: tuple[int, ...]


def encode(state: dict) -> tuple[bytes, list[torch.Tensor]]:
    """`state` as a pickled header holding no tensor (each replaced by a `TensorSlot`) and its tensors, in
    the header's order, contiguous and on the CPU."""
    leaves, spec = pytree.tree_flatten(state)
    tensors = [leaf.detach().cpu().contiguous() for leaf in leaves if isinstance(leaf, torch.Tensor)]
    skeleton = [TensorSlot(leaf.dtype, tuple(leaf.shape)) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in leaves]
    return pickle.dumps(pytree.tree_unflatten(skeleton, spec)), tensors


class Mirror:
    """The vetted snapshot of the rank one node behind (`state`), received at each vetting into one of two
    sets of exact-size CPU buffers, reused from exchange to exchange: the other set holds the previous one
    (`previous`) until the next exchange starts receiving into it."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.previous: dict | None = None
        self._buffers: list[list[torch.Tensor]] = [[], []]
        self._incoming = 0  # the set the next snapshot goes into

    def _receive_buffers(self, slots: list[TensorSlot]) -> list[torch.Tensor]:
        """The incoming set, reallocated only where the header's dtypes or shapes changed."""
        old = self._buffers[self._incoming]
        fresh = [old[i] if i < len(old) and old[i].dtype == slot.dtype and tuple(old[i].shape) == slot.shape
                 else torch.empty(slot.shape, dtype=slot.dtype) for i, slot in enumerate(slots)]
        self._buffers[self._incoming] = fresh
        return fresh

    def held(self) -> list[dict]:
        """The peer's snapshots held whole, newest first (the emergency write's: `write_emergency_checkpoint`)."""
        return [state for state in (self.state, self.previous) if state is not None]

    def exchange(self, state: dict) -> None:
        """Send `state` to the rank one node ahead, and receive the state of the rank one node behind."""
        rank, world, per_node = dist.get_rank(), dist.get_world_size(), ranks_per_node()
        to, source, group = (rank + per_node) % world, peer_behind(rank), launch.host_group()
        header, tensors = encode(state)

        def send() -> None:
            dist.send(torch.tensor([len(header)], dtype=torch.int64), dst=to, group=group)
            dist.send(torch.frombuffer(bytearray(header), dtype=torch.uint8), dst=to, group=group)
            for tensor in tensors:
                if tensor.numel():
                    dist.send(tensor, dst=to, group=group)

        def receive() -> dict:
            size = torch.empty(1, dtype=torch.int64)
            dist.recv(size, src=source, group=group)
            raw = torch.empty(int(size), dtype=torch.uint8)
            dist.recv(raw, src=source, group=group)
            leaves, spec = pytree.tree_flatten(pickle.loads(raw.numpy().tobytes()),
                                               is_leaf=lambda leaf: isinstance(leaf, TensorSlot))
            self.previous = None  # its buffers are the incoming set, overwritten from here on
            buffers = iter(self._receive_buffers([leaf for leaf in leaves if isinstance(leaf, TensorSlot)]))
            filled = []
            for leaf in leaves:
                if isinstance(leaf, TensorSlot):
                    leaf = next(buffers)
                    if leaf.numel():
                        dist.recv(leaf, src=source, group=group)
                filled.append(leaf)
            return pytree.tree_unflatten(filled, spec)

        if (rank // per_node) % 2 == 0:
            send()
            received = receive()
        else:
            received = receive()
            send()
        self.state, self.previous, self._incoming = received, self.state, 1 - self._incoming


def write_emergency_checkpoint(root: str, held: dict[int, list[dict]], dead: set[int], mirrored: bool) -> str:
    """Of the snapshots this rank holds (`held`: by the rank they are of, each list newest first, each
    snapshot with its "iteration" and "shard"; `mirrored` under --snapshot-replicas), write those of the
    shards it is the one `writer` of, at every iteration at which it holds all of them and that is newer
    than `root`'s checkpoint, into iter_<that>.emergency under `root`; publish the newest it finds complete.
    Returns what happened, for the rank's line (module docstring: which iteration)."""
    mine: dict[str, dict[int, dict]] = {}  # shard -> iteration -> state; own and peer's may be one shard
    for owner, states in held.items():
        if writer(owner, dead, mirrored) == launch.rank():
            for state in states:
                mine.setdefault(state["shard"], {})[state["iteration"]] = state
    if not mine:
        return "the snapshot shards it holds are written by other survivors"
    common = set.intersection(*(set(states) for states in mine.values()))
    if not common:
        return f"snapshots not written: no iteration at which it holds all of its shards ({sorted(mine)})"
    try:
        latest = checkpointing.latest_iteration(root)
    except UserError:
        latest = None
    due = sorted((iteration for iteration in common if latest is None or iteration > latest), reverse=True)
    if not due:
        return f"snapshot of iteration {max(common)} not written: {root} holds iteration {latest}"
    for iteration in due:  # the newest first: it is the one to complete soonest
        for shard, states in mine.items():
            directory = os.path.join(checkpointing.iteration_dir(root, iteration) + SUFFIX, shard)
            os.makedirs(directory, exist_ok=True)
            part = launch.temp_path(os.path.join(directory, checkpointing.FILENAME))
            integrity.save_file({key: value for key, value in states[iteration].items() if key != "shard"}, part)
            os.replace(part, os.path.join(directory, checkpointing.FILENAME))
    sizes = next(iter(mine.values()))[due[0]]["layout"]
    tp, pp = sizes["tensor_model_parallel_size"], sizes["pipeline_model_parallel_size"]
    expected = [os.path.join(checkpointing.shard_dir_name(t, p, pp), checkpointing.FILENAME)
                for p in range(pp) for t in range(tp)]
    for iteration in due:
        final = checkpointing.iteration_dir(root, iteration)
        tmp = final + SUFFIX
        if not all(os.path.exists(os.path.join(tmp, name)) for name in expected):
            continue
        claimed = launch.temp_path(tmp)
        try:
            os.rename(tmp, claimed)  # one publisher: of the writers that found it complete, the first
        except OSError:
            return f"snapshot of iteration {iteration} complete, published by another survivor"
        integrity.write_manifest(claimed, {name: integrity.checksum_file(os.path.join(claimed, name))
                                           for name in expected})
        checkpointing.publish(root, claimed, final, iteration)
        _track_newest(root, due)
        return f"snapshot of iteration {iteration} saved as {final}"
    older = f" (and of {', '.join(map(str, due[1:]))} beside it)" if len(due) > 1 else ""
    return (f"snapshot of iteration {due[0]} written to {checkpointing.iteration_dir(root, due[0])}{SUFFIX}{older}, "
            "not complete yet (shards of other ranks)")


def _track_newest(root: str, iterations: list[int]) -> None:
    """Point the tracker at the newest of `iterations` published. Two survivors may publish S - N and S at
    once, and the tracker write that lands last could name the older: each publisher re-reads it after
    writing and writes again while a newer one is published, so the last write of all names the newest."""
    while True:
        newest = max(i for i in iterations if os.path.isdir(checkpointing.iteration_dir(root, i)))
        if checkpointing.latest_iteration(root) >= newest:
            return
        checkpointing.write_tracker(root, newest)
