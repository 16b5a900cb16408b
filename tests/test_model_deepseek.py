"""DeepSeek-MoE style (dense first layers + always-on shared experts) against a by-hand reference.

HF has no class for this layout, so each layer's MLP is recomputed here from its weights with plain
per-token loops and compared with what the model's modules produced inside a full forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.config import from_preset
from models.moe import MoEBlock, SwiGLU
from models.transformer import MoETransformer, build_model


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if param.ndim == 1 else noise / math.sqrt(param.shape[-1]))


def dense_swiglu(x_D: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return w_down @ (F.silu(w_gate @ x_D) * (w_up @ x_D))


def reference_mlp(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU for dense layers; for MoE layers softmax -> top-k -> loop over the chosen experts, plus
    the shared expert, one token at a time."""
    mlp = layer.mlp
    out = []
    for x in x_TD:
        if layer.plan.ffn == "dense":
            out.append(dense_swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
            continue
        probs = torch.softmax(mlp.gate.weight @ x, dim=-1)
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:mlp.top_k]
        weights = probs[chosen] / probs[chosen].sum() if mlp.norm_topk_prob else probs[chosen]
        ffn = mlp.experts.down_proj.shape[-1]
        y = sum(w * dense_swiglu(x, mlp.experts.gate_up_proj[e, :ffn], mlp.experts.gate_up_proj[e, ffn:],
                                 mlp.experts.down_proj[e])
                for w, e in zip(weights, chosen))
        shared = mlp.shared_expert
        out.append(y + dense_swiglu(x, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight))
    return torch.stack(out)


def mlp_inputs_outputs(model: MoETransformer, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("overrides", [
    {},
    dict(norm_topk_prob=True, first_k_dense=2, n_shared_experts=2),
    dict(tie_group_size=2),  # groups [3, 4], [5]: shared experts stay per layer, the routed bank is tied
], ids=["preset", "renorm_two_dense_two_shared", "tied"])
def test_every_layer_matches_by_hand_reference(overrides: dict) -> None:
    cfg = from_preset("deepseek_moe_tiny", **overrides)
    model = build_model(cfg).eval()
    randomize(model)
    layers = model.model.layers
    for layer in layers:
        if layer.plan.index < cfg.first_k_dense:
            assert isinstance(layer.mlp, SwiGLU) and layer.mlp.gate_proj.out_features == cfg.dense_ffn_dim
        else:
            assert isinstance(layer.mlp, MoEBlock)
            assert layer.mlp.shared_expert.gate_proj.out_features == cfg.n_shared_experts * cfg.shared_expert_ffn_dim
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = mlp_inputs_outputs(model, ids)
    assert len(seen) == cfg.n_layers
    for layer, (x_BSD, out_BSD) in zip(layers, seen):
        assert out_BSD.abs().max() > 0.1
        expected = reference_mlp(layer, x_BSD.reshape(-1, cfg.d_model)).view_as(out_BSD)
        torch.testing.assert_close(out_BSD, expected, atol=1e-5, rtol=1e-5)


def test_shared_expert_is_always_on_and_untied() -> None:
    model = build_model(from_preset("deepseek_moe_tiny", tie_group_size=2))
    layers = model.model.layers
    assert layers[4].mlp.experts is layers[3].mlp.experts
    assert layers[4].mlp.shared_expert is not layers[3].mlp.shared_expert
    # Zeroing the routed experts leaves exactly the shared expert's output.
    block = layers[1].mlp
    with torch.no_grad():
        block.experts.down_proj.zero_()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(block(x), block.shared_expert(x))
