#!/usr/bin/env python
"""Tokenise a JSONL corpus (one document per line) into Megatron indexed datasets.

For each JSON key K writes OUTPUT_PREFIX_K_document.bin and .idx, e.g. P_text_document.{bin,idx}.
Example: python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus
             --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
"""
from __future__ import annotations

import argparse

from megatron_eslm.data.preprocess import preprocess
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.tokenizer import TOKENIZER_TYPES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL file, one JSON object (document) per line")
    parser.add_argument("--output-prefix", required=True, help="prefix of the output .bin/.idx files")
    parser.add_argument("--tokenizer-type", required=True, help=f"one of: {', '.join(TOKENIZER_TYPES)}")
    parser.add_argument("--tokenizer-model", required=True, help="tokenizer model file (SentencePiece .model)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenise, one dataset each")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes")
    parser.add_argument("--log-interval", type=int, default=10_000, help="report progress every N documents")
    return parser.parse_args()


@exit_on_user_error
def main() -> None:
    args = parse_args()
    prefixes = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer_type,
        args.tokenizer_model,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
    )
    for prefix in prefixes:
        print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
