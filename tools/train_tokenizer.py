#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE with byte fallback) on text or JSONL files.

Writes OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab; </s> (id 2) is the end-of-document token.
Example: python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 --output-prefix tok
"""
from __future__ import annotations

import argparse

from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.output_dir import check_output_files
from megatron_eslm.tokenizer.train import train_sentencepiece


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="training text: plain text files (one sentence per line) or .jsonl/.json files, "
                             "optionally gzip-compressed (.gz)")
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces in the vocabulary")
    parser.add_argument("--output-prefix", required=True, help="write OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys to read from JSONL inputs")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"],
                        help="SentencePiece model type")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT_PREFIX.model/.vocab if they exist")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_output_files([f"{args.output_prefix}.{ext}" for ext in ("model", "vocab")], "--output-prefix",
                       args.output_prefix, args.force)
    model_path = train_sentencepiece(args.input, args.vocab_size, args.output_prefix, args.json_keys, args.model_type)
    print(f"wrote {model_path}")


if __name__ == "__main__":
    main()
