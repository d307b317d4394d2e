#!/usr/bin/env python
"""Concatenate Megatron indexed datasets (.bin/.idx) into one, in the order given.

Documents and tokens are copied unchanged; all inputs must have the same token dtype.
Example: python tools/merge_datasets.py --input data/a_text_document data/b_text_document
             --output-prefix data/ab_text_document
"""
from __future__ import annotations

import argparse

from megatron_eslm.data.merge import merge_datasets
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.output_dir import check_output_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PREFIX", help="dataset prefixes to merge")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged .bin/.idx")
    parser.add_argument("--force", action="store_true", help="replace output .bin/.idx files that already exist")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_output_files([f"{args.output_prefix}.{ext}" for ext in ("bin", "idx")], "--output-prefix",
                       args.output_prefix, args.force)
    merge_datasets(args.input, args.output_prefix)
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx")


if __name__ == "__main__":
    main()
