"""tools/export_hf.py, tools/import_hf.py and greedy generation against transformers: a tiny GPT-2 and a
tiny Llama trained at TP2 x PP2, exported, give transformers' GPT2LMHeadModel / LlamaForCausalLM the same
logits (fp32, 1e-5) and the same greedy continuation; importing the export gives back the same weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_eslm.checkpoint import hf
from megatron_eslm.checkpoint.reader import read_checkpoint
from megatron_eslm.config import ModelConfig, finalize_model
from megatron_eslm.errors import UserError
from megatron_eslm.generate import load_model
from megatron_eslm.model.generation import generate

from helpers import REPO, launch_pretrain

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_hf  # noqa: E402
import import_hf  # noqa: E402

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers==5.17.0)")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_export_matches_transformers_and_imports_back(tiny_corpus, tmp_path, model, capsys):
    ckpt = str(tmp_path / "ckpt")
    launch_pretrain(tiny_corpus, tmp_path, 4, (2, 2), model, "--train-iters", "3", "--save", ckpt)
    out = str(tmp_path / "hf")
    export_hf.main(["--load", ckpt, "--output", out])
    assert "tokenizer converted" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(theirs).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[model]
    ours, full = load_model(ckpt, None, "cpu")
    vocab = full.vocab_size
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours.logits(ours(tokens))[..., :vocab] - theirs(tokens).logits).abs().max().item()
    print(f"{model}: max |logit difference| {difference:.2e}")
    assert difference < 1e-5

    prompt = tokens[0, :8].tolist()
    greedy = generate(ours, prompt, 12, greedy=True, vocab_limit=vocab)
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                               attention_mask=torch.ones(1, 8, dtype=torch.long))[0, 8:].tolist()
    assert greedy == expected
    if model == "gpt2":  # the command line prints the same greedy continuation, without the prompt
        from megatron_eslm.tokenizer import build_tokenizer
        tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_corpus[1])
        text = "the quick brown fox"
        done = subprocess.run([sys.executable, "-m", "megatron_eslm.generate", "--load", ckpt, "--prompt", text,
                               "--max-new-tokens", "10", "--greedy", "--device", "cpu"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        want = generate(ours, tokenizer.tokenize(text), 10, greedy=True, vocab_limit=vocab)
        assert done.stdout.rstrip("\n") == tokenizer.detokenize(want)

    imported = str(tmp_path / "imported")
    import_hf.main(["--input", out, "--save", imported, "--tensor-model-parallel-size", "2"])
    back = read_checkpoint(imported)
    assert back.model.keys() == full.model.keys()
    for name, value in full.model.items():
        rows = min(value.shape[0], vocab) if name in ("word_embeddings.weight", "output_layer.weight") else None
        torch.testing.assert_close(back.model[name][:rows], value[:rows], rtol=0, atol=0, msg=name)


def test_mixed_shapes_are_refused_in_one_line():
    with pytest.raises(UserError, match="--swiglu"):
        hf.architecture(finalize_model(ModelConfig(swiglu=True)))
    with pytest.raises(UserError, match="--untie-embeddings-and-output-weights"):
        hf.architecture(finalize_model(ModelConfig(untie_embeddings_and_output_weights=True)))
