"""Activations forward and gradients backward between adjacent pipeline stages, as one batch of
isend/irecv per exchange (Megatron's p2p_communication): a stage that sends and receives in the same call
posts both before waiting, so neighbours that exchange in opposite directions cannot deadlock.

Activations and gradients travel with tags of their own, and every exchange posts the activations' ops
before the gradients': under the interleaved schedule the pipeline is a ring, so with two stages a rank's
previous and next stage are the same rank, and one exchange may carry an activation and a gradient each
way between them (gloo matches by tag, NCCL by the order of the ops between a pair).

Every op names the pipeline group, so NCCL runs the batch on that group's communicator (the P stages of
one replica) instead of the world's; `peer` stays a global rank, which P2POp maps into the group.

Every call is a no-op at the pipeline's ends (the first stage receives no activation, the last sends
none). Shapes are fixed for a run: [micro-batch, sequence (/ TP under sequence parallelism), hidden].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_eslm import parallel_state
from megatron_eslm.distributed import collectives
from megatron_eslm.training.timers import get_timers


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def empty(self) -> Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


ACTIVATION, GRADIENT = 0, 1  # the tags


def _communicate(spec: TensorSpec, send_next: Tensor | None = None, send_prev: Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """`exchange`, leaving out what the pipeline's ends (this chunk's, when interleaved) do not do."""
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    return exchange(spec, None if last else send_next, None if first else send_prev, recv_prev and not first,
                    recv_next and not last)


def exchange(spec: TensorSpec, send_next: Tensor | None = None, send_prev: Tensor | None = None,
             recv_prev: bool = False, recv_next: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Post every requested send and receive (activations forward, then gradients backward), then wait for
    all; returns (from_prev, from_next). The caller decides what its stage sends and receives."""
    ops, from_prev, from_next = [], None, None
    if send_next is not None:
        ops.append(_send(send_next, parallel_state.pipeline_next_rank(), ACTIVATION))
    if recv_prev:
        from_prev = spec.empty()
        ops.append(_recv(from_prev, parallel_state.pipeline_prev_rank(), ACTIVATION))
    if send_prev is not None:
        ops.append(_send(send_prev, parallel_state.pipeline_prev_rank(), GRADIENT))
    if recv_next:
        from_next = spec.empty()
        ops.append(_recv(from_next, parallel_state.pipeline_next_rank(), GRADIENT))
    if ops:
        with get_timers().phase("pp_comm"):  # the wait for the neighbour stages: the bubble, at level 2
            for request in dist.batch_isend_irecv(ops):
                request.wait()
    return from_prev, from_next


def _send(tensor: Tensor, peer: int, tag: int) -> dist.P2POp:
    tensor = tensor.detach().contiguous()
    collectives.record(collectives.PP_SEND, collectives.nbytes(tensor))
    return dist.P2POp(dist.isend, tensor, peer, group=parallel_state.pipeline_model_parallel_group(), tag=tag)


def _recv(tensor: Tensor, peer: int, tag: int) -> dist.P2POp:
    collectives.record(collectives.PP_RECV, collectives.nbytes(tensor))
    return dist.P2POp(dist.irecv, tensor, peer, group=parallel_state.pipeline_model_parallel_group(), tag=tag)


def recv_forward(spec: TensorSpec) -> Tensor | None:
    return _communicate(spec, recv_prev=True)[0]


def send_forward(output: Tensor, spec: TensorSpec) -> None:
    _communicate(spec, send_next=output)


def recv_backward(spec: TensorSpec) -> Tensor | None:
    return _communicate(spec, recv_next=True)[1]


def send_backward(input_grad: Tensor | None, spec: TensorSpec) -> None:
    _communicate(spec, send_prev=input_grad)


def send_forward_recv_backward(output: Tensor, spec: TensorSpec) -> Tensor | None:
    return _communicate(spec, send_next=output, recv_next=True)[1]


def send_backward_recv_forward(input_grad: Tensor | None, spec: TensorSpec) -> Tensor | None:
    return _communicate(spec, send_prev=input_grad, recv_prev=True)[0]
