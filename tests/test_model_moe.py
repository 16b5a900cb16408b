"""MoE block and router losses against explicit formulas (CPU, fp32).

Backward passes use `(out * g).sum()` with a random g: torch._grouped_mm's backward rejects the
expanded stride-0 gradient that `out.sum()` produces (see shared/DEEPSPEED_NOTES.md, MoE kernels).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.config import from_preset
from models.moe import Experts, MoEBlock, experts_grouped, experts_loop
from models.transformer import build_model
from trainer.losses import RouterTap, load_balancing_loss, training_loss, z_loss

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")

T, D, E, F_, K = 24, 16, 8, 12, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _experts(seed: int = 0) -> Experts:
    experts = Experts(E, D, F_)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * F_, D, generator=_gen(seed)) / math.sqrt(D))
        experts.down_proj.copy_(torch.randn(E, D, F_, generator=_gen(seed + 1)) / math.sqrt(F_))
    return experts


def _swiglu_expert(x_D: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert on one token, written out: down @ (silu(gate @ x) * (up @ x)); gate rows come first."""
    gate, up = w_gate_up[:F_] @ x_D, w_gate_up[F_:] @ x_D
    return w_down @ (F.silu(gate) * up)


# --- grouped GEMM == per-expert loop ------------------------------------------------------------

