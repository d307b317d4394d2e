"""Run by tests/test_deepspeed.py under the real `deepspeed` launcher (CPU accelerator, gloo): every job
of the equivalence table in one launch, since each launch costs seconds of DeepSpeed start-up.

    deepspeed --num_gpus 2 tests/deepspeed_jobs.py JOBS.json OUT_DIR

JOBS.json: [[name, kind, argv], ...], kind "train" (records and final validation loss) or "resume" (the
straight and the resumed records of `test_parallel_training.resume`). Each rank writes OUT_DIR/rankN.pt.
(The launcher adds --local_rank=N, which the environment's LOCAL_RANK already says.)
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from test_parallel_training import resume, train


def main(jobs_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")  # the launcher's environment: RANK, WORLD_SIZE, MASTER_ADDR, ...
    torch.set_num_threads(1)
    results = {}
    for name, kind, argv in json.load(open(jobs_file)):
        if kind == "train":
            result = train(argv, torch.float32)
            results[name] = {"records": result["records"], "val_loss": result["val_loss"]}
        else:
            results[name] = resume(argv, f"{out_dir}/{name}-ckpt")
    torch.save(results, f"{out_dir}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*[arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")])
