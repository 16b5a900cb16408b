"""The per-run memory report (`trainer.memory.write_run_report`) on 2 CPU ranks, and `compare` reading it:
measured bytes agree with `models.accounting.rank_memory`, tying shrinks exactly the expert categories
by banks / MoE layers, and the report carries peaks and DeepSpeed's own estimate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import output_tail, run_worker

REPO = Path(__file__).resolve().parent.parent
CELLS = {"z3-tied": "run.precision=bf16",
         "z3-untied": "run.precision=bf16,model.tie_group_size=1",
         "z2-ep1": "parallel.ds_config=ds_configs/zero2.json,parallel.expert_parallel_size=1",
         "z1-bf16": "parallel.ds_config=ds_configs/zero1.json,run.precision=bf16"}  # DeepSpeed's BF16_Optimizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memory_runs")
    proc = run_worker("memory_report_worker.py", [str(out), *[f"{name}:{args}" for name, args in CELLS.items()]],
                      timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    return out


def report(runs: Path, name: str) -> dict:
    return json.loads((runs / name / "memory_report.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CELLS))
def test_report_matches_analytic_estimate(runs: Path, name: str) -> None:
    r = report(runs, name)
    assert len(r["per_rank"]) == 2 and r["optimizer_steps_seen"] == 1
    for rank, errors in zip(r["per_rank"], r["analytic_error"]):
        assert rank["grads_bytes"] > 0 and rank["optimizer_state_bytes"] > 0
        for category, error in errors.items():
            assert error is not None and abs(error) < 0.05, (name, category, error)
        assert rank["peak_rss_bytes"] > 0 and rank["live_tensor_bytes"] > 0
    ds = r["deepspeed_estimate"]
    assert ds["for_this_stage_bytes"] > 0 and "expert parallelism" in ds["ignores"]
    md = (runs / name / "memory_report.md").read_text()
    assert "| optimizer_state |" in md and "it ignores" in md and "VmHWM" in md


@pytest.mark.distributed
def test_tying_shrinks_expert_categories_by_banks_over_layers(runs: Path) -> None:
    tied, untied = report(runs, "z3-tied"), report(runs, "z3-untied")
    assert (tied["expert_banks"], tied["moe_layers"], untied["expert_banks"]) == (6, 8, 8)
    for t, u in zip(tied["per_rank"], untied["per_rank"]):
        for category in ("params", "grads", "master", "optimizer_state"):
            assert t[f"expert_{category}_bytes"] * 8 == u[f"expert_{category}_bytes"] * 6, category
            assert t[f"other_{category}_bytes"] == u[f"other_{category}_bytes"], category


@pytest.mark.distributed
def test_compare_reads_two_reports(runs: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "trainer.memory", "compare", str(runs / "z3-untied"),
                           str(runs / "z3-tied"), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| params (expert)"))
    assert "(0.750x)" in row
    assert (tmp_path / "memory_compare.md").read_text().startswith("| category")
    assert (tmp_path / "memory_compare.png").stat().st_size > 1000
