"""Paper-scale construction (#15): followers build no bank, ZeRO-3 builds partitioned, weights unchanged.

The reference for "unchanged" is independent of the new code path: a tied model's weights must equal,
name for name, those of its untied twin built with the same seed (whose every layer builds and draws
its own bank), which is exactly what tied builds gave before followers stopped building banks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import worker_json

from models import transformer
from models.config import from_preset, untied
from models.moe import BankSlot
from models.transformer import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [("olmoe_tiny", {"tie_group_size": 2}), ("olmoe_tiny", {"tie_group_size": 4, "init": "paper"}),
           ("olmoe_tiny", {"tie_group_size": 2, "tie_router": True, "tie_attention": True}),
           ("deepseek_moe_tiny", {"tie_group_size": 3}),
           ("qwen3_moe_tiny", {"tie_group_size": 2, "tie_embeddings": True})]


def _equals_untied_twin(cfg) -> bool:
    tied, twin = build_model(cfg, seed=7).state_dict(), build_model(untied(cfg), seed=7).state_dict()
    return all(torch.equal(value, twin[name]) for name, value in tied.items())


@pytest.mark.parametrize("preset,overrides", CONFIGS)
def test_tied_weights_equal_the_untied_twin_with_the_same_seed(preset: str, overrides: dict) -> None:
    assert _equals_untied_twin(from_preset(preset, **overrides))


def test_followers_hold_no_bank_of_their_own() -> None:
    model = build_model(from_preset("olmoe_tiny", tie_group_size=2))
    assert not any(isinstance(m, BankSlot) for m in model.modules())  # every slot was replaced by its leader's bank
    layers = model.model.layers
    assert all(layer.mlp.experts is layers[layer.plan.expert_owner].mlp.experts
               for layer in layers if layer.plan.is_tied_follower)


def test_the_twin_check_fails_when_slots_skip_their_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: if a follower's slot stopped drawing, every later tensor would change."""
    plan = transformer.init_plan

    def without_slot_draws(model):
        return ((target, init) for target, init in plan(model) if not isinstance(target, torch.Size))

    monkeypatch.setattr(transformer, "init_plan", without_slot_draws)
    assert not _equals_untied_twin(from_preset("olmoe_tiny", tie_group_size=2))


CELLS = {
    "z3-ep2-g2": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=2,model.tie_group_size=2",
    "z3-ep2-g2-widen2": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=2,model.tie_group_size=2,"
                        "model.widen_factor=2",
    "z3-ep2-g2-bf16": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=2,model.tie_group_size=2,"
                      "run.precision=bf16",
    "z3-ep1-paper-tied-router-attention": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=1,"
                                          "model.tie_group_size=2,model.init=paper,model.tie_router=true,"
                                          "model.tie_attention=true",
    "z3-ep2-deepseek-g3": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=2,"
                          "model.preset=deepseek_moe_tiny,model.tie_group_size=3",
    "z1-ep2-g2": "parallel.ds_config=ds_configs/zero1.json,parallel.expert_parallel_size=2,model.tie_group_size=2",
}


# On 4 ranks a rank's EP experts span other ranks' partitions at EP 2 and EP 1 (read by broadcast from
# their holders) and are its own partition at EP 4.
CELLS_4_RANKS = {
    "z3-ep2-g2": CELLS["z3-ep2-g2"],
    "z3-ep4-g2-bf16": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=4,model.tie_group_size=2,"
                      "run.precision=bf16",
    "z3-ep1-deepseek-g3": "parallel.ds_config=ds_configs/zero3.json,parallel.expert_parallel_size=1,"
                          "model.preset=deepseek_moe_tiny,model.tie_group_size=3",
}


def _run_cells(tmp_path_factory: pytest.TempPathFactory, ranks: int, cells: dict[str, str]) -> dict:
    out = tmp_path_factory.mktemp("construction") / "report.json"
    return worker_json("construction_worker.py", [str(out), *[f"{name}:{args}" for name, args in cells.items()]],
                       out, ranks, timeout=1200)


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_cells(tmp_path_factory, 2, CELLS)


@pytest.fixture(scope="module")
def cells_4_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_cells(tmp_path_factory, 4, CELLS_4_RANKS)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CELLS))
def test_partitioned_build_trains_exactly_like_the_plain_build(cells: dict, name: str) -> None:
    cell = cells[name]
    assert cell["built_partitioned"] == name.startswith("z3")  # ZeRO-3 only: other stages keep whole weights
    assert cell["same_keys"]
    assert cell["max_weight_diff"] == 0.0
    assert cell["losses_partitioned"] == cell["losses_plain"]
    assert cell["loaded_plain_checkpoint_logit_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CELLS_4_RANKS))
def test_partitioned_build_trains_exactly_like_the_plain_build_on_4_ranks(cells_4_ranks: dict, name: str) -> None:
    cell = cells_4_ranks[name]
    assert cell["built_partitioned"] and cell["same_keys"]
    assert cell["max_weight_diff"] == 0.0
    assert cell["losses_partitioned"] == cell["losses_plain"]
    assert cell["loaded_plain_checkpoint_logit_diff"] == 0.0


@pytest.mark.slow  # CI time: a benchmark smoke run, like the other benchmarks' (test_benchmarks_cli)
@pytest.mark.distributed
def test_construction_memory_benchmark_runs_and_writes_its_json(tmp_path: Path) -> None:
    """benchmarks/construction_memory.py at a tiny size (the committed results are ~1-2B parameters)."""
    out = tmp_path / "construction.json"
    tiny = ["model.d_model=64", "model.n_layers=4", "model.vocab_size=512", "model.n_heads=4", "model.n_kv_heads=4",
            "model.expert_ffn_dim=32"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "construction_memory.py"), "--json", str(out), *tiny],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for path in ("partitioned", "plain"):
        peaks = report["paths"][path]
        assert len(peaks["peak_built_gib"]) == 2
        assert all(b <= r for b, r in zip(peaks["peak_built_gib"], peaks["peak_engine_ready_gib"]))
    assert "| partitioned | 0 |" in proc.stdout


@pytest.mark.parametrize("args,field", [(["--paths", "bogus"], "--paths"), (["model.n_experts=7"], "expert_parallel_size")])
def test_construction_memory_benchmark_refuses_bad_input_in_one_line(args: list[str], field: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "construction_memory.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0]
