"""Optimizer parameter groups and construction, in plain PyTorch.

The DeepSpeed engine and the single-process reference (`trainer.reference`) build their optimizer
here, so both apply the same weight-decay split and the same tied-bank learning-rate scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig, layer_plan
from trainer.config import OptimSection


def tied_lr_multiplier(setting: str | float, group_size: int) -> float:
    """LR scale of a bank shared by `group_size` layers (paper: 1/sqrt(g), since its gradient sums g layers)."""
    if setting == "inv_sqrt_g":
        return 1.0 / math.sqrt(group_size)
    if setting == "none":
        return 1.0
    return float(setting)


def expert_bank_uses(model_cfg: ModelConfig) -> dict[int, int]:
    """Leader layer -> how many layers use its expert bank."""
    uses: dict[int, int] = {}
    for p in layer_plan(model_cfg):
        if p.expert_owner is not None:
            uses[p.expert_owner] = uses.get(p.expert_owner, 0) + 1
    return uses


def expert_owner_of(name: str, uses: dict[int, int]) -> int | None:
    """Layer index if parameter `name` belongs to a bank shared by several layers, else None.

    Names are read after AutoEP replacement too (w1/w2/w3 instead of the fused layout).
    """
    parts = name.split(".")
    if len(parts) > 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp" and parts[4] == "experts":
        layer = int(parts[2])
        return layer if uses.get(layer, 1) > 1 else None
    return None


def param_groups(model: nn.Module, optim: OptimSection, model_cfg: ModelConfig) -> list[dict[str, Any]]:
    """Weight-decay groups (no decay for 1-D tensors) crossed with the tied-bank LR scale."""
    uses = expert_bank_uses(model_cfg)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2
        owner = expert_owner_of(name, uses)
        scale = tied_lr_multiplier(optim.tied_lr_scale, uses[owner]) if owner is not None else 1.0
        key = (decay, scale)
        if key not in groups:
            groups[key] = {"name": f"{'decay' if decay else 'no_decay'}_lr{scale:.4g}", "params": [],
                           "weight_decay": optim.weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection) -> torch.optim.Optimizer:
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    raise ValueError(f"optim.name={optim.name!r}: expected 'adamw' or 'sgd'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Base LR for this step; each group keeps its own scale (tied banks)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
