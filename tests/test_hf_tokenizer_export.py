"""tools/export_hf.py's tokenizer: transformers' AutoTokenizer, loading an export from outside the project root,
gives our SentencePiece tokenizer's ids and text on code, prose, whitespace runs and unknown characters, and
`generate` stops at the end-of-document token (eos_token_id in both configs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_eslm.tokenizer.hf_convert import PROBE, convert

from helpers import REPO, flags, run

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_hf  # noqa: E402

pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers==5.17.0)")

TEXTS = ["def main():\n\tprint('hi')  # x\n", "The old king rides under the bridge.",
         "  runs   of    spaces \n\n\n and tabs\t\there  ", "caf\u00e9 \u00fcber \u2603 \u65e5\u672c \U0001f600 \ufb01",
         "</s> is text", "12345 + 0.5e-3 == x[::2]", "the king speaks"]

# Runs in a subprocess whose working directory is a temporary folder, not the project root.
CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
export, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(export)
model = AutoModelForCausalLM.from_pretrained(export).eval()
eod = model.generation_config.eos_token_id
with torch.no_grad():  # make the end-of-document token the certain next token from any prefix
    model.transformer.ln_f.weight.zero_()
    row = torch.zeros_like(model.transformer.wte.weight[eod]); row[0] = 100.0
    model.transformer.wte.weight[eod] = row
    model.transformer.ln_f.bias.copy_(row)
prompt = tok("the king", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
print(json.dumps({"class": type(tok).__name__, "ids": [tok(t)["input_ids"] for t in texts],
                  "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
                  "eos": [tok.eos_token_id, model.config.eos_token_id, eod],
                  "bos_pad": [model.config.bos_token_id, model.config.pad_token_id],
                  "new": out[0, prompt["input_ids"].shape[1]:].tolist()}))
"""


def test_converted_tokenizer_matches_sentencepiece(tiny_corpus):
    import sentencepiece

    fast, why = convert(tiny_corpus[1])
    assert why is None
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_corpus[1])
    for text in [*TEXTS, *PROBE]:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert fast.decode(ids) == sp.decode(ids), text


@pytest.mark.slow
def test_export_round_trips_in_transformers(tiny_corpus, tmp_path):
    import sentencepiece

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    run(flags(tiny_corpus, "--train-iters", "2", "--save", ckpt))
    os.makedirs(os.path.join(out, "sub"))
    open(os.path.join(out, "notes.txt"), "w").close()
    export_hf.main(["--load", ckpt, "--output", out, "--force"])  # the user's directory: replaced, as asked
    assert not os.path.exists(os.path.join(out, "notes.txt"))
    export_hf.main(["--load", ckpt, "--output", out])  # an earlier export: replaced without --force
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", CHECK, out, json.dumps(TEXTS)], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_corpus[1])
    assert got["class"] != "GPT2Tokenizer"
    assert got["ids"] == [sp.encode(t) for t in TEXTS]
    assert got["decoded"] == [sp.decode(sp.encode(t)) for t in TEXTS]
    assert got["eos"] == [sp.eos_id()] * 3
    assert got["bos_pad"] == [sp.bos_id(), sp.eos_id()]
    assert got["new"] == [sp.eos_id()]  # stopped at the end of the document, not after 8 tokens
    with open(os.path.join(out, "generation_config.json")) as fh:
        assert json.load(fh)["eos_token_id"] == sp.eos_id()
