"""Logit parity with Hugging Face transformers' OLMoE and Qwen3-MoE (tiny random models, CPU, fp32).

HF is the reference: a difference means our model (or the export in models/hf_convert.py) is wrong.
Weights are re-drawn at a scale where every component matters (norm weights != 1, qkv clipping
active, decisive routing), and rope_theta / norm_eps differ from HF's defaults so a field the export
forgets cannot pass by luck.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.config import from_preset
from models.hf_convert import to_hf_config, to_hf_model, to_hf_state_dict
from models.moe import Experts
from models.transformer import MoETransformer, build_model

B, S = 2, 16
NON_DEFAULT = dict(rope_theta=500.0, norm_eps=1e-3)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """O(1) activations everywhere: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def set_grouped_mm(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, Experts):
            module.use_grouped_mm = enabled and hasattr(torch, "_grouped_mm")


def ours_and_hf(preset: str, grouped_mm: bool = True, **overrides) -> tuple[MoETransformer, nn.Module]:
    model = build_model(from_preset(preset, **overrides)).eval()
    randomize(model)
    set_grouped_mm(model, grouped_mm)
    hf_model = to_hf_model(model, attn_implementation="eager")
    hf_model.config._experts_implementation = "eager"  # HF's own per-expert loop as the reference
    return model, hf_model


def assert_same_logits(model: MoETransformer, hf_model: nn.Module) -> None:
    ids = torch.randint(0, model.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_model(input_ids=ids).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


CASES = {
    # OLMoE: full-width q/k norm, then clip (clip 1.0 so clamping really happens), no renormalisation.
    "olmoe": ("olmoe_tiny", dict(clip_qkv=1.0, **NON_DEFAULT)),
    # Qwen3-MoE: per-head q/k norm, GQA 4 q / 2 kv heads, norm_topk_prob.
    "qwen3_moe": ("qwen3_moe_tiny", dict(NON_DEFAULT)),
    # Qwen3-MoE with head_dim != d_model // n_heads and a dense first layer (HF mlp_only_layers).
    "qwen3_moe_head_dim_dense_first": ("qwen3_moe_tiny", dict(head_dim=32, first_k_dense=1, dense_ffn_dim=48,
                                                              **NON_DEFAULT)),
    "olmoe_tied_embeddings": ("olmoe_tiny", dict(tie_embeddings=True, **NON_DEFAULT)),
}


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_untied_logits_match_hf(case: str, grouped_mm: bool) -> None:
    preset, overrides = CASES[case]
    model, hf_model = ours_and_hf(preset, grouped_mm=grouped_mm, **overrides)
    expected_cls = "OlmoeForCausalLM" if preset.startswith("olmoe") else "Qwen3MoeForCausalLM"
    assert type(hf_model).__name__ == expected_cls
    assert_same_logits(model, hf_model)


@pytest.mark.parametrize("preset,overrides", [
    ("olmoe_tiny", dict(tie_group_size=2, clip_qkv=1.0)),
    ("olmoe_tiny", dict(tie_group_size=2, tie_router=True, tie_attention=True)),
    ("qwen3_moe_tiny", dict(tie_group_size=3, untied_first=1, untied_last=1)),
    ("olmoe_tiny", dict(tie_groups=[[0, 1, 2], [5, 6, 7]], tie_router=True)),
], ids=["olmoe_g2", "olmoe_g2_router_attention", "qwen3_g3", "olmoe_explicit_groups"])
def test_tied_model_exports_as_untied_hf_model(preset: str, overrides: dict) -> None:
    model, hf_model = ours_and_hf(preset, **overrides, **NON_DEFAULT)
    assert any(layer.plan.is_tied_follower for layer in model.model.layers)
    # Followers have no keys of their own in our state_dict, but every layer has them in the export.
    ours_keys, hf_keys = set(model.state_dict()), set(to_hf_state_dict(model))
    assert hf_keys == set(hf_model.state_dict())
    assert ours_keys < hf_keys
    assert_same_logits(model, hf_model)


def test_export_copies_the_leaders_bank_into_followers() -> None:
    model = build_model(from_preset("olmoe_tiny", tie_group_size=2))
    exported = to_hf_state_dict(model)
    lead = exported["model.layers.2.mlp.experts.gate_up_proj"]
    follower = exported["model.layers.3.mlp.experts.gate_up_proj"]
    assert torch.equal(lead, follower)
    assert lead.data_ptr() != follower.data_ptr()  # HF gets independent, untied tensors
    assert not torch.equal(exported["model.layers.1.mlp.experts.gate_up_proj"], lead)


def test_hf_config_carries_the_fields() -> None:
    olmoe = to_hf_config(from_preset("olmoe_tiny", **NON_DEFAULT))
    assert type(olmoe).__name__ == "OlmoeConfig"
    assert (olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.intermediate_size) == (8, 2, 32)
    assert olmoe.rope_parameters["rope_theta"] == 500.0 and olmoe.rms_norm_eps == 1e-3
    assert olmoe.clip_qkv == 8.0 and olmoe.norm_topk_prob is False
    qwen = to_hf_config(from_preset("qwen3_moe_tiny"))
    assert type(qwen).__name__ == "Qwen3MoeConfig"
    assert (qwen.num_key_value_heads, qwen.head_dim, qwen.moe_intermediate_size) == (2, 16, 32)
    assert qwen.norm_topk_prob is True and qwen.mlp_only_layers == []


@pytest.mark.parametrize("preset,overrides,field", [
    ("deepseek_moe_tiny", {}, "n_shared_experts"),
    ("olmoe_tiny", dict(first_k_dense=1, dense_ffn_dim=64), "first_k_dense"),
    ("olmoe_tiny", dict(qk_norm="none"), "qk_norm"),
    ("olmoe_tiny", dict(head_dim=8), "head_dim"),
    ("qwen3_moe_tiny", dict(clip_qkv=8.0), "clip_qkv"),
    ("olmoe_tiny", dict(tie_group_size=2, widen_factor=2), "widen_factor"),
])
def test_hf_cannot_express_raises_naming_the_field(preset: str, overrides: dict, field: str) -> None:
    cfg = from_preset(preset, **overrides)
    with pytest.raises(ValueError, match=f"model.{field}="):
        to_hf_config(cfg)
