"""DeepSpeed ZeRO as the data-parallel optimizer of our own tensor x pipeline model (`--deepspeed`).

DeepSpeed owns what it is good at: the data-parallel reduction of gradients (but for stage 1 under
--bf16, below), the partitioning of optimizer states (stage 1), gradients (2) and parameters (3),
clipping, and its checkpoint format. Our code keeps the model, tensor and pipeline parallelism, the 1F1B
schedule, the ESLM selection and the LR schedule. How one step maps onto DeepSpeed's API:

  every forward         through the engine (ZeRO counts micro-steps and arms its backward hooks there)
  every backward        engine.backward(scalar, scale_wrt_gas=False); a pipeline stage's
                        backward(output, grad) becomes the scalar sum(output * grad), whose gradient is
                        the same vector-Jacobian product. The loss is already divided by the number of
                        micro-batches; DeepSpeed AVERAGES over the data-parallel group (data x context
                        ranks under context parallelism) where the ESLM / dense normalisation (by the
                        selection group's token count) needs a SUM, so the loss is multiplied by that
                        group's size (`grad_scale`).
  accumulation boundary set explicitly: the schedule's order of backwards (1F1B) is not DeepSpeed's.
                        Stage 1 holds every boundary until the step's backwards are done, sums what
                        tensor/pipeline parallelism share (sequence-parallel norms, the tied embedding's
                        two copies: `finalize_model_grads` without its data-parallel part), then lets
                        ZeRO reduce. Stages 2 and 3 reduce in the backward itself; they are refused with
                        pipelining and sequence parallelism (`deepspeed_config.resolve`).
  --bf16                DeepSpeed's bf16: bf16 parameters, fp32 master weights, and (our ds_config)
                        fp32 sums over the micro-batches. Stage 1 is then DeepSpeed's BF16_Optimizer,
                        which adds each backward's bf16 `.grad` into fp32 buffers of the whole model and
                        leaves their reduction to the caller: `finalize_model_grads` does all the sums on
                        those buffers, the data-parallel one included, and `grad_scale` is 1. Stage 2 sums
                        its gradient partitions in tensors kept fp32 here; stage 3 in an fp32 buffer.
  step                  our learning rate into the optimizer's groups, engine.step() (clips, steps,
                        zeroes the gradients); the gradient norm is DeepSpeed's (the tied copy is marked
                        `ds_pipe_replicated`, TP-replicated weights are counted on TP rank 0 only, as ours).
  ZeRO-3                the model is built inside deepspeed.zero.Init (`partitioned_construction`), so a
                        rank holds 1/DP of every parameter from the start. The LM head reads the tied word
                        embedding outside the embedding's forward, so it is registered as an external
                        parameter of the model, whose forward runs the head.
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_eslm import parallel_state
from megatron_eslm.distributed.grads import finalize_model_grads
from megatron_eslm.training.timers import get_timers


class ModelParallelUnit:
    """`parallel_state` under the names DeepSpeed's `mpu` argument looks for (Megatron-DeepSpeed's).
    "Model parallel" is one shard of a replica (tensor x pipeline): its rank names DeepSpeed's checkpoint
    files, so two stages never write the same file; the tensor-parallel rank decides which replicated
    weights enter the gradient norm. DeepSpeed runs collectives on these groups whatever their size, so a
    group of size 1 (not created: `parallel_state`) is this rank's one-rank group."""

    def get_model_parallel_rank(self) -> int:
        layout = parallel_state.layout()
        return layout.pp_rank * layout.tp + layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.model_parallel_size()

    def get_model_parallel_group(self):
        return parallel_state.group_or_self(parallel_state.model_parallel_group())

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.tensor_model_parallel_size()

    def get_tensor_model_parallel_group(self):
        return parallel_state.group_or_self(parallel_state.tensor_model_parallel_group())

    def get_tensor_model_parallel_src_rank(self) -> int:
        layout = parallel_state.layout()
        return layout.global_rank(0, layout.dp_rank, layout.pp_rank, layout.cp_rank)

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.pipeline_model_parallel_size()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.group_or_self(parallel_state.pipeline_model_parallel_group())

    def get_data_parallel_rank(self) -> int:
        return parallel_state.data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.data_parallel_size()

    def get_data_parallel_group(self):
        return parallel_state.group_or_self(parallel_state.data_parallel_group())

    # DeepSpeed partitions ZeRO state over, and reduces gradients across, the "sequence data parallel" group
    # when the mpu names one: our data x context group (the data-parallel size above stays the one that
    # divides the batch).
    def get_sequence_data_parallel_rank(self) -> int:
        return parallel_state.data_context_parallel_rank()

    def get_sequence_data_parallel_world_size(self) -> int:
        return parallel_state.data_context_parallel_size()

    def get_sequence_data_parallel_group(self):
        return parallel_state.group_or_self(parallel_state.data_context_parallel_group())


