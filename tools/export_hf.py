#!/usr/bin/env python
"""Export a checkpoint (any TP x PP layout of ours, or DeepSpeed ZeRO 1-3) as a HuggingFace transformers
model directory: config.json, model.safetensors, generation_config.json (GPT2LMHeadModel for GPT-2-shaped
models, LlamaForCausalLM for Llama-shaped ones), and the tokenizer's SentencePiece .model with a note.

    python tools/export_hf.py --load ckpt --output hf_model
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf_model')"

The SentencePiece model is copied, not converted: the transformers release pinned here (5.x) builds its
tokenizers with the `tokenizers` library and did not convert our BPE model faithfully in a test, so the
directory holds `tokenizer.model` and README.txt says how to tokenize (sentencepiece, the ids as they are).
What transformers cannot represent (a mix of GPT-2 and Llama options) is refused in one line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from megatron_eslm.checkpoint import hf
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.errors import UserError, exit_on_user_error

NOTE = """This model was exported from a megatron-eslm checkpoint ({source}, iteration {iteration}).
Its tokenizer is the SentencePiece model tokenizer.model: token ids are SentencePiece's own ids, with no
BOS token added, e.g.
    import sentencepiece; sp = sentencepiece.SentencePieceProcessor(model_file="tokenizer.model")
    ids = sp.encode("some text")
"""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory (its --save)")
    parser.add_argument("--iteration", type=int, help="iteration to export; default: the latest")
    parser.add_argument("--output", required=True, help="directory to write (replaced if it exists)")
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
    full = read_checkpoint(args.load, args.iteration, optimizer=False)
    model = build_hf_model(full)
    tmp = f"{args.output.rstrip('/')}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer = full.config.data.tokenizer_model
    if tokenizer and os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "README.txt"), "w") as fh:
            fh.write(NOTE.format(source=args.load, iteration=full.iteration))
        told = "tokenizer.model copied (not converted: README.txt)"
    else:
        told = f"no tokenizer copied (--tokenizer-model {tokenizer} of the run is not there)"
    if os.path.exists(args.output):
        shutil.rmtree(args.output)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {type(model).__name__}, iteration {full.iteration}, vocabulary "
          f"{full.vocab_size}; {told}")


if __name__ == "__main__":
    main()
