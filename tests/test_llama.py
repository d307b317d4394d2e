"""Llama-family models (rotary positions, RMSNorm, SwiGLU, grouped-query attention, an untied output layer,
no biases): logits against transformers' LlamaForCausalLM on the same weights, RMSNorm's hand-written
gradient, bf16 activations, the FLOPs model against the matmuls a forward and backward really run, the
host-sync budget and exact resume, and old checkpoints' configs. The parallel layouts against one process
are in tests/test_parallel_training.py (its harness, with LLAMA_FLAGS)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import flags, run, straight_and_resumed, without_timing
from megatron_eslm.checkpoint import hf
from megatron_eslm.config import ModelConfig, finalize_model
from megatron_eslm.eslm.frozen_model import load_frozen_model
from megatron_eslm.eslm.policies import ESLMPolicy
from megatron_eslm.kernels import lm_head_triton
from megatron_eslm.model.generation import generate
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.norms import _RMSNormFunction
from megatron_eslm.training.checkpointing import checkpoint_file
from megatron_eslm.training.flops import micro_batch_flops, transformer_forward_flops_per_token
from test_bf16_activations import check_saved_tensors
from test_host_syncs import POLICIES, assert_within_budget, count_step_syncs
from test_parallel_training import LLAMA_FLAGS  # the same model as flags, for runs the trainer builds

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, group_query_attention=True,
             num_query_groups=2, untie_embeddings_and_output_weights=True, disable_bias_linear=True)
NEW_FIELDS = ("norm_epsilon", *LLAMA, "rotary_base", "kv_channels")  # not in configs stored before them
VOCAB, BATCH, SEQ = 64, 2, 16


def llama_config(**overrides) -> ModelConfig:
    values = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=SEQ,
                  hidden_dropout=0.0, attention_dropout=0.0, **LLAMA)
    return finalize_model(ModelConfig(**{**values, **overrides}))


def tokens(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------- reference

def to_transformers(model: GPTModel):
    """transformers' LlamaForCausalLM holding our model's weights (the export's mapping, checkpoint/hf.py)."""
    from transformers import LlamaForCausalLM

    config = hf.hf_config(model.cfg, model.vocab_size)
    config._attn_implementation = "eager"
    ours = {name: value.detach().clone() for name, value in model.state_dict().items()}
    hf_model = LlamaForCausalLM(config).eval()
    missing, unexpected = hf_model.load_state_dict(hf.to_hf_state(model.cfg, ours, model.vocab_size), strict=False)
    assert not unexpected and all("rotary" in name for name in missing), (missing, unexpected)
    return hf_model


@pytest.mark.parametrize("overrides", [{}, {"kv_channels": 16, "rotary_base": 500000}], ids=["llama", "kv16-base5e5"])
def test_logits_match_transformers_llama(overrides):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers==5.17.0)")
    # A larger init than 0.02 so that attention is far from uniform and every position's rotation shows.
    model = GPTModel(llama_config(init_method_std=0.2, **overrides), VOCAB, init_seed=3).eval()
    with torch.no_grad():  # norms away from 1, so that their weights are checked too
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    ids = tokens()
    with torch.no_grad():
        ours = model.logits(model(ids))
        theirs = to_transformers(model)(ids).logits
    difference = float((ours - theirs).abs().max())
    print(f"max |logit difference| vs LlamaForCausalLM: {difference:.1e} (largest |logit| "
          f"{float(theirs.abs().max()):.1f})")
    assert difference <= 1e-5
    assert float((ours[:, 1:] - ours[:, :1]).abs().max()) > 0.1  # positions matter


def test_generation_uses_the_output_layer():
    model = GPTModel(llama_config(), VOCAB, init_seed=3)
    assert not torch.equal(model.output_layer.weight, model.word_embeddings.weight)
    with torch.no_grad():
        hidden = model(tokens())
    assert torch.equal(model.logits(hidden), hidden @ model.output_layer.weight.t())
    out = generate(model, [1, 2, 3], 4, top_k=1)
    with torch.no_grad():
        greedy = model.logits(model(torch.tensor([[1, 2, 3, *out[:-1]]])))[0, 2:].argmax(-1)
    assert out == greedy.tolist()


@pytest.mark.skipif(not lm_head_triton.is_available(), reason="triton is not installed")
@pytest.mark.parametrize("selection", ["dense", "eslm"])
def test_triton_head_reads_the_output_layer(selection):
    """The selective head's Triton kernels (interpreted on CPU) train the untied output layer as the
    PyTorch ones do."""
    results = []
    for impl in ("torch", "triton"):
        model = GPTModel(llama_config(), VOCAB, init_seed=3)
        out = model.loss(model(tokens()), tokens(), ESLMPolicy(0.5, "loss") if selection == "eslm" else None, impl=impl)
        out.loss.backward()
        results.append((out.loss.detach(), model.output_layer.weight.grad, model.word_embeddings.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- blocks

def test_rms_norm_gradient():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-5), (x, weight))
    want = torch.nn.functional.rms_norm(x, (8,), weight, 1e-5)
    torch.testing.assert_close(_RMSNormFunction.apply(x, weight, 1e-5), want)


