"""The LM head across a step's micro-batches: the weight gradient accumulated in place, memory that does
not grow with the micro-batch count, the weight cast once per step, and no host syncs but the inherent one.

Memory and syncs are counted with TorchDispatchModes on CPU: op outputs whose storage is alive (peak bytes
above what existed before), and `megatron_eslm.host_syncs`'s count of what would make a GPU run wait.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_eslm.host_syncs import INHERENT, HostSyncCounter
from megatron_eslm.kernels import lm_head_triton
from megatron_eslm.model.lm_head import IMPLEMENTATIONS, Selection, selective_lm_head_loss, weight_cast_cache

aten = torch.ops.aten
N, V, H = 16, 128, 64  # the [V, H] weight gradient (32 KiB in float32) dominates every other buffer
IGNORE = -100
IMPLS = ["torch", "triton"] if lm_head_triton.is_available() else ["torch"]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of op outputs alive at once, counting each fresh storage once until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size and ptr not in inputs and ptr not in self._tracked:
                self._tracked.add(ptr)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, size)  # storages keep their Python object alive
        return out

    def _free(self, ptr: int, size: int) -> None:
        self.live -= size
        self._tracked.discard(ptr)


def micro_batch(seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.randperm(N, generator=gen)[:5]] = IGNORE
    return hidden.requires_grad_(), labels


def make_weight(dtype: torch.dtype = torch.float64) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(V, H, generator=torch.Generator().manual_seed(99), dtype=dtype) * 0.3)


def keep_half(scores) -> Selection:
    """Keeps the valid tokens with above-median loss; the normalizer stays a 0-dim tensor (no host read)."""
    kept = scores.valid & (scores.loss >= scores.loss.median())
    return Selection(kept=kept, normalizer=kept.sum())


def backward_micro_batch(weight, seed: int, micro_batches: int, select, impl: str, accumulate_into_grad: bool,
                         tied: bool = False) -> None:
    """forward+backward of one micro-batch, its loss scaled by 1 / micro_batches as the training step does;
    ``tied`` also looks the weight up as an embedding, so autograd accumulates into the same .grad. Its
    tensors die on return, as the step's do."""
    hidden, labels = micro_batch(seed, weight.dtype)
    if tied:
        hidden = hidden + torch.nn.functional.embedding(labels.clamp(min=0), weight)
    out = selective_lm_head_loss(hidden, weight, labels, select, IGNORE, impl=impl,
                                 accumulate_into_grad=accumulate_into_grad)
    (out.loss / micro_batches).backward()


def run_step(weight, micro_batches: int, select, impl: str, accumulate_into_grad: bool, tied: bool = False):
    for seed in range(micro_batches):
        backward_micro_batch(weight, seed, micro_batches, select, impl, accumulate_into_grad, tied)
    return weight.grad


@pytest.fixture(autouse=True)
def with_triton(monkeypatch):
    if lm_head_triton.is_available():
        monkeypatch.setitem(IMPLEMENTATIONS, "triton", lm_head_triton)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("select", [None, keep_half], ids=["dense", "selective"])
def test_in_place_accumulation_equals_autograd_accumulation(impl, select):
    grads = []
    for in_place in (False, True):
        weight = make_weight()
        grad = run_step(weight, 3, select, impl, in_place, tied=True)
        assert grad.dtype == weight.dtype
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_in_place_gradient_is_float32_for_bf16_hidden():
    weight = make_weight(torch.float32)
    hidden, labels = micro_batch(0, torch.float32)
    out = selective_lm_head_loss(hidden.detach().bfloat16().requires_grad_(), weight, labels, keep_half, IGNORE,
                                 accumulate_into_grad=True)
    out.loss.backward()
    assert weight.grad.dtype == torch.float32 and weight.grad.any()


def test_non_leaf_weight_falls_back_to_autograd():
    """A weight that is not a leaf has no .grad to accumulate into: its gradient flows through autograd."""
    leaf = make_weight()
    hidden, labels = micro_batch(0)
    selective_lm_head_loss(hidden, leaf * 2.0, labels, keep_half, IGNORE, accumulate_into_grad=True).loss.backward()
    reference = make_weight()
    selective_lm_head_loss(hidden, reference * 2.0, labels, keep_half, IGNORE).loss.backward()
    torch.testing.assert_close(leaf.grad, reference.grad)


