"""Expert tying: followers run their leader's very modules, and the shared tensors' gradients are the sum
of what each layer of the group would contribute in an untied copy (CPU, fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.config import from_dict, from_preset, layer_plan, plan_notes, tie_groups
from models.transformer import MoETransformer, build_model

# Module paths of a layer, resolved by attribute so borrowed (tied) modules are found too.
MOE_PATHS = ["input_layernorm", "post_attention_layernorm", "self_attn", "mlp.gate", "mlp.experts"]
OUTSIDE = ["model.embed_tokens", "model.norm", "lm_head"]


def resolve(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def used_modules(model: MoETransformer) -> list[tuple[str, nn.Module]]:
    """(path, module) for every module use: outside the layers once, each layer's modules per layer."""
    uses = [(path, resolve(model, path)) for path in OUTSIDE]
    for i, layer in enumerate(model.model.layers):
        paths = MOE_PATHS if layer.plan.ffn == "moe" else MOE_PATHS[:3] + ["mlp"]
        uses += [(f"model.layers.{i}.{path}", resolve(layer, path)) for path in paths]
    return uses


def untied_copy(tied: MoETransformer) -> MoETransformer:
    """An untied model whose every layer holds a copy of the modules the tied model's layer uses."""
    cfg = from_dict({**tied.config.to_dict(), "tie_group_size": 1, "tie_groups": None, "tie_router": False,
                     "tie_attention": False})
    untied = build_model(cfg, seed=123)
    tied_uses = dict(used_modules(tied))
    for path, module in used_modules(untied):
        module.load_state_dict(tied_uses[path].state_dict())
    return untied


def randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if param.ndim == 1 else noise / math.sqrt(param.shape[-1]))


# --- identity: one module, one set of tensors -----------------------------------------------------

def test_followers_use_the_leaders_objects() -> None:
    model = build_model(from_preset("olmoe_tiny", tie_group_size=2))  # groups [2, 3], [4, 5]
    layers = model.model.layers
    assert tie_groups(model.config) == [[0], [1], [2, 3], [4, 5], [6], [7]]
    assert layers[3].mlp.experts is layers[2].mlp.experts
    assert layers[5].mlp.experts is layers[4].mlp.experts
    assert layers[4].mlp.experts is not layers[2].mlp.experts
    assert layers[3].mlp.gate is not layers[2].mlp.gate  # routers and attention stay per layer
    assert layers[3].self_attn is not layers[2].self_attn

    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)  # each tied tensor yielded once
    assert sum(p is layers[2].mlp.experts.gate_up_proj for p in params) == 1
    keys = set(model.state_dict())
    assert "model.layers.2.mlp.experts.gate_up_proj" in keys
    for follower in (3, 5):
        assert not any(k.startswith(f"model.layers.{follower}.mlp.experts.") for k in keys)
        assert f"model.layers.{follower}.mlp.gate.weight" in keys
    untied_params = sum(p.numel() for p in build_model(from_preset("olmoe_tiny")).parameters())
    bank = layers[2].mlp.experts.gate_up_proj.numel() + layers[2].mlp.experts.down_proj.numel()
    assert sum(p.numel() for p in params) == untied_params - 2 * bank


def test_tie_router_and_attention_share_modules() -> None:
    model = build_model(from_preset("olmoe_tiny", tie_group_size=3, tie_router=True, tie_attention=True))
    layers = model.model.layers  # group [2, 3, 4]; layer 5 is a short group of one
    for follower in (3, 4):
        assert layers[follower].mlp.gate is layers[2].mlp.gate
        assert layers[follower].self_attn is layers[2].self_attn
        assert layers[follower].input_layernorm is not layers[2].input_layernorm  # norms stay per layer
    assert layers[5].mlp.experts is not layers[2].mlp.experts
    keys = set(model.state_dict())
    assert not any(k.startswith(("model.layers.3.self_attn.", "model.layers.3.mlp.")) for k in keys)
    assert "model.layers.3.input_layernorm.weight" in keys


