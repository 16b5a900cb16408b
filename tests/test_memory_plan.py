"""`python -m trainer.memory plan` (which tie group size fits, without building a model) and the one-line
errors of every `trainer.memory` command."""

import json
from pathlib import Path

import pytest
from helpers import memory_cli


def test_plan_olmoe_tied_variants(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = memory_cli(["plan", "olmoe", "--gpus", "8", "--gpu-mem-gib", "80", "--ep", "8", "--micro-batch",
                                 "4", "--activation-checkpointing", "--json", str(tmp_path / "plan.json")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert [r["tie_group_size"] for r in rows] == [1, 2, 3, 4]
    states = [r["model_states_bytes"] for r in rows]
    assert states == sorted(states, reverse=True) and states[3] < 0.5 * states[0]  # g=4 about halves model states
    assert len({r["activation_bytes"] for r in rows}) == 1  # tying does not change activations
    assert all(r["fits"] for r in rows) and rows[3]["max_micro_batch"] >= rows[0]["max_micro_batch"] > 4
    assert "| 4 |" in out and "max micro-batch" in out


def test_plan_max_micro_batch_is_the_boundary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["plan", "qwen3_moe", "--gpus", "8", "--gpu-mem-gib", "40", "--ep", "4", "--json", str(tmp_path / "p.json")]
    assert memory_cli(base, capsys)[0] == 0
    best = json.loads((tmp_path / "p.json").read_text())["rows"][1]["max_micro_batch"]
    for micro, fits in ((best, True), (best + 1, False)):
        assert memory_cli(base + ["--micro-batch", str(micro)], capsys)[0] == 0
        assert json.loads((tmp_path / "p.json").read_text())["rows"][1]["fits"] is fits


def test_plan_reads_a_training_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = memory_cli(["plan", "trainer/configs/olmoe.yaml", "--gpus", "8", "--gpu-mem-gib", "80",
                                 "--json", str(tmp_path / "p.json")], capsys)
    assert code == 0, err
    layout = json.loads((tmp_path / "p.json").read_text())["layout"]
    assert (layout["zero"], layout["ep"], layout["micro_batch"], layout["seq_len"], layout["checkpointing"]) == \
        (3, 8, 4, 2048, True)


@pytest.mark.parametrize("argv,expected", [
    (["plan", "nope", "--gpus", "8", "--gpu-mem-gib", "80"], "not a preset"),
    (["plan", "olmoe", "--gpus", "8", "--gpu-mem-gib", "80", "--ep", "3"], "--ep=3"),
    (["plan", "olmoe", "--gpus", "6", "--gpu-mem-gib", "80", "--ep", "6"], "expert count 64"),
    (["plan", "olmoe", "--gpus", "-2", "--gpu-mem-gib", "80"], "--gpus=-2"),
    (["plan", "olmoe", "--gpus", "8", "--gpu-mem-gib", "0"], "--gpu-mem-gib"),
    (["plan", "olmoe", "--gpus", "8"], "--gpu-mem-gib"),
    (["plan", "olmoe", "bogus_field=1", "--gpus", "8", "--gpu-mem-gib", "80"], "bogus_field"),
    (["compare", "/nonexistent/run"], "not found"),
    (["compare", "tests"], "no memory_report.json"),
])
def test_bad_input_is_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = memory_cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
