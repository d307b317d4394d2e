#!/usr/bin/env python
"""Re-shard a checkpoint for another tensor x pipeline (x virtual pipeline) layout, optimizer moments included, so that training
continues on the new layout exactly as a fresh run on it would from those weights and moments.

    python tools/reshape_checkpoint.py --load ckpt --save ckpt_tp1 \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1

Reads any layout of ours or a DeepSpeed ZeRO 1-3 checkpoint; writes ours (megatron_eslm/checkpoint/). The
result keeps the iteration, data position, schedule and selection state, but no RNG states: it resumes
with any data-parallel size, its RNG seeded from --seed. Where the new tensor-parallel size pads the
vocabulary differently, the padding rows (which the LM head's softmax includes) are cut or zero-filled.
"""
from __future__ import annotations

import argparse
import sys

from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.checkpoint.writer import write_checkpoint
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.output_dir import check_checkpoint_save, mark

TOOL = "reshape_checkpoint"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory to read (its --save)")
    parser.add_argument("--iteration", type=int, help="iteration to read; default: the latest")
    parser.add_argument("--save", required=True,
                        help="directory to write the reshaped checkpoint to: absent, empty or an earlier output of "
                             "this tool (not --load)")
    parser.add_argument("--force", action="store_true",
                        help="write into --save even though it holds files this tool did not write")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                        help="write the interleaved schedule's model chunks of N layers (default: none; a run "
                             "with another number of chunks on the same TP x PP regroups them itself)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    ours = check_checkpoint_save(args.save, "--load", args.load, TOOL, args.force)
    full = read_checkpoint(args.load, args.iteration)
    path = write_checkpoint(full, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage)
    if ours:
        mark(args.save, TOOL)
    moments = "with" if full.moments is not None else "without"
    print(f"wrote {path}: iteration {full.iteration}, TP {args.tensor_model_parallel_size} x PP "
          f"{args.pipeline_model_parallel_size}, {moments} optimizer moments")


if __name__ == "__main__":
    main()
