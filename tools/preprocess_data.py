#!/usr/bin/env python
"""Tokenise JSONL or plain-text corpora into Megatron indexed datasets (.bin/.idx).

Inputs by file name, optionally gzip-compressed (.gz):
  *.jsonl, *.json   one JSON object per line is one document; each --json-keys key gets its own dataset
  anything else     plain text: one document per block of lines separated by blank lines
For each key K writes OUTPUT_PREFIX_K_document.bin and .idx (K is "text" for plain text).
Example: python tools/preprocess_data.py --input corpus.jsonl.gz --output-prefix data/corpus
             --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
"""
from __future__ import annotations

import argparse

from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.output_dir import check_output_files
from megatron_eslm.tokenizer import TOKENIZER_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="input files, tokenised in the order given into one dataset")
    parser.add_argument("--output-prefix", required=True, help="prefix of the output .bin/.idx files")
    parser.add_argument("--tokenizer-type", required=True, help=f"one of: {', '.join(TOKENIZER_TYPES)}")
    parser.add_argument("--tokenizer-model",
                        help="SentencePiece .model file, or HuggingFace tokenizer.json (or its directory)")
    parser.add_argument("--vocab-size", type=int,
                        help="NullTokenizer: the ids in the text are below this; the eod token is this id")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenise, one dataset each")
    parser.add_argument("--append-eod", action="store_true", help="end every non-empty document with the eod token")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (in all partitions)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="independent pipelines over contiguous parts of the input, merged at the end")
    parser.add_argument("--log-interval", type=int, default=10_000, help="report progress every N documents")
    parser.add_argument("--force", action="store_true", help="replace output .bin/.idx files that already exist")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outputs = [f"{args.output_prefix}_{key}_document.{ext}" for key in args.json_keys for ext in ("bin", "idx")]
    check_output_files(outputs, "--output-prefix", args.output_prefix, args.force)
    prefixes = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer_type,
        args.tokenizer_model,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        log_interval=args.log_interval,
        vocab_size=args.vocab_size,
    )
    for prefix in prefixes:
        print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
