"""Micro-batch schedules (Megatron's): all micro-batches on one stage, 1F1B across a pipeline, or
interleaved 1F1B across a pipeline of model chunks (virtual stages: `timetable.py` says when what runs).

`forward_step(input_tensor)` runs this stage's forward on the next micro-batch. `input_tensor` is the
previous stage's activation (None on the first stage); it returns the activation for the next stage, or
on the last stage the micro-batch's loss, already scaled for accumulation. The schedules only move
tensors and run backwards; what a loss is (and what its threshold covers) is the caller's business.

1F1B: stage p of P first runs P - p - 1 forwards (warmup), then alternates one forward and one backward
(steady state), then drains the remaining backwards (cooldown). At most P - p micro-batches' activations
are alive on a stage, against all of them for "all forwards, then all backwards". A stage output, once
sent, keeps only its autograd graph (Megatron's deallocate_output_tensor): its values live on the next
stage, and the plain autograd backward needs only the graph.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd import Variable

from megatron_eslm import parallel_state
from megatron_eslm.pipeline_parallel import p2p_communication as p2p
from megatron_eslm.pipeline_parallel.p2p_communication import TensorSpec
from megatron_eslm.pipeline_parallel.timetable import sends, timetable

ForwardStep = Callable[[Tensor | None], Tensor]
# backward(output, output_grad): accumulate this stage's gradients of `output` (a loss when output_grad is
# None). Plain autograd by default; the DeepSpeed engine's backward under --deepspeed.
Backward = Callable[[Tensor, Tensor | None], None]


def autograd_backward(output: Tensor, output_grad: Tensor | None) -> None:
    """Plain autograd. Given a gradient, it calls the engine directly (Megatron's custom_backward):
    torch.autograd.backward would compare the gradient's shape with the output's, whose data `_free_data`
    has released; the engine checks it against the shape the graph recorded. (torch >= 2.7 takes
    get_gradient_edge(output) in torch.autograd.backward for the same.)"""
    if output_grad is None:
        torch.autograd.backward(output)
        return
    Variable._execution_engine.run_backward(tensors=(output,), grad_tensors=(output_grad,), keep_graph=False,
                                            create_graph=False, inputs=(), allow_unreachable=True,
                                            accumulate_grad=True)


def _free_data(output: Tensor) -> Tensor:
    """Release a sent output's values, keeping its autograd graph (Megatron's deallocate_output_tensor)."""
    output.data = torch.empty((1,), dtype=output.dtype, device=output.device)
    return output


def forward_backward_no_pipelining(forward_step: ForwardStep, num_micro_batches: int, forward_only: bool,
                                   spec: TensorSpec | None = None, backward: Backward = autograd_backward) -> None:
    """One stage: forward and backward each micro-batch in turn (gradients accumulate)."""
    for _ in range(num_micro_batches):
        loss = forward_step(None)
        if not forward_only:
            backward(loss, None)


def _backward_step(backward: Backward, input_tensor: Tensor | None, output: Tensor,
                   output_grad: Tensor | None) -> Tensor | None:
    """Backward through this stage's micro-batch; returns the gradient for the previous stage."""
    backward(output, output_grad)
    return None if input_tensor is None else input_tensor.grad


def _receive_input(spec: TensorSpec, forward_only: bool) -> Tensor | None:
    received = p2p.recv_forward(spec)
    if received is not None and not forward_only:
        received.requires_grad_()
    return received


