"""model.init: the default N(0, init_std) is unchanged; `paper` is depth-scaled Xavier per matrix and per expert."""

import math

import pytest
import torch

from models.config import ModelConfig, from_preset
from models.transformer import PIECE, Normal, _pieces_draw_like_whole, build_model, draw_in_pieces


def test_default_init_is_normal_and_unchanged():
    assert ModelConfig.__dataclass_fields__["init"].default == "normal"
    cfg = from_preset("olmoe_tiny", tie_group_size=2)
    model = build_model(cfg, seed=0)
    # Golden values of the N(0, 0.02) init (seed 0), taken before `init` existed: a change here would move
    # every existing result.
    assert model.model.embed_tokens.weight[0, :3].tolist() == [-0.03889472410082817, 0.002053593285381794,
                                                               0.03613493964076042]
    assert model.model.layers[2].mlp.experts.down_proj.double().sum().item() == pytest.approx(-3.6452924779614477,
                                                                                               abs=1e-9)


def _bound(fan_in: int, fan_out: int, n_layers: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(3 * n_layers)


def test_paper_init_is_depth_scaled_xavier_per_matrix_and_per_expert():
    cfg = from_preset("olmoe_tiny", tie_group_size=2, init="paper", n_experts=16)
    model = build_model(cfg, seed=0)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        matrices = [p] if p.ndim == 2 else list(p)  # a bank: one [out, in] matrix per expert
        for m in matrices:
            bound = _bound(m.shape[1], m.shape[0], cfg.n_layers)
            assert m.abs().max() <= bound + 1e-7, name
            assert m.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name  # uniform(-b, b)
        if p.ndim == 3:
            assert not torch.equal(p[0], p[1]), name
    deeper = build_model(from_preset("olmoe_tiny", init="paper", n_layers=32), seed=0)
    ratio = model.model.layers[0].self_attn.q_proj.weight.std() / deeper.model.layers[0].self_attn.q_proj.weight.std()
    assert ratio.item() == pytest.approx(2.0, rel=0.05)  # gain 1/sqrt(3L): 4x the depth, half the scale


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match=r"model.init='xavier': expected one of 'normal', 'paper'"):
        from_preset("olmoe_tiny", init="xavier")


@pytest.mark.parametrize("fill", [Normal(0.02), torch.Tensor.uniform_, torch.Tensor.normal_], ids=["Normal", "uniform_",
                                                                                                    "normal_"])
@pytest.mark.parametrize("numel,n_pieces", [(5, 1), (17, 1), (2 * PIECE, 2), (2 * PIECE + 7, 2), (2 * PIECE + 20, 3)])
def test_a_piecewise_draw_equals_the_whole_draw_and_leaves_the_stream_where_it_did(fill, numel: int,
                                                                                   n_pieces: int) -> None:
    # The partitioned build draws large tensors piece by piece (tail pieces shorter than 16 merged, where
    # normal_ switches algorithm); the weights and every later draw must be those of the whole draw.
    torch.manual_seed(7)
    whole = torch.empty(numel)
    fill(whole)
    after_whole = torch.rand(3)
    torch.manual_seed(7)
    pieces = list(draw_in_pieces(numel, fill))
    after_pieces = torch.rand(3)
    assert len(pieces) == n_pieces and [at for at, _ in pieces][0] == 0
    assert torch.equal(torch.cat([p for _, p in pieces]), whole)
    assert torch.equal(after_pieces, after_whole)


def test_the_piecewise_check_catches_a_fill_whose_pieces_differ() -> None:
    # Negative control for the run-time check: a fill that depends on its tensor's length is drawn whole.
    def length_dependent(t: torch.Tensor) -> None:
        t.normal_(0.0, 1.0 / t.numel())

    assert not _pieces_draw_like_whole(length_dependent)
    assert len(list(draw_in_pieces(2 * PIECE + 20, length_dependent))) == 1
