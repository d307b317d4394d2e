"""--overlap-grad-reduce: the data-parallel SUM (over the data x context ranks) of each gradient bucket is
launched from the backward of the step's last micro-batch, as soon as every gradient in the bucket is
final, so that it runs under the rest of the backward (Megatron's overlap_grad_reduce, torch DDP's
reducer); `finish` waits for the sums before the gradient norm and the clipping. The earlier micro-batches
only accumulate.

Buckets are `grads.py`'s: --ddp-bucket-size elements of one dtype in reverse parameter order, so the last
layers' buckets, whose gradients are final first, launch first; they launch strictly in that order (a
bucket ready early waits for the ones before it), so every rank issues the same collectives in the same
order, as NCCL requires, whatever order its hooks fire in. When a gradient is final:

  most parameters        autograd has accumulated it into `.grad`: torch's post-accumulate-grad hook.
  the tied embedding     on a single stage, the input embedding's gradient, accumulated by autograd at the
                         very end of the backward, after the LM head's in-place add: the same hook, then.
  the head's own weight  (the untied output layer; the last pipeline stage's copy of the tied embedding)
                         the LM head adds its gradient into `.grad` in place and hands autograd None
                         (`model/lm_head.py`), so autograd accumulates nothing for it: whether the hook fires
                         depends on the torch version, and on a GPU the engine runs such a gradient-less node
                         on the calling thread, concurrently with the device thread, which could launch the
                         buckets in another order on another rank (NCCL needs one order). It is final when
                         the gradient of the head's input arrives (`watch_head_input`, on the device thread):
                         the head's backward computes that after its in-place add, and a gradient reaching
                         the weight through autograd as well (eslm-kd's logits) is accumulated first
                         (autograd runs an accumulation node as soon as it is ready, ahead of any other).

At launch the bucket's gradients are copied into one flat buffer and each `.grad` becomes a view of it: the
sums land in `.grad` with no copy back, and the old gradients are freed. A bucket with a parameter that got
no gradient (unused) is launched by `finish` with the gradients that exist, as the after-backward path.

Interleaved pipeline (model chunks): a chunk's gradients are final once its own last micro-batch's
backward is through, which comes before the earlier chunks' (they run backwards in reverse), so each
chunk's parameters are armed by the backward of that chunk's last micro-batch (Megatron launches each
chunk's reduction the same way).

The sequence-parallel and tied-embedding sums (`finalize_model_grads`) run after these: sums commute, so
the result equals the after-backward order up to rounding, and replicas stay bitwise equal (an all-reduce
hands every rank the same result).
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_eslm import parallel_state
from megatron_eslm.distributed import collectives
from megatron_eslm.distributed.grads import split_into_buckets
from megatron_eslm.pipeline_parallel.schedules import ForwardStep

if TYPE_CHECKING:
    from megatron_eslm.model.gpt import GPTModel


class OverlappedGradReducer:
    """The data-parallel gradient sums of one model, launched from its backward (module docstring)."""

    def __init__(self, model: GPTModel, bucket_elements: int):
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = split_into_buckets(list(reversed(params)), bucket_elements)
        self._bucket_of = {param: index for index, bucket in enumerate(self.buckets) for param in bucket}
        self._chunk_of = model.parameter_chunks()
        shares_head = model.tied and model.pre_process  # the input embedding is the head's weight too
        self._head_weight = model.output_weight if model.post_process and not shares_head else None
        for param in params:
            if param is not self._head_weight:
                param.register_post_accumulate_grad_hook(self._arrived)
        self._armed: set[int] = set()  # the chunks whose last backward has started, until `finish`
        self._waiting = [set(bucket) for bucket in self.buckets]
        self._launched = 0  # buckets launched this step: always a prefix, in index order
        self._works: list[dist.Work] = []

    def launching(self, forward_step: ForwardStep, num_micro_batches: int) -> ForwardStep:
        """`forward_step` (called once per micro-batch and model chunk by the schedules, a chunk's
        micro-batches in the order of their backwards), whose last output of each chunk arms that chunk's
        launches as its backward starts: the schedules' `backward` stays as it is (1F1B frees sent outputs
        under the plain autograd one only)."""
        calls: collections.Counter[int] = collections.Counter()

        def step(input_tensor: Tensor | None) -> Tensor:
            output = forward_step(input_tensor)
            chunk = parallel_state.virtual_pipeline_model_parallel_rank() or 0
            calls[chunk] += 1
            if calls[chunk] == num_micro_batches and output.requires_grad:
                output.register_hook(lambda grad: self._armed.add(chunk))
            return output
        return step

    def watch_head_input(self, hidden: Tensor) -> None:
        """The LM head's input: its gradient arrives when the head's weight gradient is final."""
        if self._head_weight is not None and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._arrived(self._head_weight))

    def finish(self) -> None:
        """Launch what the backward did not (buckets with an unused parameter, and those after them), and
        wait for every sum."""
        while self._launched < len(self.buckets):
            self._launch_next()
        for work in self._works:
            work.wait()
        self._armed = set()
        self._waiting = [set(bucket) for bucket in self.buckets]
        self._launched = 0
        self._works = []

    def _arrived(self, param: nn.Parameter) -> None:
        if self._chunk_of[param] not in self._armed:
            return
        self._waiting[self._bucket_of[param]].discard(param)
        # In index order only: NCCL needs every rank to issue the same collectives in the same order, and
        # the order hooks fire in may differ between ranks (an unused parameter holds its bucket and the
        # ones after it back until `finish`).
        while self._launched < len(self.buckets) and not self._waiting[self._launched]:
            self._launch_next()

    def _launch_next(self) -> None:
        """One asynchronous SUM all-reduce of the next bucket's gradients, which become views of its buffer."""
        index = self._launched
        self._launched += 1
        self._waiting[index].clear()
        params = [p for p in self.buckets[index] if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        for param, view in zip(params, flat.split([p.numel() for p in params])):
            param.grad = view.view_as(param)
        collectives.record(collectives.DP_ALL_REDUCE, collectives.nbytes(flat))
        self._works.append(dist.all_reduce(flat, group=parallel_state.data_context_parallel_group(),
                                          async_op=True))