def test_bf16_activations():
    """Under --bf16 every large saved activation is bf16 (RMSNorm included), as for GPT-2; the rotary
    tables ([seq, head_dim]) and per-row statistics are small. Tied: the check backpropagates from the
    final hidden, which leaves an output layer without a gradient."""
    check_saved_tensors(GPTModel(llama_config(untie_embeddings_and_output_weights=False), VOCAB, init_seed=1))


def test_checkpoint_from_before_the_rename_loads(tiny_corpus, tmp_path):
    """Checkpoints store config.to_dict(); those written before --norm-epsilon name it layernorm_epsilon
    and lack the Llama fields. A frozen model (eslm-kd's teacher, rho1's reference) still loads from one."""
    save = str(tmp_path / "ckpt")
    trainer, _ = run(flags(tiny_corpus, "--train-iters", "1", "--lr-warmup-iters", "0", "--save", save,
                           "--norm-epsilon", "1e-6"))
    path = checkpoint_file(save, 1)
    state = torch.load(path, weights_only=False)
    stored = state["config"]["model"]
    state["config"]["model"] = {**{k: v for k, v in stored.items() if k not in NEW_FIELDS},
                                "layernorm_epsilon": stored["norm_epsilon"]}
    torch.save(state, path)
    frozen = load_frozen_model(save, "--teacher-load", trainer.vocab_size, 32, torch.device("cpu"))
    assert frozen.cfg == trainer.model.cfg and frozen.cfg.norm_epsilon == 1e-6


# ----------------------------------------------------------------------------------------- FLOPs

class MatmulFlops(TorchDispatchMode):
    """2 x multiply-adds of every matmul and attention kernel that runs (what flops.py models)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")  # addmm_: the head's in-place weight gradient
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = args[-2:]
            self.flops += 2 * a.numel() * b.shape[-1]
        elif name.startswith("_scaled_dot_product"):
            q, k = args[:2]  # [b, heads, s, d]: QK^T and AV, twice that in the backward
            self.flops += (8 if name.endswith("backward") else 4) * q.numel() * k.shape[-2]
        return out


SHAPES = {"gpt2": dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
                       group_query_attention=False, num_query_groups=None,
                       untie_embeddings_and_output_weights=False, disable_bias_linear=False),
          "llama": {}, "llama-kv16": dict(kv_channels=16), "mqa": dict(num_query_groups=1)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", ["dense", "eslm"])
def test_flops_match_the_matmuls_that_run(shape, selection):
    """flops.py's transformer forward and micro_batch_flops equal the matmul FLOPs counted in a forward
    (the transformer, then the head's logits) and in a training micro-batch's forward and backward (every
    label valid: the fused dense head also runs the rows of ignored labels, at 4hV each)."""
    cfg = llama_config(**SHAPES[shape])
    model = GPTModel(cfg, VOCAB, init_seed=1)
    ids = tokens()
    with torch.no_grad(), MatmulFlops() as forward:
        hidden = model(ids)
    assert forward.flops == transformer_forward_flops_per_token(cfg) * ids.numel()
    with torch.no_grad(), MatmulFlops() as head:
        model.logits(hidden)
    assert head.flops == 2 * cfg.hidden_size * VOCAB * ids.numel()

    policy = ESLMPolicy(0.5, "loss") if selection == "eslm" else None
    with MatmulFlops() as step:
        out = model.loss(model(ids), ids, policy)
        out.loss.backward()
    kept = int(out.selection.kept.sum())
    assert 0 < kept <= ids.numel()
    assert step.flops == micro_batch_flops(cfg, VOCAB, ids.numel(), ids.numel(), kept, policy is not None).executed


# ----------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", ["dense", "eslm-sketch-exact", "ada-eslm-grad-mass"])
def test_host_syncs_within_budget(tiny_corpus, name):
    syncs, micro_batches = count_step_syncs(flags(tiny_corpus, *LLAMA_FLAGS, "--log-interval", "100",
                                                  *POLICIES[name]))
    assert_within_budget(name, syncs, micro_batches)


def test_resume_is_exact(tiny_corpus, tmp_path):
    _, straight, _, resumed = straight_and_resumed(tiny_corpus, tmp_path, *LLAMA_FLAGS, "--selection", "eslm",
                                                   "--hidden-dropout", "0.1", "--attention-dropout", "0.1")
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert without_timing(straight[3:]) == without_timing(resumed)