@needs_grouped_mm
def test_grouped_mm_equals_loop_with_empty_experts() -> None:
    """Outputs and all gradients agree; experts 0, 3 and 7 (first, middle, last) receive no token."""
    used = torch.tensor([1, 2, 4, 5, 6])
    top_idx = used[torch.stack([torch.randperm(len(used), generator=_gen(t))[:K] for t in range(T)])]
    top_w = torch.rand(T, K, generator=_gen(2))
    x = torch.randn(T, D, generator=_gen(3))
    g = torch.randn(T, D, generator=_gen(4))
    results = []
    for grouped in (True, False):
        experts = _experts()
        experts.use_grouped_mm = grouped
        x_, w_ = x.clone().requires_grad_(), top_w.clone().requires_grad_()
        out = experts(x_, top_idx, w_)
        (out * g).sum().backward()
        results.append((out, x_.grad, w_.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
    for grouped_t, loop_t in zip(*results):
        torch.testing.assert_close(grouped_t, loop_t, atol=1e-5, rtol=1e-5)
    gate_up_grad, down_grad = results[0][3], results[0][4]
    for e in (0, 3, 7):
        assert torch.count_nonzero(gate_up_grad[e]) == 0 and torch.count_nonzero(down_grad[e]) == 0
    assert torch.count_nonzero(gate_up_grad[1]) > 0


@needs_grouped_mm
def test_kernels_agree_on_presorted_rows() -> None:
    counts = torch.tensor([0, 5, 0, 0, 7, 1, 3, 0])
    x = torch.randn(int(counts.sum()), D, generator=_gen(5))
    experts = _experts()
    torch.testing.assert_close(experts_grouped(x, counts, experts.gate_up_proj, experts.down_proj),
                               experts_loop(x, counts, experts.gate_up_proj, experts.down_proj),
                               atol=1e-5, rtol=1e-5)


def test_experts_equal_per_token_sum() -> None:
    """Experts(x, idx, w)[t] == sum_k w[t, k] * expert_{idx[t, k]}(x[t]), independent of the kernel."""
    experts = _experts()
    x = torch.randn(T, D, generator=_gen(6))
    top_idx = torch.randint(0, E, (T, K), generator=_gen(7))
    top_w = torch.rand(T, K, generator=_gen(8))
    expected = torch.stack([
        sum(top_w[t, k] * _swiglu_expert(x[t], experts.gate_up_proj[e], experts.down_proj[e])
            for k, e in enumerate(top_idx[t].tolist()))
        for t in range(T)])
    for grouped in (True, False):
        experts.use_grouped_mm = grouped and hasattr(torch, "_grouped_mm")
        torch.testing.assert_close(experts(x, top_idx, top_w), expected, atol=1e-5, rtol=1e-5)


# --- routing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_routing_equals_explicit_softmax_topk(norm_topk_prob: bool) -> None:
    block = MoEBlock(D, E, K, F_, norm_topk_prob)
    x = torch.randn(T, D, generator=_gen(9))
    top_idx, top_w = block.route(x)
    logits = (x @ block.gate.weight.T).double()
    probs = logits.exp() / logits.exp().sum(-1, keepdim=True)
    for t in range(T):
        ranked = sorted(range(E), key=lambda e: -probs[t, e].item())[:K]
        assert top_idx[t].tolist() == ranked
        weights = probs[t, ranked]
        if norm_topk_prob:
            weights = weights / weights.sum()
        torch.testing.assert_close(top_w[t].double(), weights, atol=1e-6, rtol=1e-6)
    if norm_topk_prob:
        torch.testing.assert_close(top_w.sum(-1), torch.ones(T))
    else:
        assert (top_w.sum(-1) < 1).all()


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_block_equals_per_token_reference(norm_topk_prob: bool) -> None:
    block = MoEBlock(D, E, K, F_, norm_topk_prob)
    with torch.no_grad():
        block.gate.weight.normal_(generator=_gen(10))
        block.experts.gate_up_proj.copy_(_experts().gate_up_proj)
        block.experts.down_proj.copy_(_experts().down_proj)
    x_BSD = torch.randn(2, T // 2, D, generator=_gen(11))
    x_TD = x_BSD.reshape(T, D)
    probs = F.softmax(x_TD @ block.gate.weight.T, dim=-1)
    expected = []
    for t in range(T):
        w, idx = probs[t].topk(K)
        w = w / w.sum() if norm_topk_prob else w
        expected.append(sum(w[k] * _swiglu_expert(x_TD[t], block.experts.gate_up_proj[e], block.experts.down_proj[e])
                            for k, e in enumerate(idx.tolist())))
    torch.testing.assert_close(block(x_BSD), torch.stack(expected).view_as(x_BSD), atol=1e-5, rtol=1e-5)


# --- router losses --------------------------------------------------------------------------------

def _explicit_lb(logits: torch.Tensor, top_k: int) -> float:
    """E * sum_i f_i P_i with f_i = (assignments to i) / (T * K), P_i = mean over tokens of p_i."""
    n_tokens, n_exp = logits.shape
    probs = [[math.exp(v) for v in row] for row in logits.tolist()]
    probs = [[p / sum(row) for p in row] for row in probs]
    counts = [0] * n_exp
    for row in probs:
        for e in sorted(range(n_exp), key=lambda i: -row[i])[:top_k]:
            counts[e] += 1
    return n_exp * sum(counts[e] / (n_tokens * top_k) * sum(row[e] for row in probs) / n_tokens
                       for e in range(n_exp))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_equals_formula(top_k: int) -> None:
    logits = 2 * torch.randn(T, E, generator=_gen(12))
    assert load_balancing_loss(logits, top_k).item() == pytest.approx(_explicit_lb(logits, top_k), rel=1e-5)


def test_load_balancing_loss_hand_values() -> None:
    assert load_balancing_loss(torch.zeros(T, E), K).item() == pytest.approx(1.0, abs=1e-6)  # uniform
    # Every token sends everything to expert 0 (p0 = 0.9, p1 = 0.1): E * f0 * P0 = 2 * 1 * 0.9.
    logits = torch.tensor([[math.log(9.0), 0.0]]).repeat(5, 1)
    assert load_balancing_loss(logits, 1).item() == pytest.approx(1.8, rel=1e-6)
    # Perfect balance with confident routing: half the tokens to each expert.
    balanced = torch.tensor([[math.log(9.0), 0.0], [0.0, math.log(9.0)]]).repeat(3, 1)
    assert load_balancing_loss(balanced, 1).item() == pytest.approx(1.0, rel=1e-6)


def test_z_loss_equals_formula() -> None:
    logits = 3 * torch.randn(T, E, generator=_gen(13))
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    assert z_loss(torch.zeros(T, E)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_training_loss_combines_parts() -> None:
    logits = torch.randn(2, 5, 11, generator=_gen(14))
    labels = torch.randint(0, 11, (2, 5), generator=_gen(15))
    routers = [torch.randn(10, E, generator=_gen(16 + i)) for i in range(3)]
    parts = training_loss(logits, labels, routers, top_k=K, lb_coef=0.01, z_coef=0.001)
    ce = F.cross_entropy(logits.reshape(10, 11), labels.reshape(10))
    lb = sum(_explicit_lb(r, K) for r in routers) / 3
    z = sum(z_loss(r).item() for r in routers) / 3
    assert parts.ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts.lb.item() == pytest.approx(lb, rel=1e-5)
    assert parts.total.item() == pytest.approx(ce.item() + 0.01 * lb + 0.001 * z, rel=1e-6)


# --- RouterTap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,overrides,n_moe,n_routers", [
    ("olmoe_tiny", {}, 8, 8),
    ("olmoe_tiny", dict(tie_group_size=2), 8, 8),  # tied experts, own routers
    ("olmoe_tiny", dict(tie_group_size=2, tie_router=True), 8, 6),  # groups [2, 3], [4, 5]
    ("deepseek_moe_tiny", dict(tie_group_size=3, tie_router=True), 7, 5),  # dense layer 0; group [3, 4, 5]
])
def test_router_tap_one_logits_per_moe_layer(preset: str, overrides: dict, n_moe: int, n_routers: int) -> None:
    model = build_model(from_preset(preset, **overrides))
    tap = RouterTap(model)
    assert len(tap._handles) == n_routers  # a tied router is hooked once ...
    mlp_inputs = []
    moe_layers = [layer for layer in model.model.layers if layer.plan.ffn == "moe"]
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: mlp_inputs.append(args[0])) for layer in moe_layers]
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=_gen(17))
    model(ids)
    for hook in hooks:
        hook.remove()
    logits = tap.take()
    assert len(logits) == n_moe  # ... and fires at every use, in layer order
    for layer, x, lg in zip(moe_layers, mlp_inputs, logits):
        assert lg.shape == (16, layer.plan.n_experts)
        torch.testing.assert_close(lg, F.linear(x.reshape(16, -1), layer.mlp.gate.weight))
    assert tap.take() == []
    tap.remove()
    model(ids)
    assert tap.logits == []
