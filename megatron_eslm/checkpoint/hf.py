"""Our GPT <-> transformers' GPT2LMHeadModel (learned positions, LayerNorm, GELU-tanh, tied head, biases)
and LlamaForCausalLM (rope, RMSNorm, SwiGLU, with or without GQA, tying and biases).

The tensors differ in layout only: our fused QKV rows are [group, (its queries, key, value), head_dim]
(transformers: separate q, k, v projections, or GPT-2's fused [q heads | k heads | v heads] columns), our
SwiGLU input rows interleave [ffn, (gate, up)] (transformers: gate_proj and up_proj), and GPT-2's Conv1D
stores [in, out] where our Linear stores [out, in]. Vocabulary padding rows are dropped on export (the
logits of real tokens are unchanged; our softmax also spans the padding rows, as Megatron's does) and
zero-filled on import by the writer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_eslm.config import ModelConfig
from megatron_eslm.config.model import finalize_model
from megatron_eslm.errors import UserError

GPT2, LLAMA = "gpt2", "llama"


def architecture(cfg: ModelConfig) -> str:
    """Which transformers class can hold this model, or one line naming what none can."""
    gpt2 = (cfg.position_embedding_type == "learned_absolute", cfg.normalization == "LayerNorm", not cfg.swiglu)
    if all(gpt2):
        for unsupported, flag in ((cfg.untie_embeddings_and_output_weights, "--untie-embeddings-and-output-weights"),
                                  (cfg.disable_bias_linear, "--disable-bias-linear"),
                                  (cfg.num_query_groups != cfg.num_attention_heads, "--group-query-attention"),
                                  (cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size, "--kv-channels")):
            if unsupported:
                raise UserError(f"{flag}: transformers' GPT2LMHeadModel (learned positions, LayerNorm, GELU) "
                                "cannot represent it")
        return GPT2
    if not any(gpt2):
        return LLAMA
    raise UserError(f"--position-embedding-type {cfg.position_embedding_type}, --normalization "
                    f"{cfg.normalization}, --swiglu {cfg.swiglu}: transformers has GPT-2 (learned_absolute, "
                    "LayerNorm, GELU) or Llama (rope, RMSNorm, SwiGLU), not this mix")


def hf_config(cfg: ModelConfig, vocab_size: int):
    """The transformers config of our model config."""
    from transformers import GPT2Config, LlamaConfig

    if architecture(cfg) == GPT2:
        return GPT2Config(vocab_size=vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                          n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
                          activation_function="gelu_new", resid_pdrop=cfg.hidden_dropout,
                          embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
                          layer_norm_epsilon=cfg.norm_epsilon, initializer_range=cfg.init_method_std,
                          tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels,
                       rms_norm_eps=cfg.norm_epsilon, max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
                       rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
                       attention_bias=not cfg.disable_bias_linear, mlp_bias=not cfg.disable_bias_linear,
                       attention_dropout=cfg.attention_dropout, initializer_range=cfg.init_method_std,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def model_config(hf) -> ModelConfig:
    """Our model config of a transformers GPT-2 or Llama config (the reverse of `hf_config`)."""
    kind = hf.model_type
    if kind == GPT2:
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"activation_function {hf.activation_function}: our GPT-2 blocks use GELU with the "
                            "tanh approximation (gelu_new)")
        return finalize_model(ModelConfig(
            num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
            ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, seq_length=hf.n_positions,
            max_position_embeddings=hf.n_positions, hidden_dropout=hf.resid_pdrop, attention_dropout=hf.attn_pdrop,
            norm_epsilon=hf.layer_norm_epsilon, init_method_std=hf.initializer_range))
    if kind == LLAMA:
        rope = hf.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise UserError(f"rope_type {rope['rope_type']}: only the default rotary embedding is built here")
        if hf.attention_bias != hf.mlp_bias:
            raise UserError("attention_bias and mlp_bias differ: --disable-bias-linear covers both")
        groups = hf.num_key_value_heads
        return finalize_model(ModelConfig(
            num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
            ffn_hidden_size=hf.intermediate_size, seq_length=hf.max_position_embeddings,
            max_position_embeddings=hf.max_position_embeddings, hidden_dropout=0.0,
            attention_dropout=hf.attention_dropout, norm_epsilon=hf.rms_norm_eps,
            init_method_std=hf.initializer_range, position_embedding_type="rope",
            rotary_base=int(rope.get("rope_theta", 10000)), normalization="RMSNorm", swiglu=True,
            group_query_attention=groups != hf.num_attention_heads, num_query_groups=groups,
            kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
            disable_bias_linear=not hf.attention_bias))
    raise UserError(f"model_type {kind}: only gpt2 and llama checkpoints can be imported")


def _qkv_parts(cfg: ModelConfig, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Our fused QKV rows (weight [rows, h] or bias [rows]) as transformers' q, k, v rows."""
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    grouped = qkv.reshape(cfg.num_query_groups, per_group + 2, cfg.kv_channels, *qkv.shape[1:])
    return (grouped[:, :per_group].flatten(0, 2), grouped[:, per_group].flatten(0, 1),
            grouped[:, per_group + 1].flatten(0, 1))


