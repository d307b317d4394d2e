"""Entry point: `python -m megatron_eslm.pretrain [Megatron-style flags]` (also under torchrun and
`deepspeed --module megatron_eslm.pretrain`, which pass the rank through the environment)."""
from __future__ import annotations

import sys
from typing import Sequence

from megatron_eslm.config import parse_args
from megatron_eslm.errors import exit_on_user_error
from megatron_eslm.training.trainer import Trainer


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
