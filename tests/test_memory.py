"""Per-rank model-state memory report: tying shrinks expert parameters and their optimizer state to
banks/layers, and the byte counts add up to what AdamW + ZeRO-3 must hold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
def test_memory_report_zero3_bf16(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "-m", "trainer.memory", "--json", str(out), "run.precision=bf16"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["tied"]["zero_stage"] == 3
    for tied, untied in zip(result["tied"]["per_rank"], result["untied"]["per_rank"]):
        # bf16 params (2 bytes) held as partitions; tying: 6 banks for 8 MoE layers
        assert tied["expert_param_bytes"] * 8 == untied["expert_param_bytes"] * 6
        assert tied["other_param_bytes"] == untied["other_param_bytes"]
        for r in (tied, untied):
            param_elements = (r["expert_param_bytes"] + r["other_param_bytes"]) // 2
            assert r["optimizer_param_bytes"] == 4 * param_elements  # fp32 master partition
            assert r["optimizer_state_bytes"] == 2 * 4 * param_elements  # Adam exp_avg + exp_avg_sq, fp32
    assert "expert_param" in proc.stdout and "ratio" in proc.stdout