def forward_backward_pipelining_without_interleaving(forward_step: ForwardStep, num_micro_batches: int,
                                                     forward_only: bool, spec: TensorSpec | None = None,
                                                     backward: Backward = autograd_backward) -> None:
    """1F1B over the pipeline stages; `spec` describes the activations between stages. Sent outputs are
    freed only under the plain autograd backward: any other (DeepSpeed's sum(output * grad)) may read
    their values, so they are kept."""
    if forward_only:
        for _ in range(num_micro_batches):
            p2p.send_forward(forward_step(_receive_input(spec, True)), spec)
        return
    rank, size = parallel_state.pipeline_model_parallel_rank(), parallel_state.pipeline_model_parallel_size()
    warmup = min(size - rank - 1, num_micro_batches)
    steady = num_micro_batches - warmup
    free = backward is autograd_backward and not parallel_state.is_pipeline_last_stage()  # last: a loss
    inputs: list[Tensor | None] = []
    outputs: list[Tensor] = []
    for _ in range(warmup):
        input_tensor = _receive_input(spec, False)
        output = forward_step(input_tensor)
        p2p.send_forward(output, spec)
        inputs.append(input_tensor)
        outputs.append(_free_data(output) if free else output)

    input_tensor = _receive_input(spec, False) if steady else None
    for i in range(steady):
        output = forward_step(input_tensor)
        output_grad = p2p.send_forward_recv_backward(output, spec)
        inputs.append(input_tensor)
        outputs.append(_free_data(output) if free else output)
        input_grad = _backward_step(backward, inputs.pop(0), outputs.pop(0), output_grad)
        if i == steady - 1:
            p2p.send_backward(input_grad, spec)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad, spec)
            if input_tensor is not None:
                input_tensor.requires_grad_()

    for _ in range(warmup):
        output_grad = p2p.recv_backward(spec)
        p2p.send_backward(_backward_step(backward, inputs.pop(0), outputs.pop(0), output_grad), spec)


def forward_backward_pipelining_with_interleaving(forward_step: ForwardStep, num_micro_batches: int,
                                                  forward_only: bool, spec: TensorSpec | None = None,
                                                  backward: Backward = autograd_backward) -> None:
    """Interleaved 1F1B: each slot of this rank's row of the `timetable` (a micro-step of Megatron's: a
    forward, a forward and a backward, or a backward; or idle), then one exchange with both ring neighbours
    of what that slot produced (the table tells each side what the other sends). `forward_step` and
    `backward` run inside `parallel_state.model_chunk(c)`: `forward_step` must take chunk c's next
    micro-batch. Sent outputs are freed chunk by chunk, as plain 1F1B frees them."""
    pp, vp = parallel_state.pipeline_model_parallel_size(), parallel_state.virtual_pipeline_model_parallel_size()
    rank, stages = parallel_state.pipeline_model_parallel_rank(), pp * vp
    prev_rank, next_rank = (rank - 1) % pp, (rank + 1) % pp
    table = timetable(pp, vp, num_micro_batches, forward_only)
    inputs: dict[tuple[int, int], Tensor] = {}  # received activations, by (chunk, micro-batch)
    grads: dict[tuple[int, int], Tensor] = {}  # received output gradients
    kept: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}  # (input, output) awaiting their backward
    free = backward is autograd_backward and not forward_only
    for slot in range(len(table[rank])):
        send_next, send_prev = None, None
        for op in table[rank][slot] or ():
            key, stage = (op.chunk, op.micro_batch), op.chunk * pp + rank
            with parallel_state.model_chunk(op.chunk):
                if op.forward:
                    input_tensor = inputs.pop(key, None)
                    if input_tensor is not None and not forward_only:
                        input_tensor.requires_grad_()
                    output = forward_step(input_tensor)
                    send_next = output if stage < stages - 1 else None
                    if not forward_only:
                        kept[key] = (input_tensor, output)
                else:
                    input_tensor, output = kept.pop(key)
                    input_grad = _backward_step(backward, input_tensor, output, grads.pop(key, None))
                    send_prev = input_grad if stage > 0 else None
        # what the neighbours' slot sends this way: the previous rank's forward output, the next one's gradient
        before = next((op for op in table[prev_rank][slot] or () if op.forward and sends(op, prev_rank, pp, vp)), None)
        after = next((op for op in table[next_rank][slot] or () if not op.forward and sends(op, next_rank, pp, vp)),
                     None)
        from_prev, from_next = p2p.exchange(spec, send_next, send_prev, before is not None, after is not None)
        if from_prev is not None:  # the previous virtual stage's output; on rank 0, for the next chunk
            inputs[(before.chunk + (rank == 0), before.micro_batch)] = from_prev
        if from_next is not None:  # the next virtual stage's input gradient; on the last rank, the chunk before
            grads[(after.chunk - (rank == pp - 1), after.micro_batch)] = from_next
        if send_next is not None and free:
            _free_data(send_next)  # its values live on the next stage now


def get_forward_backward_func() -> Callable[..., None]:
    if parallel_state.virtual_pipeline_model_parallel_size() > 1:
        return forward_backward_pipelining_with_interleaving
    if parallel_state.pipeline_model_parallel_size() > 1:
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining
