"""Continue a prompt with a trained checkpoint (any layout, ours or DeepSpeed's), on one device.

    python -m megatron_eslm.generate --load ckpt --prompt "def main(" --max-new-tokens 40 --greedy
    python -m megatron_eslm.generate --load ckpt --prompt "def main(" --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1

Prints the continuation only (the prompt is not repeated). The tokenizer is the run's (--tokenizer-model to
use another file of it). Greedy output equals transformers' greedy `generate` on the exported model
(`tools/export_hf.py`; tests/test_hf_export.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

from megatron_eslm.checkpoint.full_state import VOCAB_ROWS
from megatron_eslm.checkpoint.paths import recorded_path
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.checkpoint.writer import vocab_rows
from megatron_eslm.config.parser import OneLineParser
from megatron_eslm.errors import UserError, exit_on_user_error
from megatron_eslm.model.generation import generate
from megatron_eslm.model.gpt import GPTModel, padded_vocab_size
from megatron_eslm.tokenizer import build_tokenizer


def parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory (its --save)")
    parser.add_argument("--iteration", type=int, help="iteration to load; default: the latest")
    parser.add_argument("--tokenizer-model", help="the run's tokenizer model file; default: the one it names")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 (the default): all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: the most likely tokens of this mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (host) generator (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--max-new-tokens and --top-k must be >= 0, --temperature > 0 and --top-p in (0, 1]")
    return args


def load_model(root: str, iteration: int | None, device: str) -> tuple[GPTModel, object]:
    """The whole model of a checkpoint on one device, in eval mode, and its FullCheckpoint."""
    full = read_checkpoint(root, iteration, optimizer=False)
    cfg = full.config.model
    rows = padded_vocab_size(full.vocab_size, cfg.make_vocab_size_divisible_by)
    with torch.device(device):
        model = GPTModel(cfg, rows)
    model.load_state_dict({name: vocab_rows(value, rows) if name in VOCAB_ROWS else value
                           for name, value in full.model.items()})
    return model.eval().requires_grad_(False), full


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    model, full = load_model(args.load, args.iteration, args.device)
    data = full.config.data
    model_file = args.tokenizer_model or recorded_path(data.tokenizer_model, args.load, "--tokenizer-model")
    tokenizer = build_tokenizer(data.tokenizer_type, model_file, data.vocab_size)
    prompt = tokenizer.tokenize(args.prompt)
    if not prompt:
        raise UserError("--prompt: no tokens")
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   top_p=args.top_p, greedy=args.greedy, vocab_limit=full.vocab_size,
                   generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.detokenize(out))


if __name__ == "__main__":
    main()
