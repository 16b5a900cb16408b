"""Routing health and tie-group agreement against hand-computed values."""

import pytest
import torch

from models.config import from_preset, layer_plan
from trainer.routing_stats import routing_stats


def _one_hot_logits(choices: list[list[int]], n_experts: int) -> torch.Tensor:
    """Logits whose top-k per token is exactly `choices[token]` (descending preference)."""
    logits = torch.zeros(len(choices), n_experts)
    for t, picks in enumerate(choices):
        for rank, e in enumerate(picks):
            logits[t, e] = 10.0 - rank
    return logits


def test_balanced_and_collapsed_layers_and_agreement() -> None:
    cfg = from_preset("olmoe_tiny", tie_group_size=2)  # 8 experts top-2; groups [2,3] [4,5]
    plan = layer_plan(cfg)
    balanced = _one_hot_logits([[0, 1], [2, 3], [4, 5], [6, 7]], 8)  # every expert exactly once
    collapsed = _one_hot_logits([[0, 1]] * 4, 8)  # experts 0 and 1 take everything
    shifted = _one_hot_logits([[2, 3], [4, 5], [6, 7], [0, 1]], 8)  # balanced, but disjoint from `balanced`
    half = _one_hot_logits([[0, 7], [2, 6], [4, 1], [6, 3]], 8)  # shares one expert per token with `balanced`
    logits = [balanced, collapsed, balanced, shifted, balanced, half, balanced, balanced]
    stats = routing_stats(logits, 2, plan)
    assert stats["layer00/max_load"] == pytest.approx(1.0)
    assert stats["layer00/unused_share"] == 0.0
    assert stats["layer00/entropy"] == pytest.approx(1.0)
    assert stats["layer01/max_load"] == pytest.approx(4.0)  # share 1/2 of assignments x 8 experts
    assert stats["layer01/unused_share"] == pytest.approx(6 / 8)
    assert stats["layer01/entropy"] == pytest.approx(1 / 3)  # log 2 / log 8
    assert stats["tie_group02/agreement"] == pytest.approx(0.0)  # layers 2 and 3: disjoint choices
    assert stats["tie_group04/agreement"] == pytest.approx(0.5)  # layers 4 and 5: one of two shared
    assert stats["mean/tie_agreement"] == pytest.approx(0.25)
    assert "tie_group00/agreement" not in stats  # untied layers form no group


def test_mismatched_logits_count_gives_no_stats() -> None:
    plan = layer_plan(from_preset("olmoe_tiny"))
    assert routing_stats([torch.zeros(4, 8)], 2, plan) == {}
