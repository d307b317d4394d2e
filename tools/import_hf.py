#!/usr/bin/env python
"""Import a HuggingFace transformers GPT-2 or Llama model directory as a checkpoint of ours, at any tensor x
pipeline layout, weights only: train on from it with `--load CKPT --finetune` (the model flags must match
the imported config: the output line prints them).

    python tools/import_hf.py --input hf_model --save ckpt --tensor-model-parallel-size 2
"""
from __future__ import annotations

import argparse
import sys

from megatron_eslm.checkpoint import hf
from megatron_eslm.checkpoint.full_state import FullCheckpoint
from megatron_eslm.checkpoint.writer import write_checkpoint
from megatron_eslm.config import Config
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.output_dir import check_checkpoint_save, mark

TOOL = "import_hf"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--input", required=True, help="a transformers model directory (config.json, weights)")
    parser.add_argument("--save", required=True, help="checkpoint directory to write: absent, empty or an earlier "
                        "output of this tool")
    parser.add_argument("--force", action="store_true",
                        help="write into --save even though it holds files this tool did not write")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return parser.parse_args(argv)


def read_hf(directory: str) -> FullCheckpoint:
    """A transformers directory as our whole-model checkpoint at iteration 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise UserError(f"--input {directory}: not a transformers model directory ({str(err).splitlines()[0]})") from None
    model_cfg = hf.model_config(config)
    state = AutoModelForCausalLM.from_pretrained(directory, dtype="float32").state_dict()
    return FullCheckpoint(config=Config(model=model_cfg), iteration=0, vocab_size=config.vocab_size,
                          model=hf.from_hf_state(model_cfg, state))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    ours = check_checkpoint_save(args.save, "--input", args.input, TOOL, args.force)
    full = read_hf(args.input)
    path = write_checkpoint(full, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            optimizer=False)
    if ours:
        mark(args.save, TOOL)
    print(f"wrote {path} (weights only: --load {args.save} --finetune); model flags: "
          f"{' '.join(model_flags(full.config.model))}")


def model_flags(cfg) -> list[str]:
    """The pretrain flags of the imported shape."""
    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size, "--num-attention-heads",
             cfg.num_attention_heads, "--ffn-hidden-size", cfg.ffn_hidden_size, "--max-position-embeddings",
             cfg.max_position_embeddings, "--norm-epsilon", cfg.norm_epsilon]
    if hf.architecture(cfg) == hf.LLAMA:
        flags += ["--position-embedding-type", "rope", "--rotary-base", cfg.rotary_base, "--normalization",
                  "RMSNorm", "--swiglu", "--kv-channels", cfg.kv_channels]
        flags += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups] \
            if cfg.num_query_groups != cfg.num_attention_heads else []
        flags += ["--untie-embeddings-and-output-weights"] if cfg.untie_embeddings_and_output_weights else []
        flags += ["--disable-bias-linear"] if cfg.disable_bias_linear else []
    return [str(flag) for flag in flags]


if __name__ == "__main__":
    main()
