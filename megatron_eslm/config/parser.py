"""Flags (and an optional `--config` JSON file under them) into a finalized, validated Config."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

from megatron_eslm.config import checkpoint, deepspeed, model
from megatron_eslm.config.tree import SECTIONS, Config
from megatron_eslm.config.validation import finalize
from megatron_eslm.errors import UserError, read_json_object

# Flags that are not dataclass fields: the launcher's rank argument and the config file itself.
_NON_CONFIG_DESTS = {"local_rank", "config"}
# Fields with more than one flag spelling, the first naming the field.
FLAG_NAMES = {**deepspeed.FLAG_NAMES, **model.FLAG_NAMES, **checkpoint.FLAG_NAMES}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a bad flag should cost the user exactly one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


_TYPES = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_section(parser: argparse.ArgumentParser, title: str, section: type, helps: dict[str, str]) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = helps.get(f.name, "") + f" (default: {default})"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        names = FLAG_NAMES.get(f.name, (_flag(f.name),))
        if kind == "bool":
            group.add_argument(*names, action="store_true", help=help_text)
        elif kind.startswith("list"):  # list[int] -> int
            group.add_argument(*names, nargs="+", type=_TYPES[kind[len("list["):-1]], default=default,
                               help=help_text)
        else:
            group.add_argument(*names, type=_TYPES[kind.split("|")[0].strip()], default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m megatron_eslm.pretrain",
        description="Pretrain a GPT with ESLM token selection (Megatron-style flags).",
    )
    parser.add_argument("--config", help="JSON file of flag values (keys as flag names or dests); "
                        "flags on the command line override it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment")
    for section in SECTIONS:
        _add_section(parser, section.title, section.fields, section.helps)
    return parser


def _file_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    values = read_json_object(path, "--config")
    out = {}
    for key, value in values.items():
        action = parser._option_string_actions.get(_flag(key.lstrip("-").replace("-", "_")))
        if action is None or action.dest in _NON_CONFIG_DESTS | {"help"}:
            raise UserError(f"--config {path}: unknown key '{key}'")
        out[action.dest] = value
    return out


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse flags (over an optional --config file) into a validated Config."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_file_defaults(pre.config, parser))
    args = parser.parse_args(argv)
    cfg = Config()
    for section in SECTIONS:
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(section.fields):
            setattr(sub, f.name, getattr(args, f.name))
    return finalize(cfg)
