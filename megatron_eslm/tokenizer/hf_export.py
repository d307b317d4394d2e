"""The tokenizer files of a transformers export, and the special-token ids its configs need.

A SentencePiece model becomes ``tokenizer.json`` + ``tokenizer_config.json`` (converted, checked to give
SentencePiece's ids), which ``AutoTokenizer`` loads as a fast tokenizer. A model that cannot be converted
faithfully is copied as ``sentencepiece.model`` (a name transformers does not pick up and mis-load) with a
README.txt saying how to tokenize. The end-of-document token becomes ``eos_token_id``, so that
transformers' ``generate`` stops where our training documents end.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from megatron_eslm.tokenizer import build_tokenizer

README = """This model was exported from a megatron-eslm checkpoint ({source}, iteration {iteration}).
{how}
"""
SENTENCEPIECE_NOTE = """Its SentencePiece tokenizer could not be converted for transformers ({why}), so it is
sentencepiece.model: token ids are SentencePiece's own ids, with no BOS token added, e.g.
    import sentencepiece; sp = sentencepiece.SentencePieceProcessor(model_file="sentencepiece.model")
    ids = sp.encode("some text")"""
FAST_NOTE = """Load the tokenizer with transformers.AutoTokenizer.from_pretrained(this directory): it gives the
ids of the training tokenizer ({kind}), no BOS token added; {eos} ends a document (eos_token_id)."""


@dataclass
class TokenIds:
    """The special-token ids both configs get (None: the tokenizer has no such token)."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


def _write_json(path: str, values: dict) -> None:
    with open(path, "w") as fh:
        json.dump(values, fh, indent=2)
        fh.write("\n")


def _tokenizer_config(tokens: dict[str, str | None]) -> dict:
    # split_special_tokens: the text "</s>" is text, as it is to SentencePiece, not the end of a document
    return {"tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True, "add_bos_token": False,
            "clean_up_tokenization_spaces": False, **{k: v for k, v in tokens.items() if v is not None}}


def write_tokenizer(tokenizer_type: str, model_path: str | None, vocab_size: int | None, out: str,
                    source: str, iteration: int) -> tuple[TokenIds, str]:
    """Write the tokenizer files into `out`; returns the special ids and a few words saying what was written."""
    from megatron_eslm.tokenizer.hf_convert import convert, read_model

    note = README.format(source=source, iteration=iteration, how="{how}")
    if tokenizer_type == "NullTokenizer":
        eod = build_tokenizer(tokenizer_type, None, vocab_size).eod
        how = f"It was trained on pre-tokenized ids (NullTokenizer): no tokenizer; id {eod} ends a document."
        with open(os.path.join(out, "README.txt"), "w") as fh:
            fh.write(note.format(how=how))
        return TokenIds(eos_token_id=eod, pad_token_id=eod), "no tokenizer (NullTokenizer)"
    tokenizer = build_tokenizer(tokenizer_type, model_path)
    eod = tokenizer.eod
    if tokenizer_type == "HuggingFaceTokenizer":
        shutil.copy(tokenizer.model_path, os.path.join(out, "tokenizer.json"))
        piece = None if eod is None else tokenizer.detokenize([eod])
        _write_json(os.path.join(out, "tokenizer_config.json"), _tokenizer_config({"eos_token": piece,
                                                                                   "pad_token": piece}))
        how = FAST_NOTE.format(kind="a copy of its tokenizer.json", eos=piece)
        written = "tokenizer.json copied"
        ids = TokenIds(eos_token_id=eod, pad_token_id=eod)
    else:
        proto = read_model(model_path)
        trainer = proto.trainer_spec
        piece = {i: p.piece for i, p in enumerate(proto.pieces)}
        ids = TokenIds(bos_token_id=trainer.bos_id if trainer.bos_id >= 0 else None, eos_token_id=eod,
                       pad_token_id=trainer.pad_id if trainer.pad_id >= 0 else eod)
        fast, why = convert(model_path)
        if fast is None:
            shutil.copy(model_path, os.path.join(out, "sentencepiece.model"))
            how = SENTENCEPIECE_NOTE.format(why=why)
            written = f"sentencepiece.model copied, not converted ({why}): README.txt"
        else:
            fast.save(os.path.join(out, "tokenizer.json"))
            names = {"bos_token": ids.bos_token_id, "eos_token": ids.eos_token_id, "pad_token": ids.pad_token_id,
                     "unk_token": trainer.unk_id if trainer.unk_id >= 0 else None}
            _write_json(os.path.join(out, "tokenizer_config.json"),
                        _tokenizer_config({k: None if v is None else piece[v] for k, v in names.items()}))
            how = FAST_NOTE.format(kind="SentencePiece, converted", eos=None if eod is None else piece[eod])
            written = "tokenizer converted (tokenizer.json)"
    with open(os.path.join(out, "README.txt"), "w") as fh:
        fh.write(note.format(how=how))
    return ids, written
