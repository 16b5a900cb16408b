"""Export to Hugging Face transformers (OLMoE / Qwen3-MoE) for evaluation and parity tests.

Two layouts. "copied": plain `OlmoeForCausalLM` / `Qwen3MoeForCausalLM`, every layer with its own copy
of the bank, router and attention it uses (HF has no notion of expert tying); any tool loads it.
"tied": the same classes subclassed in `hf_modeling_tiedmoe.py` (shipped in the directory, found via
`auto_map`, `trust_remote_code=True`), each tied tensor stored once on disk and held once in memory
through transformers' tied-weights mechanism. `to_hf_state_dict` walks the layers by attribute
rather than reading `model.state_dict()`, which holds each tied tensor once (under its leader's name)
and has no keys for the followers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, NoReturn

import torch
from torch import nn

from models.config import ModelConfig, layer_plan, tie_groups

TIED_MODELING_SOURCE = Path(__file__).with_name("hf_modeling_tiedmoe.py")
TIED_MODELING_FILE = "modeling_tiedmoe.py"  # its name inside an export
TIED_CLASSES = {"olmoe": ("TiedOlmoeConfig", "TiedOlmoeForCausalLM"),
                "qwen3_moe": ("TiedQwen3MoeConfig", "TiedQwen3MoeForCausalLM")}
Layout = Literal["tied", "copied"]


def _unsupported(name: str, value: object, why: str) -> NoReturn:
    raise ValueError(f"model.{name}={value!r}: cannot be expressed as a Hugging Face model ({why})")


def to_hf_config(cfg: ModelConfig, token_ids: dict[str, int] | None = None, tied: bool = False):
    """OlmoeConfig for qk_norm="full", Qwen3MoeConfig for qk_norm="per_head" (their Tied* subclasses
    from hf_modeling_tiedmoe with `tied`).

    `token_ids` (eos/bos/pad_token_id) come from the run's tokenizer; without them they stay None.

    Raises ValueError for what neither HF class can express: shared experts, qk_norm="none", widened
    tied banks (HF has one expert count for all layers), dense first layers in OLMoE (Qwen3-MoE takes
    them as `mlp_only_layers`), clip_qkv in Qwen3-MoE, and a head_dim other than d_model // n_heads in
    OLMoE (its q/k norms are sized from hidden_size).
    """
    if tied:
        from models.hf_modeling_tiedmoe import TiedOlmoeConfig as OlmoeConfig
        from models.hf_modeling_tiedmoe import TiedQwen3MoeConfig as Qwen3MoeConfig
    else:
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
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    common.update(token_ids or {})
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
    return {name: tensor.detach().clone() for name, tensor in _hf_tensors(model).items()}


def param_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes of the two HF layouts: "tied" holds each tensor once, "copied" once per use."""
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    copied = _hf_tensors(model)
    if model.config.tie_embeddings:  # both layouts tie lm_head to embed_tokens (tie_word_embeddings): held once
        copied.pop("lm_head.weight")
    return {"tied": sum(unique.values()), "copied": sum(t.numel() * t.element_size() for t in copied.values())}


def _hf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF name -> the model's own tensor (tied ones under every name that uses them)."""
    to_hf_config(model.config)  # fail early on what HF cannot hold
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
           "model.norm.weight": model.model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        for prefix, module in _layer_modules(layer).items():
            for name, tensor in module.state_dict().items():
                out[f"model.layers.{i}.{prefix}.{name}"] = tensor
    return out