# --- gradients: tied grad == sum of the untied group's grads --------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(tie_group_size=2),
    dict(tie_group_size=2, tie_router=True),
    dict(tie_group_size=3, tie_attention=True),
    dict(tie_groups=[[1, 2, 3, 4]], tie_router=True, tie_attention=True),
], ids=["experts", "router", "attention", "explicit_all"])
def test_tied_grads_are_sums_of_untied_layer_grads(overrides: dict) -> None:
    tied = build_model(from_preset("olmoe_tiny", **overrides))
    randomize(tied)
    untied = untied_copy(tied)
    ids = torch.randint(0, tied.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits_tied = tied(ids)
    g = torch.randn(logits_tied.shape, generator=torch.Generator().manual_seed(1))
    (logits_tied * g).sum().backward()
    logits_untied = untied(ids)
    (logits_untied * g).sum().backward()
    torch.testing.assert_close(logits_tied, logits_untied, atol=1e-5, rtol=1e-5)

    expected: dict[int, torch.Tensor] = {}  # id(tied parameter) -> sum of its untied copies' grads
    untied_uses = dict(used_modules(untied))
    for path, module in used_modules(tied):
        for (name, p_tied), (_, p_untied) in zip(module.named_parameters(), untied_uses[path].named_parameters()):
            expected[id(p_tied)] = expected.get(id(p_tied), 0) + p_untied.grad
    for name, param in tied.named_parameters():
        assert id(param) in expected, name
        torch.testing.assert_close(param.grad, expected[id(param)], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")

    # And the sum is genuine: a leader's grad differs from its own layer's untied grad alone.
    lead, follower = [g for g in tie_groups(tied.config) if len(g) > 1][0][:2]
    lead_grad = tied.model.layers[lead].mlp.experts.gate_up_proj.grad
    own = untied.model.layers[lead].mlp.experts.gate_up_proj.grad
    other = untied.model.layers[follower].mlp.experts.gate_up_proj.grad
    assert not torch.allclose(lead_grad, own, atol=1e-5) and other.abs().max() > 1e-4


# --- layout: widening, explicit groups, short groups ----------------------------------------------

def test_widen_factor_widens_only_tied_layers() -> None:
    model = build_model(from_preset("olmoe_tiny", tie_group_size=2, widen_factor=2))
    for layer in model.model.layers:
        n = 16 if layer.plan.index in (2, 3, 4, 5) else 8
        assert layer.plan.n_experts == n
        assert layer.mlp.experts.num_experts == n
        assert layer.mlp.experts.gate_up_proj.shape == (n, 64, 64)
        assert layer.mlp.gate.out_features == n
    assert model.model.layers[3].mlp.experts is model.model.layers[2].mlp.experts
    ids = torch.randint(0, 8192, (1, 8))
    assert model(ids).shape == (1, 8, 8192)


def test_explicit_tie_groups() -> None:
    cfg = from_preset("olmoe_tiny", tie_groups=[[1, 2, 3], [5, 6]], tie_router=True)
    assert tie_groups(cfg) == [[0], [1, 2, 3], [4], [5, 6], [7]]
    plan = layer_plan(cfg)
    assert [p.expert_owner for p in plan] == [0, 1, 1, 1, 4, 5, 5, 7]
    assert [p.router_owner for p in plan] == [0, 1, 1, 1, 4, 5, 5, 7]
    assert [p.attention_owner for p in plan] == list(range(8))
    assert [p.is_tied_follower for p in plan] == [False, False, True, True, False, False, True, False]
    layers = build_model(cfg).model.layers
    assert layers[3].mlp.experts is layers[1].mlp.experts and layers[6].mlp.gate is layers[5].mlp.gate
    assert plan_notes(cfg) == []  # tie_group_size, untied_first/last are ignored


@pytest.mark.parametrize("n_layers,size,groups,short", [
    (9, 3, [[2, 3, 4], [5, 6]], "[5, 6] has 2 layers"),
    (8, 3, [[2, 3, 4]], "[5] has 1 layers"),  # the leftover layer stays untied, and we are told
    (8, 2, [[2, 3], [4, 5]], None),
])
def test_short_last_group_is_allowed_and_noted(n_layers: int, size: int, groups: list, short: str | None) -> None:
    cfg = from_preset("olmoe_tiny", n_layers=n_layers, tie_group_size=size)
    assert [g for g in tie_groups(cfg) if len(g) > 1] == groups
    notes = plan_notes(cfg)
    if short is None:
        assert notes == []
    else:
        assert len(notes) == 1 and short in notes[0] and f"tie_group_size={size}" in notes[0]
    build_model(cfg)


def test_notes_when_tying_does_nothing() -> None:
    cfg = from_preset("olmoe_tiny", n_layers=5, tie_group_size=2, widen_factor=2)
    assert all(len(g) == 1 for g in tie_groups(cfg))
    notes = plan_notes(cfg)
    assert any("no layers are tied" in n for n in notes) and any("widen_factor has no effect" in n for n in notes)


def test_tied_router_or_attention_without_tying_is_noted() -> None:
    """tie_router / tie_attention on an untied model changed nothing without a word (widen_factor was noted)."""
    cfg = from_preset("olmoe_tiny", tie_group_size=1, tie_router=True, tie_attention=True)
    assert plan_notes(cfg) == ["tie_router has no effect: no tied layers", "tie_attention has no effect: no tied layers"]
    assert plan_notes(from_preset("olmoe_tiny", tie_group_size=2, tie_router=True, tie_attention=True)) == []
