"""A SentencePiece ``.model`` as a HuggingFace ``tokenizers`` tokenizer giving the same ids and text.

transformers' own loaders read a copied ``tokenizer.model`` as some other model's tokenizer (GPT-2's for an
exported GPT-2 model: other ids, no spaces on decoding), so the export writes a ``tokenizer.json`` built here
from the model's pieces, scores and normalizer: SentencePiece's precompiled character map (NFKC), its
whitespace handling (trim, collapse runs, a dummy-prefix ``▁``), the BPE merges in piece order (or the
unigram scores), and byte fallback. Only public APIs of ``sentencepiece`` (its model proto) and
``tokenizers`` are used, so newer transformers releases load the result too.
"""
from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2

from megatron_eslm.errors import UserError

BPE, UNIGRAM = 2, 1  # TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # ModelProto.SentencePiece.Type
SPACE = "\u2581"


def read_model(path: str) -> sentencepiece_model_pb2.ModelProto:
    """The model proto of a SentencePiece ``.model`` file."""
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as fh:
            proto.ParseFromString(fh.read())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable SentencePiece model ({err})") from None
    return proto


def unsupported(proto: sentencepiece_model_pb2.ModelProto) -> str | None:
    """Why this model cannot be reproduced faithfully (None when it can): the options we do not mirror."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type not in (BPE, UNIGRAM):
        return f"model type {trainer.model_type} (only BPE and unigram are converted)"
    if trainer.treat_whitespace_as_suffix or not trainer.split_by_whitespace or trainer.split_digits:
        return "whitespace-as-suffix, no whitespace splitting or digit splitting"
    if not norm.escape_whitespaces or proto.denormalizer_spec.precompiled_charsmap:
        return "unescaped whitespace or a denormalizer"
    if any(p.type not in (NORMAL, UNKNOWN, CONTROL, BYTE) for p in proto.pieces):
        return "user-defined or unused pieces"
    return None


def _bpe_merges(pieces: list[str], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, ranked by the merged piece's id (SentencePiece merges the
    adjacent pair whose union scores highest, and BPE pieces score in id order)."""
    ids = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for merged in pieces:
        if merged not in mergeable:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                ranked.append((ids[merged], ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def build_fast_tokenizer(proto: sentencepiece_model_pb2.ModelProto):
    """A ``tokenizers.Tokenizer`` with SentencePiece's ids and decoding for a model ``unsupported`` accepts."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    unk = trainer.unk_piece if trainer.unk_id >= 0 else None
    if trainer.model_type == BPE:
        mergeable = {p.piece for p in proto.pieces if p.type == NORMAL}
        model = models.BPE({piece: i for i, piece in enumerate(pieces)}, _bpe_merges(pieces, mergeable),
                           unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    else:
        # control, unknown and byte pieces never match text in SentencePiece: scored out of the Viterbi search's reach
        lowest = min(p.score for p in proto.pieces if p.type == NORMAL)
        scores = [(p.piece, p.score if p.type == NORMAL else lowest - 1e6) for p in proto.pieces]
        model = models.Unigram(scores, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    prepend = "always" if norm.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=prepend, split=True)
    steps = [decoders.Replace(SPACE, " ")]
    if trainer.byte_fallback:
        steps += [decoders.ByteFallback()]
    steps += [decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps += [decoders.Strip(" ", 1, 0)]
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


# What the converted tokenizer must encode exactly as SentencePiece does before the export ships it: code,
# prose, whitespace runs, tabs and newlines, digits, accents, symbols and characters no vocabulary has.
PROBE = ("def main():\n    return {'a': [1, 2.5e-3]}  # done\n", "The king  rides\tunder the old bridge.\n\n",
         "   leading, trailing and   inner runs   ", "h\u00e9llo na\u00efve \u00c5ngstr\u00f6m \ufb01 \u2460 \uff21",
         "\u2603 \u65e5\u672c\u8a9e \U0001d518 \U0001f600 \u200b", "</s> <s> <unk> <0x41>", "", " ", "x" * 50)


def convert(model_path: str):
    """(tokenizers.Tokenizer, None) reproducing the SentencePiece model, or (None, why not)."""
    import sentencepiece

    proto = read_model(model_path)
    why = unsupported(proto)
    if why is not None:
        return None, why
    fast = build_fast_tokenizer(proto)
    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    for text in PROBE:
        ids = processor.encode(text)
        if fast.encode(text, add_special_tokens=False).ids != ids or fast.decode(ids) != processor.decode(ids):
            return None, f"the converted tokenizer differs from SentencePiece on {text[:20]!r}"
    return fast, None