def peak_bytes(micro_batches: int, select, impl: str, accumulate_into_grad: bool) -> int:
    """Peak bytes the head allocates over the micro-batches, with the .grad accumulator already there (as
    from the second micro-batch on, or kept across steps), so only the head's own buffers count."""
    weight = make_weight(torch.float32)
    weight.grad = torch.zeros_like(weight)
    with LiveBytes() as counter:
        for seed in range(micro_batches):
            backward_micro_batch(weight, seed, micro_batches, select, impl, accumulate_into_grad)
            if impl == "triton":  # triton's interpreter holds a launch's arguments in a reference cycle
                gc.collect()  # (a recursive closure in GridExecutor), freed at the next collection only
    return counter.peak


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("select", [None, keep_half], ids=["dense", "selective"])
def test_peak_memory_does_not_grow_with_micro_batches(impl, select):
    weight_bytes = V * H * 4
    in_place = [peak_bytes(k, select, impl, True) for k in (1, 4)]
    assert abs(in_place[1] - in_place[0]) < weight_bytes / 20, in_place
    returned = peak_bytes(4, select, impl, False)
    if select is None:
        # The fused dense pass (either implementation) computes the weight gradient in its forward, before the incoming gradient
        # that scales it is known: that one buffer, scaled in place, is added to .grad either way.
        assert in_place[1] <= returned < 2 * weight_bytes, (returned, in_place)
    else:
        # Kept-row backward: no [V, H] buffer at all, where autograd's accumulation needs one per micro-batch.
        assert in_place[1] < weight_bytes <= returned, (returned, in_place)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("select", [None, keep_half], ids=["dense", "selective"])
def test_host_syncs(impl, select):
    """Dense training reads nothing on the host (the fused pass, either implementation); a kept-row backward
    reads its row count once."""
    weight = make_weight(torch.float32)
    hidden, labels = micro_batch(0, torch.float32)
    with HostSyncCounter() as syncs:
        out = selective_lm_head_loss(hidden, weight, labels, select, IGNORE, impl=impl, accumulate_into_grad=True)
        out.loss.backward()
    assert syncs.by_kind == ({} if select is None else {INHERENT: 1}), syncs.report()


def count_weight_casts(weight, micro_batches: int, impl: str) -> int:
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten._to_copy.default and args[0].untyped_storage().data_ptr() == weight.data_ptr():
                casts.append(kwargs.get("dtype"))
            return func(*args, **(kwargs or {}))

    with Casts():
        for seed in range(micro_batches):
            hidden, labels = micro_batch(seed, torch.float32)
            out = selective_lm_head_loss(hidden.detach().bfloat16().requires_grad_(), weight, labels, keep_half,
                                         IGNORE, impl=impl, accumulate_into_grad=True)
            out.loss.backward()
    return len(casts)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_weight_cast_once_per_step(impl):
    weight = make_weight(torch.float32)
    assert count_weight_casts(weight, 3, impl) == 3  # once per micro-batch: the backward reuses the forward's
    with weight_cast_cache():
        assert count_weight_casts(weight, 3, impl) == 1
        with torch.no_grad():
            weight.add_(0.5)  # an in-place update bumps the version: the copy is made afresh
        assert count_weight_casts(weight, 1, impl) == 1
    assert count_weight_casts(weight, 1, impl) == 1


def test_cached_cast_tracks_the_weight():
    """Inside the cache the loss is the uncached loss, also after the weight changes in place."""
    weight = make_weight(torch.float32)
    hidden, labels = micro_batch(0, torch.float32)
    hidden = hidden.detach().bfloat16()

    def loss() -> torch.Tensor:
        with torch.no_grad():
            return selective_lm_head_loss(hidden, weight, labels, None, IGNORE).loss

    with weight_cast_cache():
        first = loss()
        with torch.no_grad():
            weight.mul_(2.0)
        second = loss()
    assert torch.equal(first, selective_lm_head_loss(hidden, weight.detach() / 2, labels, None, IGNORE).loss)
    assert torch.equal(second, loss())


@pytest.mark.parametrize("select", [None, "nothing"])
def test_zero_tensor_normalizer_gives_zero_loss_and_grads(select):
    weight = make_weight(torch.float32)
    hidden, labels = micro_batch(0, torch.float32)
    nothing = lambda scores: Selection(kept=torch.zeros_like(scores.valid), normalizer=torch.tensor(0))  # noqa: E731
    out = selective_lm_head_loss(hidden, weight, torch.full_like(labels, IGNORE) if select is None else labels,
                                 None if select is None else nothing, IGNORE, accumulate_into_grad=True)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()
