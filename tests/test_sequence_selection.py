"""--eslm-granularity sequence (eslm/sequence.py, training/step.py select_sequences): whole sequences kept
before the training pass, scored by the student without autograd, by a proxy, or drawn at random."""
import pytest
import torch

from helpers import flags, run
from megatron_eslm.config import parse_args
from megatron_eslm.errors import UserError
from megatron_eslm.model.gpt import GPTModel

SEQUENCE = ["--selection", "eslm", "--eslm-granularity", "sequence", "--eslm-alpha", "0.5"]
RANDOM = ["--selection", "random", "--eslm-granularity", "sequence", "--eslm-alpha", "0.5"]


def test_keeps_half_the_sequences(tiny_corpus):
    _, records = run(flags(tiny_corpus, *SEQUENCE))
    print(records[-1])
    last = records[-1]
    assert last["samples_seen"] == 48 and last["samples_trained"] == 24