def _fuse_qkv(cfg: ModelConfig, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """transformers' q, k, v rows as our fused [group, (its queries, key, value), head_dim] rows."""
    shape = (cfg.num_query_groups, -1, cfg.kv_channels, *q.shape[1:])
    return torch.cat([q.reshape(shape), k.reshape(shape), v.reshape(shape)], 1).reshape(-1, *q.shape[1:])


def _names(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(our name, transformers' name, how) for the tensors that map one to one; `how`: "" as is, "t"
    transposed (GPT-2's Conv1D)."""
    gpt2 = architecture(cfg) == GPT2
    names = [("word_embeddings.weight", "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight", "")]
    if gpt2:
        names.append(("position_embeddings.weight", "transformer.wpe.weight", ""))
    norm = "transformer.ln_f" if gpt2 else "model.norm"
    names += [(f"final_layernorm.{p}", f"{norm}.{p}", "") for p in (("weight", "bias") if gpt2 else ("weight",))]
    if not gpt2 and cfg.untie_embeddings_and_output_weights:
        names.append(("output_layer.weight", "lm_head.weight", ""))
    biases = not cfg.disable_bias_linear
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", (f"transformer.h.{i}." if gpt2 else f"model.layers.{i}.")
        if gpt2:
            pairs = [("input_layernorm.weight", "ln_1.weight", ""), ("input_layernorm.bias", "ln_1.bias", ""),
                     ("post_attention_layernorm.weight", "ln_2.weight", ""),
                     ("post_attention_layernorm.bias", "ln_2.bias", ""),
                     ("self_attention.dense.weight", "attn.c_proj.weight", "t"),
                     ("self_attention.dense.bias", "attn.c_proj.bias", ""),
                     ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", "t"), ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", ""),
                     ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", "t"),
                     ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", "")]
        else:
            pairs = [("input_layernorm.weight", "input_layernorm.weight", ""),
                     ("post_attention_layernorm.weight", "post_attention_layernorm.weight", ""),
                     ("self_attention.dense.weight", "self_attn.o_proj.weight", ""),
                     ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight", "")]
            if biases:
                pairs += [("self_attention.dense.bias", "self_attn.o_proj.bias", ""),
                          ("mlp.dense_4h_to_h.bias", "mlp.down_proj.bias", "")]
        names += [(ours + a, theirs + b, how) for a, b, how in pairs]
    return names


def to_hf_state(cfg: ModelConfig, model: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """transformers' state dict of our canonical (TP1/PP1) state dict, padding rows dropped."""
    gpt2 = architecture(cfg) == GPT2
    out = {}
    for ours, theirs, how in _names(cfg):
        value = model[ours]
        if ours in ("word_embeddings.weight", "output_layer.weight"):
            value = value[:vocab_size]
        out[theirs] = value.t() if how == "t" else value
    params = ("weight", "bias") if gpt2 or not cfg.disable_bias_linear else ("weight",)
    for i in range(cfg.num_layers):
        ours = f"layers.{i}."
        for p in params:
            q, k, v = _qkv_parts(cfg, model[ours + f"self_attention.query_key_value.{p}"])
            if gpt2:
                fused = torch.cat([q, k, v], 0)
                out[f"transformer.h.{i}.attn.c_attn.{p}"] = fused.t() if p == "weight" else fused
            else:
                for name, value in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"model.layers.{i}.self_attn.{name}.{p}"] = value
                fc1 = model[ours + f"mlp.dense_h_to_4h.{p}"]
                out[f"model.layers.{i}.mlp.gate_proj.{p}"] = fc1[0::2]
                out[f"model.layers.{i}.mlp.up_proj.{p}"] = fc1[1::2]
    return {name: value.contiguous() for name, value in out.items()}


def from_hf_state(cfg: ModelConfig, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our canonical state dict of transformers' (the reverse of `to_hf_state`; vocabulary unpadded)."""
    gpt2 = architecture(cfg) == GPT2
    model = {}
    for ours, theirs, how in _names(cfg):
        value = hf_state[theirs]
        model[ours] = value.t() if how == "t" else value
    params = ("weight", "bias") if gpt2 or not cfg.disable_bias_linear else ("weight",)
    rows = cfg.num_attention_heads * cfg.kv_channels
    kv_rows = cfg.num_query_groups * cfg.kv_channels
    for i in range(cfg.num_layers):
        for p in params:
            if gpt2:
                fused = hf_state[f"transformer.h.{i}.attn.c_attn.{p}"]
                fused = fused.t() if p == "weight" else fused
                q, k, v = fused.split([rows, kv_rows, kv_rows], 0)
            else:
                q, k, v = (hf_state[f"model.layers.{i}.self_attn.{n}.{p}"] for n in ("q_proj", "k_proj", "v_proj"))
                gate, up = hf_state[f"model.layers.{i}.mlp.gate_proj.{p}"], hf_state[f"model.layers.{i}.mlp.up_proj.{p}"]
                model[f"layers.{i}.mlp.dense_h_to_4h.{p}"] = torch.stack([gate, up], 1).flatten(0, 1)
            model[f"layers.{i}.self_attention.query_key_value.{p}"] = _fuse_qkv(cfg, q, k, v)
    return {name: value.detach().float().contiguous() for name, value in model.items()}
