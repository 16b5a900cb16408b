"""Muon (optim.name=muon): per-expert Newton-Schulz against SVD, the paper's parameter split, AutoEP's
split gate/up tensors stepping exactly like the fused bank, ZeRO-style flat partitions stepping like
whole tensors, state round trip and refused set-ups."""

import math

import pytest
import torch
from helpers import worker_json

from models.transformer import build_model
from trainer.config import load_config
from trainer.optim import (FlatLayout, FlatPiece, MuonWithAdamW, orthogonalize, param_groups, tied_lr_multiplier,
                           uses_muon)

MUON = ["data.source=random", "optim.name=muon", "parallel.ds_config=ds_configs/zero0.json"]


def svd_polar(g: torch.Tensor) -> torch.Tensor:
    """U V^T of each trailing matrix (the exact orthogonalisation Newton-Schulz approximates)."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_approximates_svd_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ortho = orthogonalize(g, steps=5)
    polar = svd_polar(g)
    # Same singular vectors: U^T O V is (nearly) diagonal, with entries in Keller Jordan's (0.5, 1.5) band.
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    core = (u.mT @ ortho.double() @ vh.mT).float()
    diag = core.diagonal()
    assert (core - torch.diag(diag)).abs().max() < 1e-4
    assert diag.min() > 0.5 and diag.max() < 1.5
    assert _rel(ortho, polar) < 0.3
    assert _rel(orthogonalize(g, steps=5), polar) < _rel(orthogonalize(g, steps=1), polar)


def test_each_expert_of_a_bank_is_orthogonalised_on_its_own():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(4, 24, 16, generator=gen)
    bank[2] *= 1000.0  # one expert with a far larger gradient must not shrink the others' updates
    per_expert = orthogonalize(bank, steps=5)
    for e in range(4):
        assert torch.allclose(per_expert[e], orthogonalize(bank[e], steps=5), atol=1e-5)
        assert _rel(per_expert[e], svd_polar(bank[e])) < 0.3
    flattened = orthogonalize(bank, steps=5, per_expert=False)  # the wrong way: one [E*R, C] matrix
    assert _rel(flattened[0], svd_polar(bank[0])) > 0.9


def test_paper_split_muon_for_hidden_matrices_and_experts_adamw_for_the_rest():
    cfg = load_config(None, MUON + ["model.tie_group_size=2"])
    model = build_model(cfg.model_config())
    for name, p in model.named_parameters():
        adam = (p.ndim == 1 or name in ("model.embed_tokens.weight", "lm_head.weight") or ".mlp.gate." in name)
        assert uses_muon(name, p) is not adam, name
    assert uses_muon("model.layers.3.mlp.router.gate.weight", torch.zeros(8, 64)) is False  # AutoEP's router
    assert uses_muon("model.layers.3.mlp.experts.w1", torch.zeros(4, 32, 64)) is True
    groups = param_groups(model, cfg.optim, cfg.model_config())
    by_kind = {(g["use_muon"], round(g["lr_scale"], 6)): g for g in groups}
    assert set(by_kind) == {(True, 1.0), (True, round(1 / math.sqrt(2), 6)), (False, 0.1)}
    assert by_kind[(True, 1.0)]["weight_decay"] == 0.1 and by_kind[(True, 1.0)]["momentum"] == 0.95
    assert by_kind[(True, 1.0)]["nesterov"] is True and by_kind[(True, 1.0)]["ns_steps"] == 5
    assert by_kind[(False, 0.1)]["weight_decay"] == 0.01 and by_kind[(False, 0.1)]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("setting, expected", [("inv_sqrt_g", 0.5), ("inv_g", 0.25), ("none", 1.0), (0.3, 0.3)])
def test_tied_lr_divisor_options(setting, expected):
    assert tied_lr_multiplier(setting, 4) == pytest.approx(expected)


def test_tied_lr_divisor_applies_to_muon_banks():
    cfg = load_config(None, MUON + ["model.tie_group_size=2", "optim.tied_lr_scale=inv_g"])
    model = build_model(cfg.model_config())
    scale = {id(p): g["lr_scale"] for g in param_groups(model, cfg.optim, cfg.model_config()) for p in g["params"]}
    for name, p in model.named_parameters():
        tied = name.startswith(("model.layers.2.mlp.experts.", "model.layers.4.mlp.experts."))
        assert scale[id(p)] == pytest.approx(0.5 if tied else (1.0 if uses_muon(name, p) else 0.1)), name


def _steps(params, grads, row_blocks=()):
    opt = MuonWithAdamW([{"params": params, "use_muon": True, "lr": 0.02, "weight_decay": 0.1, "momentum": 0.95,
                          "nesterov": True, "ns_steps": 5}], lr=0.02, row_blocks=row_blocks)
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    return opt


def test_split_gate_and_up_tensors_step_exactly_like_the_fused_bank():
    """AutoEP's w1 / w3 [E, F, D] paired as a row block follow the model's gate_up_proj [E, 2F, D]."""
    gen = torch.Generator().manual_seed(2)
    fused = torch.nn.Parameter(torch.randn(4, 16, 8, generator=gen))
    w1, w3 = (torch.nn.Parameter(t.clone()) for t in fused.detach().chunk(2, dim=1))
    grads = [torch.randn(4, 16, 8, generator=gen) for _ in range(3)]
    _steps([fused], [[g] for g in grads])
    _steps([w1, w3], [list(g.chunk(2, dim=1)) for g in grads], row_blocks=[[w1, w3]])
    assert torch.allclose(torch.cat([w1, w3], dim=1), fused, atol=1e-6)
    a1, a3 = (torch.nn.Parameter(t.clone()) for t in fused.detach().chunk(2, dim=1))
    _steps([a1, a3], [list(g.chunk(2, dim=1)) for g in grads])  # unpaired: another update
    assert not torch.allclose(torch.cat([a1, a3], dim=1), fused, atol=1e-3)


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(4, 16, 8, generator=gen))
    grads = [torch.randn(4, 16, 8, generator=gen) for _ in range(4)]
    straight = torch.nn.Parameter(w.detach().clone())
    _steps([straight], [[g] for g in grads])
    first = torch.nn.Parameter(w.detach().clone())
    saved = _steps([first], [[g] for g in grads[:2]]).state_dict()
    second = _steps([first], [])
    second.load_state_dict(saved)
    for g in grads[2:]:
        first.grad = g.clone()
        second.step()
    assert torch.equal(first, straight)


def test_flat_partition_without_layout_is_refused():
    flat = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(ValueError, match="optim.name=muon: got a 1-D tensor.*no layout"):
        _steps([flat], [[torch.ones(64)]])


def _partitioned_steps(wholes, grads, ranks, row_blocks=(), per_expert=True):
    """ZeRO-1/2 in miniature: the group's tensors flattened, split into `ranks` equal partitions (cutting
    through experts and tensors), one MuonWithAdamW per simulated rank, each stepping only its partition;
    ranks are threads, `sum_over_ranks` a barrier-synchronised sum. Returns the whole tensors afterwards."""
    import threading

    sizes = [w.numel() for w in wholes]
    total = sum(sizes)
    part = -(-total // ranks)
    full = torch.cat([w.detach().reshape(-1) for w in wholes] + [torch.zeros(part * ranks - total)])
    flats = [torch.nn.Parameter(full[r * part:(r + 1) * part].clone()) for r in range(ranks)]
    barrier, parts, lock = threading.Barrier(ranks), [], threading.Lock()

    def sum_over_ranks(t: torch.Tensor) -> None:
        with lock:
            parts.append(t.clone())
        barrier.wait()
        total = sum(parts)
        if barrier.wait() == 0:
            parts.clear()
        barrier.wait()
        t.copy_(total)

    def layout(r):
        pieces, at = [], 0
        for w, n in zip(wholes, sizes):
            lo, hi = max(at, r * part), min(at + n, (r + 1) * part)
            pieces.append(FlatPiece(w, w.shape, lo - at, max(0, hi - lo), max(0, lo - r * part)))
            at += n
        return FlatLayout(pieces, sum_over_ranks)

    def rank_main(r):
        # Built on the whole tensors, then handed a flat partition instead: what DeepSpeed's ZeRO does.
        opt = MuonWithAdamW([{"params": list(wholes), "use_muon": True, "lr": 0.02, "weight_decay": 0.1,
                              "momentum": 0.95, "nesterov": True, "ns_steps": 5}], lr=0.02, row_blocks=row_blocks,
                            per_expert=per_expert)
        opt.param_groups[0]["params"] = [flats[r]]
        mine = layout(r)
        opt.layout_of = lambda flat: mine
        for g in grads:
            g_full = torch.cat([x.reshape(-1) for x in g] + [torch.zeros(part * ranks - total)])
            flats[r].grad = g_full[r * part:(r + 1) * part].clone()
            opt.step()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = torch.cat([f.detach() for f in flats])[:total]
    return [t.view(w.shape) for t, w in zip(out.split(sizes), wholes)]


@pytest.mark.parametrize("sum_elements", [1 << 26, 300])
def test_flat_partitions_step_like_whole_tensors(monkeypatch, sum_elements):
    """Muon on ZeRO-style partitions (momentum partitioned, Newton-Schulz on the whole tensors) equals Muon
    on whole tensors: each expert of a bank and the gate/up pair orthogonalised whole, partition cuts
    anywhere, whole tensors summed in one batch or (300) several."""
    monkeypatch.setattr("trainer.optim.FLAT_SUM_ELEMENTS", sum_elements)
    gen = torch.Generator().manual_seed(4)
    gate, up = (torch.nn.Parameter(torch.randn(4, 8, 8, generator=gen)) for _ in range(2))
    down = torch.nn.Parameter(torch.randn(4, 8, 8, generator=gen))
    attn = torch.nn.Parameter(torch.randn(12, 8, generator=gen))
    wholes = [gate, up, down, attn]
    grads = [[torch.randn(w.shape, generator=gen) for w in wholes] for _ in range(3)]
    expected = [torch.nn.Parameter(w.detach().clone()) for w in wholes]
    _steps(expected, grads, row_blocks=[[expected[0], expected[1]]])
    for ranks in (1, 2, 3):
        got = _partitioned_steps(wholes, grads, ranks, row_blocks=[[gate, up]])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e.detach(), atol=1e-6, rtol=0)
    flattened = _partitioned_steps(wholes, grads, 2, row_blocks=[[gate, up]], per_expert=False)
    assert (flattened[2] - expected[2]).abs().max() > 1e-3  # the negative control: one [E*R, C] matrix


def test_no_parameter_carries_deepspeeds_use_muon_tag():
    """DeepSpeed's ZeRO 1/2 run their own Muon on any parameter tagged `use_muon` when the optimizer's class
    name contains 'muon' (ours does); the split lives in our group dicts, so no tensor may carry the tag."""
    cfg = load_config(None, MUON + ["model.tie_group_size=2"])
    model = build_model(cfg.model_config())
    param_groups(model, cfg.optim, cfg.model_config())
    assert not [n for n, p in model.named_parameters() if hasattr(p, "use_muon")]


@pytest.mark.parametrize("override, message", [
    ("optim.muon_momentum=1.0", r"optim.muon_momentum=1.0: expected"),
    ("optim.muon_ns_steps=0", r"optim.muon_ns_steps=0: expected"),
])
def test_bad_muon_settings_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, MUON + [override])


def test_muon_with_offload_is_refused(tmp_path):
    ds = tmp_path / "offload.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    with pytest.raises(ValueError, match=r"optim.name='muon': .*offload_optimizer; Muon is tested without offload"):
        load_config(None, MUON + [f"parallel.ds_config={ds}"])


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_muon_accepts_every_zero_stage_and_precision(zero, precision):
    cfg = load_config(None, MUON + [f"parallel.ds_config=ds_configs/zero{zero}.json", f"run.precision={precision}"])
    assert cfg.optim.name == "muon"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("muon_layouts") / "result.json"
    return worker_json("muon_layout_worker.py", [str(out)], out)


@pytest.mark.distributed
@pytest.mark.parametrize("cell, wrapper", [
    ("zero3-ep2-fp32", "DeepSpeedZeroOptimizer_Stage3"), ("zero0-ep2-bf16", "FP16_UnfusedOptimizer"),
    ("zero1-ep1-bf16", "BF16_Optimizer"), ("zero2-ep2-bf16", "DeepSpeedZeroOptimizer")])
def test_flat_layouts_rebuild_every_parameter_under_every_wrapper(layouts, cell, wrapper):
    """What Muon reads of DeepSpeed's flat partitions is right: the whole tensors rebuilt from them equal
    the module's parameters exactly (bf16: the fp32 master rounded), each element held by one rank; for
    bf16 ZeRO-0's whole fp32 copies, the gate/up copies are paired. The bf16 parity tolerance could not
    tell a wrong layout (or unpaired gate/up) from rounding; this can."""
    r = layouts[cell]
    assert r["wrapper"] == wrapper
    assert r["flats"] > 0 and r["coverage_ok"]
    assert r["max_abs_diff"] == 0.0
