#!/usr/bin/env python
"""Export a checkpoint (any TP x PP layout of ours, or DeepSpeed ZeRO 1-3) as a HuggingFace transformers
model directory: config.json, model.safetensors, generation_config.json (GPT2LMHeadModel for GPT-2-shaped
models, LlamaForCausalLM for Llama-shaped ones), and the tokenizer's SentencePiece .model with a note.

    python tools/export_hf.py --load ckpt --output hf_model
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf_model')"

The run's SentencePiece model is converted into a fast tokenizer (tokenizer.json, loaded by AutoTokenizer)
that gives SentencePiece's ids and text; bos/eos/pad_token_id are set in config.json and
generation_config.json, so `generate` stops at the end-of-document token. A model that cannot be converted
faithfully is copied as sentencepiece.model with a README.txt saying how to tokenize
(megatron_eslm/tokenizer/hf_export.py). What transformers cannot represent (a mix of GPT-2 and Llama
options) is refused in one line.

--output must be absent, empty or an earlier export (its marker file); anything else is refused unless
--force. The export is written beside it under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
import sys

from megatron_eslm.checkpoint import hf
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.checkpoint.paths import recorded_path
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.output_dir import check_output_dir, staged_dir
from megatron_eslm.tokenizer.hf_export import write_tokenizer

TOOL = "export_hf"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory (its --save)")
    parser.add_argument("--iteration", type=int, help="iteration to export; default: the latest")
    parser.add_argument("--output", required=True,
                        help="directory to write: absent, empty or an earlier export (replaced), else refused")
    parser.add_argument("--tokenizer-model", help="the run's tokenizer model file; default: the one it names")
    parser.add_argument("--force", action="store_true",
                        help="replace --output even though it holds files this tool did not write")
    return parser.parse_args(argv)


def build_hf_model(full):
    """A transformers model holding the checkpoint's weights (float32, eval mode)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = full.config.model
    config = hf.hf_config(cfg, full.vocab_size)
    model = (GPT2LMHeadModel if hf.architecture(cfg) == hf.GPT2 else LlamaForCausalLM)(config).eval()
    missing, unexpected = model.load_state_dict(hf.to_hf_state(cfg, full.model, full.vocab_size), strict=False)
    untouched = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if untouched or unexpected:
        raise UserError(f"--load: the checkpoint does not fill transformers' {type(model).__name__} "
                        f"(missing {untouched[:3]}, unexpected {unexpected[:3]})")
    return model


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    check_output_dir(args.output, TOOL, "--output", args.force)
    full = read_checkpoint(args.load, args.iteration, optimizer=False)
    model = build_hf_model(full)
    data = full.config.data
    tokenizer = args.tokenizer_model or recorded_path(data.tokenizer_model, args.load,
                                                                "--tokenizer-model")
    with staged_dir(args.output, TOOL) as tmp:
        ids, told = write_tokenizer(data.tokenizer_type, tokenizer, data.vocab_size, tmp, args.load, full.iteration)
        for config in (model.config, model.generation_config):
            for name, value in vars(ids).items():
                setattr(config, name, value)
        model.save_pretrained(tmp)
    print(f"wrote {args.output}: {type(model).__name__}, iteration {full.iteration}, vocabulary "
          f"{full.vocab_size}; {told}")


if __name__ == "__main__":
    main()