def copied_file_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every tensor `save_hf(model, ..., "copied")` writes to model.safetensors.

    transformers saves each expert of a fused bank (gate_up_proj [E, 2F, D], down_proj [E, D, F]) as its own
    gate_proj / up_proj ([F, D]) and down_proj ([D, F]) weight, and drops lm_head when tied to the embedding.
    Reading a file against this names a missing or misshaped expert tensor, which transformers' weight
    conversion only reports as a failed conversion.
    """
    shapes: dict[str, list[int]] = {}
    for name, tensor in _hf_tensors(model).items():
        bank, _, kind = name.rpartition(".")
        if bank.endswith("mlp.experts") and kind == "gate_up_proj":
            n_experts, two_f, d_model = tensor.shape
            for e in range(n_experts):
                shapes |= {f"{bank}.{e}.{proj}.weight": [two_f // 2, d_model] for proj in ("gate_proj", "up_proj")}
        elif bank.endswith("mlp.experts") and kind == "down_proj":
            n_experts, d_model, ffn = tensor.shape
            shapes |= {f"{bank}.{e}.down_proj.weight": [d_model, ffn] for e in range(n_experts)}
        else:
            shapes[name] = list(tensor.shape)
    if model.config.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def set_generation_tokens(hf_model: nn.Module, token_ids: dict[str, int] | None) -> None:
    """Greedy `generate` stops at eos only if generation_config (saved as generation_config.json) has it."""
    for name, value in (token_ids or {}).items():
        setattr(hf_model.generation_config, name, value)


def to_hf_model(model: nn.Module, attn_implementation: str = "eager",
                token_ids: dict[str, int] | None = None) -> nn.Module:
    """A transformers CausalLM holding `model`'s weights (untied), in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    hf_cfg = to_hf_config(model.config, token_ids)
    hf_cfg._attn_implementation = attn_implementation
    hf_model = AutoModelForCausalLM.from_config(hf_cfg)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    set_generation_tokens(hf_model, token_ids)
    return hf_model.eval()


def tied_weight_map(model: nn.Module) -> dict[str, str]:
    """HF name of every follower tensor -> its leader's, from the layer plan (experts, router, attention)."""
    tied: dict[str, str] = {}
    for layer in model.model.layers:
        i, plan = layer.plan.index, layer.plan
        owners = {"self_attn": (plan.attention_owner, layer.self_attn)}
        if plan.ffn == "moe":
            owners |= {"mlp.experts": (plan.expert_owner, layer.mlp.experts), "mlp.gate": (plan.router_owner, layer.mlp.gate)}
        for prefix, (owner, module) in owners.items():
            if owner != i:
                tied |= {f"model.layers.{i}.{prefix}.{n}": f"model.layers.{owner}.{prefix}.{n}" for n in module.state_dict()}
    return tied


def to_hf_tied_model(model: nn.Module, attn_implementation: str = "eager",
                     token_ids: dict[str, int] | None = None) -> nn.Module:
    """The tied-layout CausalLM: like `to_hf_model`, with each follower tensor the leader's Parameter."""
    from models import hf_modeling_tiedmoe

    hf_cfg = to_hf_config(model.config, token_ids, tied=True)
    config_class, model_class = TIED_CLASSES[type(hf_cfg).__mro__[1].model_type]
    hf_cfg.tied_weights = tied_weight_map(model)
    hf_cfg.auto_map = {"AutoConfig": f"{TIED_MODELING_FILE[:-3]}.{config_class}",
                       "AutoModelForCausalLM": f"{TIED_MODELING_FILE[:-3]}.{model_class}"}
    hf_cfg._attn_implementation = attn_implementation
    hf_model = getattr(hf_modeling_tiedmoe, model_class)(hf_cfg)
    hf_model.tie_weights()
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    set_generation_tokens(hf_model, token_ids)
    return hf_model.eval()


def default_layout(cfg: ModelConfig) -> Layout:
    """Tied runs get the tied layout (their memory saving survives export); untied ones plain HF classes."""
    return "tied" if any(p.is_tied_follower or p.attention_owner != p.index for p in layer_plan(cfg)) else "copied"


def save_hf(model: nn.Module, out_dir: str | Path, layout: Layout,
            token_ids: dict[str, int] | None = None) -> nn.Module:
    """Write `model` as a transformers directory in `layout`; returns the HF model that was saved."""
    out_dir = Path(out_dir)
    if layout == "tied":
        hf_model = to_hf_tied_model(model, token_ids=token_ids)
        hf_model.save_pretrained(str(out_dir))
        shutil.copyfile(TIED_MODELING_SOURCE, out_dir / TIED_MODELING_FILE)
    else:
        hf_model = to_hf_model(model, token_ids=token_ids)
        hf_model.save_pretrained(str(out_dir))
    return hf_model