def import_deepspeed() -> ModuleType:
    """DeepSpeed, imported only by runs that ask for it (it takes seconds). On its CPU accelerator, without
    the shared-memory op that its comm layer otherwise compiles at start-up: the op serves only
    `inference_all_reduce`, which training never calls, and building it needs a C++ compiler and the
    Python headers, and took 100 CPU-seconds here at the first start of each environment."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # the table `deepspeed.comm.torch.build_shm_op` reads (0.19.0 imports it, later releases build it at
        # first access and keep it): with the op marked incompatible it returns None
        getattr(deepspeed.ops, "__compatible_ops__")["deepspeed_shm_comm"] = False
    return deepspeed


def partitioned_construction(ds_config: dict | None) -> contextlib.AbstractContextManager:
    """Where the model is built. Under ZeRO-3 with data parallelism: deepspeed.zero.Init over our
    data-parallel group, which partitions each module's parameters as soon as its __init__ returns, so a rank
    holds 1/DP of the modules built so far plus the whole of the one being built (our init has drawn its
    values by then: the same numbers as without ZeRO; zero.Init makes floating tensors in the ZeRO dtype,
    bf16 under --bf16, as `deepspeed.initialize` would cast them). Otherwise nothing: ZeRO 1-2 keep whole
    parameters, and one replica has nothing to partition."""
    stage = ds_config["zero_optimization"]["stage"] if ds_config is not None else 0
    if stage != 3 or parallel_state.data_context_parallel_size() == 1:
        return contextlib.nullcontext()
    deepspeed = import_deepspeed()
    # DeepSpeed's comm over our process group; without it zero.Init's config sees a world of 1 and refuses
    # the batch sizes.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed.zero.Init(data_parallel_group=parallel_state.data_context_parallel_group(),
                               config_dict_or_path=ds_config, mpu=ModelParallelUnit())


class DeepSpeedEngine:
    """One model's DeepSpeed engine, driven by our step: `backward` for the schedules, `step` for the
    optimizer, `save`/`load` for checkpoints (DeepSpeed's format, our state as client state)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, num_micro_batches: int,
                 bucket_elements: int):
        deepspeed = import_deepspeed()
        self.stage = ds_config["zero_optimization"]["stage"]
        if self.stage == 3 and getattr(model, "post_process", False):
            deepspeed.zero.register_external_parameter(model, model.output_weight)
        self.model = model
        self.num_micro_batches = num_micro_batches
        self.bucket_elements = bucket_elements
        mpu = ModelParallelUnit() if dist.get_world_size() > 1 else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu,
                                                    dist_init_required=False)
        # Stage 1 under --bf16 is DeepSpeed's BF16_Optimizer: the micro-batches' gradients sum in fp32 buffers
        # of its own, which our bucketed sums reduce (`_reduce`).
        self._fp32_buffers = getattr(self.engine.optimizer, "fp32_groups_gradients", None)
        self._backwards = 0

    @property
    def grad_scale(self) -> float:
        """Factor on each micro-batch loss: DeepSpeed averages gradients over data parallelism where the
        ESLM/dense normalisation, by the whole selection group's token count, needs a sum. Our own
        reduction of BF16_Optimizer's buffers sums."""
        return 1.0 if self._fp32_buffers is not None else float(parallel_state.data_context_parallel_size())

    def _defers_reduction(self) -> bool:
        """Stage 1 reduces once, after our own tensor/pipeline sums (see the module docstring)."""
        return self.stage == 1

    def forward(self, *args, **kwargs):
        """The model's forward through the engine, which prepares ZeRO's bookkeeping for the backward."""
        return self.engine(*args, **kwargs)

    def start_step(self) -> None:
        self._backwards = 0

    def backward(self, output: Tensor, output_grad: Tensor | None) -> None:
        """One micro-batch's backward through DeepSpeed (the schedules' `backward`)."""
        self._backwards += 1
        last = self._backwards == self.num_micro_batches
        self.engine.set_gradient_accumulation_boundary(last and not self._defers_reduction())
        loss = output if output_grad is None else torch.sum(output * output_grad)
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.stage == 2:
            self._accumulate_in_fp32()

    def _accumulate_in_fp32(self) -> None:
        """ZeRO-2 of DeepSpeed 0.19 adds each micro-batch's reduced gradient partition into the first
        micro-batch's tensors (`all_grad_tensors`), which are bf16 under --bf16 whatever `grad_accum_dtype`
        says. Promoted to fp32 after a backward, the following micro-batches add into fp32 (a no-op when
        they already are fp32, or when the step's last backward has consumed them)."""
        sums = self.engine.optimizer.all_grad_tensors
        for group, grads in sums.items():
            if grads is not None:
                sums[group] = [grad.float() for grad in grads]

    def step(self, lr: float) -> torch.Tensor | float:
        """Reduce (stage 1), clip and apply the step's gradients at `lr`; returns the gradient norm as
        DeepSpeed has it (read at the log interval; DeepSpeed's own step reads it on the host anyway:
        BF16_Optimizer asserts it positive, ZeRO checks it for overflow)."""
        if self._defers_reduction():
            with get_timers().phase("grads_reduce"):  # stages 2 and 3 reduce inside the backward
                self._reduce()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        return self.engine.get_global_grad_norm()

    def _reduce(self) -> None:
        """Stage 1: sum what tensor/pipeline parallelism share, then reduce over data parallelism. ZeRO's
        stage-1 optimizer reduces `.grad` itself. BF16_Optimizer's fp32 buffers get all the sums from
        `finalize_model_grads`, in --ddp-bucket-size buckets as without DeepSpeed: DeepSpeed's own
        all-reduce of them would first copy each parameter group's whole buffer."""
        self.engine.set_gradient_accumulation_boundary(True)  # engine.step() steps at a boundary only
        if self._fp32_buffers is not None:
            with self._grads_in_fp32_buffers():
                finalize_model_grads(self.model, self.bucket_elements)
            return
        finalize_model_grads(self.model, self.bucket_elements, data_parallel=False)
        self.engine.optimizer.reduce_gradients(pipeline_parallel=True)  # backward ran outside ZeRO's hooks

    @contextlib.contextmanager
    def _grads_in_fp32_buffers(self) -> Iterator[None]:
        """Each parameter's `.grad` made its fp32 accumulator in DeepSpeed's BF16_Optimizer, which sums
        the micro-batches' bf16 `.grad` there and zeroes `.grad` before every backward. Assigning
        `.data` may change a tensor's dtype where assigning `.grad` may not; `.grad` is cleared after."""
        params = [p for group in self.engine.optimizer.bf16_groups for p in group]
        for param, buffer in zip(params, (b for group in self._fp32_buffers for b in group), strict=True):
            if param.grad is None:
                param.grad = torch.empty_like(param)
            param.grad.data = buffer.view_as(param)
        try:
            yield
        finally:
            for param in params:
                param.grad = None

    def save(self, directory: str, client_state: dict) -> None:
        """Collectively write DeepSpeed's checkpoint of every rank into `directory` (a temporary name that
        the caller renames; DeepSpeed's tag is its base name).

        DeepSpeed's save runs collectives (barriers, the tag check) between and after its file writes, on
        the default group (NCCL on GPUs). A rank whose write fails must not leave that sequence: it would
        wait in the gloo outcome exchange (`launch.shared_outcome`) while the others sit in an NCCL barrier
        until NCCL's timeout aborts the job. So a failed write is recorded, this rank's later files are
        skipped, DeepSpeed's collectives run to the end on every rank, and only then is the error raised,
        for the exchange to report in one line."""
        root, tag = directory.rstrip("/").rsplit("/", 1)
        files = self.engine.checkpoint_engine
        write, failures = files.save, []

        def write_or_record(state_dict, path) -> None:
            if failures:
                return
            try:
                write(state_dict, path)
            except Exception as err:  # noqa: BLE001 -- raised below, after DeepSpeed's collectives
                failures.append(err)

        files.save = write_or_record
        try:
            self.engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        finally:
            del files.save  # the class's method again
        if failures:
            raise failures[0]

    def load(self, directory: str, optimizer: bool = True) -> dict | None:
        """Model, ZeRO optimizer partitions (with `optimizer`) and client state from `directory`; None if
        DeepSpeed found no checkpoint there."""
        root, tag = directory.rstrip("/").rsplit("/", 1)
        path, client_state = self.engine.load_checkpoint(root, tag=tag, load_lr_scheduler_states=False,
                                                         load_optimizer_states=optimizer)
        return None if path is None else client_state
