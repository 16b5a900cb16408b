"""Routing health per MoE layer and routing agreement inside tie groups, from one step's router logits.

- `max_load`: the busiest expert's share of assignments times E (1.0 = perfectly balanced; E = all
  tokens on one expert). `unused_share`: share of the E experts that got no token on this rank (the
  logs average it over ranks). `entropy`: entropy of the load distribution over log(E) (1.0 = uniform).
- `agreement` of a tie group: mean over tokens and consecutive layer pairs of |topk_a ∩ topk_b| / k,
  i.e. how often layers sharing a bank send a token to the same experts (k/E would be chance).
"""

from __future__ import annotations

import math

import torch

from models.config import LayerPlan


@torch.no_grad()
def routing_stats(router_logits: list[torch.Tensor], top_k: int, plan: list[LayerPlan]) -> dict[str, float]:
    moe = [p for p in plan if p.ffn == "moe"]
    if len(router_logits) != len(moe):
        return {}
    stats: dict[str, float] = {}
    top_sets: dict[int, torch.Tensor] = {}
    for p, logits in zip(moe, router_logits):
        n_experts = logits.shape[-1]
        top_TK = torch.topk(logits.float(), top_k, dim=-1).indices
        top_sets[p.index] = top_TK
        load_E = torch.bincount(top_TK.reshape(-1), minlength=n_experts).float() / top_TK.numel()
        nonzero = load_E[load_E > 0]
        stats[f"layer{p.index:02d}/max_load"] = float(load_E.max() * n_experts)
        stats[f"layer{p.index:02d}/unused_share"] = float((load_E == 0).float().mean())
        stats[f"layer{p.index:02d}/entropy"] = float(-(nonzero * nonzero.log()).sum() / math.log(n_experts))
    groups: dict[int, list[int]] = {}
    for p in moe:
        groups.setdefault(p.expert_owner, []).append(p.index)
    agreements = []
    for leader, members in groups.items():
        if len(members) < 2:
            continue
        pair_scores = []
        for a, b in zip(members, members[1:]):
            same_TKK = top_sets[a].unsqueeze(-1) == top_sets[b].unsqueeze(-2)
            pair_scores.append(same_TKK.any(-1).float().sum(-1).mean() / top_k)
        stats[f"tie_group{leader:02d}/agreement"] = float(torch.stack(pair_scores).mean())
        agreements.append(stats[f"tie_group{leader:02d}/agreement"])
    stats["mean/max_load"] = sum(stats[f"layer{p.index:02d}/max_load"] for p in moe) / len(moe)
    if agreements:
        stats["mean/tie_agreement"] = sum(agreements) / len(agreements)
    return stats
