"""Export to Hugging Face transformers (OLMoE / Qwen3-MoE) for evaluation and parity tests.

HF has no notion of expert tying, so a tied model exports as an untied one: every layer gets its own
copy of the bank, router and attention it uses. That is why `to_hf_state_dict` walks the layers by
attribute rather than reading `model.state_dict()`, which holds each tied tensor once (under its
leader's name) and has no keys for the followers.
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import nn

from models.config import ModelConfig, tie_groups


def _unsupported(name: str, value: object, why: str) -> NoReturn:
    raise ValueError(f"model.{name}={value!r}: cannot be expressed as a Hugging Face model ({why})")


def to_hf_config(cfg: ModelConfig):
    """OlmoeConfig for qk_norm="full", Qwen3MoeConfig for qk_norm="per_head".

    Raises ValueError for what neither HF class can express: shared experts, qk_norm="none", widened
    tied banks (HF has one expert count for all layers), dense first layers in OLMoE (Qwen3-MoE takes
    them as `mlp_only_layers`), clip_qkv in Qwen3-MoE, and a head_dim other than d_model // n_heads in
    OLMoE (its q/k norms are sized from hidden_size).
    """
    from transformers import OlmoeConfig, Qwen3MoeConfig

    if cfg.n_shared_experts:
        _unsupported("n_shared_experts", cfg.n_shared_experts, "OLMoE and Qwen3-MoE have no always-on experts")
    if cfg.widen_factor > 1 and any(len(g) > 1 for g in tie_groups(cfg)):
        _unsupported("widen_factor", cfg.widen_factor, "HF uses one expert count in every layer")
    if cfg.narrow_factor > 1:
        _unsupported("narrow_factor", cfg.narrow_factor, "HF uses one expert count in every layer")
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False, attention_dropout=0.0, num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.norm_topk_prob,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # the tokenizer's business, not the model's
    )
    if cfg.qk_norm == "full":
        if cfg.first_k_dense:
            _unsupported("first_k_dense", cfg.first_k_dense, "OLMoE has an MoE block in every layer")
        if cfg.attn_head_dim * cfg.n_heads != cfg.d_model:
            _unsupported("head_dim", cfg.head_dim, "OLMoE requires head_dim == d_model // n_heads")
        return OlmoeConfig(**common, intermediate_size=cfg.expert_ffn_dim, clip_qkv=cfg.clip_qkv)
    if cfg.qk_norm == "per_head":
        if cfg.clip_qkv is not None:
            _unsupported("clip_qkv", cfg.clip_qkv, "Qwen3-MoE does not clip q/k/v")
        return Qwen3MoeConfig(**common, head_dim=cfg.attn_head_dim, moe_intermediate_size=cfg.expert_ffn_dim,
                              intermediate_size=cfg.dense_ffn_dim or cfg.expert_ffn_dim,
                              mlp_only_layers=list(range(cfg.first_k_dense)), decoder_sparse_step=1,
                              use_sliding_window=False)
    _unsupported("qk_norm", cfg.qk_norm, "OLMoE and Qwen3-MoE both normalise q and k")


def _layer_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The modules a layer runs, looked up by attribute so borrowed (tied) ones are included."""
    modules = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm,
               "self_attn": layer.self_attn}
    if layer.plan.ffn == "dense":
        modules["mlp"] = layer.mlp
    else:
        modules["mlp.gate"] = layer.mlp.gate
        modules["mlp.experts"] = layer.mlp.experts
    return modules


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors with every tied module expanded into each layer that uses it (detached copies)."""
    to_hf_config(model.config)  # fail early on what HF cannot hold
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
           "model.norm.weight": model.model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        for prefix, module in _layer_modules(layer).items():
            for name, tensor in module.state_dict().items():
                out[f"model.layers.{i}.{prefix}.{name}"] = tensor
    return {name: tensor.detach().clone() for name, tensor in out.items()}


def to_hf_model(model: nn.Module, attn_implementation: str = "eager") -> nn.Module:
    """A transformers CausalLM holding `model`'s weights (untied), in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    hf_cfg = to_hf_config(model.config)
    hf_cfg._attn_implementation = attn_implementation
    hf_model = AutoModelForCausalLM.from_config(hf_cfg)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf_model.eval()
