"""DeepSpeed engine (ZeRO) flags; tensor and pipeline parallelism stay our own (docs/deepspeed.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_eslm.errors import UserError

TITLE = "DeepSpeed (ZeRO data parallelism; see docs/deepspeed.md)"
ZERO_STAGES = (1, 2, 3)

# Flags spelled as DeepSpeed's own `deepspeed.add_config_arguments` spells them (an underscore, not a
# dash), so launch lines written for Megatron-DeepSpeed work unchanged; tests/test_deepspeed.py checks
# they match DeepSpeed's helper. Defined here rather than by calling the helper, so that parsing flags
# does not import deepspeed (seconds) for runs that never use it.
FLAG_NAMES = {"deepspeed_config": ("--deepspeed_config", "--deepspeed-config")}


@dataclass
class DeepSpeedSection:
    """The DeepSpeed engine (ZeRO); tensor and pipeline parallelism stay our own (docs/deepspeed.md)."""
    deepspeed: bool = False
    deepspeed_config: str | None = None  # DeepSpeed JSON; None: built from our flags
    zero_stage: int | None = None  # 1 | 2 | 3; overrides the JSON's stage and implies --deepspeed


HELP = {
    "deepspeed": "train with the DeepSpeed engine (ZeRO); tensor and pipeline parallelism stay ours",
    "deepspeed_config": "DeepSpeed JSON config; its batch, clipping and bf16 entries must agree with our "
                        "flags, missing ones are filled from them (needs --deepspeed)",
    "zero_stage": "ZeRO stage 1, 2 or 3: builds the DeepSpeed config from our flags (or overrides the "
                  "stage of --deepspeed_config); implies --deepspeed",
}


def validate_deepspeed(ds: DeepSpeedSection) -> None:
    """The flags alone; the JSON and its agreement with our flags are checked in `validate_layout`, which
    knows the data-parallel size."""
    if ds.zero_stage is not None and ds.zero_stage not in ZERO_STAGES:
        raise UserError(f"--zero-stage must be one of {', '.join(map(str, ZERO_STAGES))}, got {ds.zero_stage} "
                        "(without --deepspeed, data parallelism is our own all-reduce)")
    if ds.deepspeed_config is not None and not ds.deepspeed:
        raise UserError("--deepspeed_config needs --deepspeed (or --zero-stage)")
    if ds.deepspeed_config is not None and not os.path.isfile(ds.deepspeed_config):
        raise UserError(f"--deepspeed_config {ds.deepspeed_config}: file not found")
