"""Training losses: cross-entropy plus the router's load-balancing and z-losses, all in fp32.

The router logits come from forward hooks on every router `gate` Linear (`RouterTap`), so the same
code serves the plain model and DeepSpeed AutoEP's replacement blocks (which compute no aux loss).
A tied router is called by several layers; its hook fires once per use, in layer order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def load_balancing_loss(logits_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch/OLMoE): f_i = share of the T*K assignments routed to expert i,
    P_i = mean router probability of expert i. Equals 1 under perfectly uniform routing."""
    logits_TE = logits_TE.float()
    n_experts = logits_TE.shape[-1]
    probs_TE = F.softmax(logits_TE, dim=-1)
    top_idx_TK = torch.topk(probs_TE, top_k, dim=-1).indices
    counts_E = torch.zeros(n_experts, device=logits_TE.device).index_add_(
        0, top_idx_TK.reshape(-1), torch.ones(top_idx_TK.numel(), device=logits_TE.device))
    f_E = counts_E / top_idx_TK.numel()
    return n_experts * torch.sum(f_E * probs_TE.mean(dim=0))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


class RouterTap:
    """Collects each MoE layer's router logits during forward via hooks on the router Linears."""

    def __init__(self, model: nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self._handles = []
        # A new forward starts a new list: activation checkpointing re-runs the routers during
        # backward, and those recomputed logits must not leak into the next step's loss.
        self._reset_handle = getattr(model, "module", model).register_forward_pre_hook(self._reset)
        seen: set[int] = set()
        for layer in _decoder_layers(model):
            router = _router_linear(layer.mlp)
            if router is not None and id(router) not in seen:
                seen.add(id(router))
                self._handles.append(router.register_forward_hook(self._record))

    def _reset(self, _module: nn.Module, _inputs: tuple) -> None:
        self.logits = []

    def _record(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.logits.append(output)

    def take(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self) -> None:
        self._reset_handle.remove()
        for handle in self._handles:
            handle.remove()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    module = getattr(model, "module", model)  # DeepSpeed engine or plain model
    return list(module.model.layers)


def _router_linear(mlp: nn.Module) -> nn.Linear | None:
    router = getattr(mlp, "router", None)  # AutoEP block: router.gate
    gate = getattr(router, "gate", None) if router is not None else getattr(mlp, "gate", None)
    return gate if isinstance(gate, nn.Linear) else None


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    lb: torch.Tensor
    z: torch.Tensor


def training_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, router_logits: list[torch.Tensor],
                  top_k: int, lb_coef: float, z_coef: float) -> LossParts:
    """CE + lb_coef * mean_layers(load balancing) + z_coef * mean_layers(z-loss), as the paper's code."""
    ce = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1))
    zero = ce.new_zeros(())
    if router_logits:
        lb = torch.stack([load_balancing_loss(lg, top_k) for lg in router_logits]).mean()
        z = torch.stack([z_loss(lg) for lg in router_logits]).mean()
    else:
        lb, z = zero, zero
    return LossParts(total=ce + lb_coef * lb + z_coef * z, ce=ce.detach(), lb=lb.detach(), z=z.detach())
