"""`python -m trainer.memory docs` renders the memory page from synthetic run reports (`--reuse-runs`, no
training): compare tables + PNGs per layout, the planner's tables, the construction table; bad input is
one `error:` line and exit 2. And `compare` writes beside its first run by default, not into the CWD."""

import json
from pathlib import Path

import pytest
from helpers import memory_cli

from trainer.memory_docs import LAYOUTS, VARIANTS, construction_section

BANKS = {"untied": 8, "tied": 6}


def fake_report(variant: str, layout: str) -> dict:
    """A memory_report.json shaped like write_run_report's: expert categories scale with banks / 8."""
    banks = BANKS[variant]
    rank = {}
    for cat, expert, other in (("params", 49152, 1185856), ("grads", 98304, 2371712),
                               ("master", 98304, 2371712), ("optimizer_state", 196608, 4743424)):
        rank[f"expert_{cat}_bytes"], rank[f"other_{cat}_bytes"] = expert * banks, other
        rank[f"{cat}_bytes"] = expert * banks + other
    rank["total_bytes"] = sum(rank[f"{cat}_bytes"] for cat in ("params", "grads", "master", "optimizer_state"))
    rank.update(peak_rss_bytes=800 << 20, rss_bytes=700 << 20, live_tensor_bytes=1000 << 20)
    zero = 3 if layout.startswith("zero3") else 1
    return {"run": variant, "world_size": 2, "zero_stage": zero, "expert_parallel_size": 2, "precision": "bf16",
            "micro_batch_size": 8, "seq_len": 128, "activation_checkpointing": False, "unique_params": 1_000_000,
            "untied_params": 1_100_000, "expert_banks": banks, "moe_layers": 8, "optimizer_steps_seen": 2,
            "per_rank": [rank, rank],
            "analytic_error": [{"params": 0.0, "grads": 0.02 if zero == 1 else 0.0, "total": None}] * 2,
            "deepspeed_estimate": {"for_this_stage_bytes": 13 << 20, "zero2_bytes_per_gpu": 16 << 20,
                                   "zero3_bytes_per_gpu": 13 << 20, "ignores": "expert parallelism",
                                   **({"note": "DeepSpeed has no ZeRO-1 estimator"} if zero == 1 else {})}}


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    for layout in LAYOUTS:
        for variant in VARIANTS:
            run = runs / layout / variant
            run.mkdir(parents=True)
            (run / "memory_report.json").write_text(json.dumps(fake_report(variant, layout)))
            (run / "config.yaml").write_text("run:\n  steps: 3\n")
    return runs


def test_docs_renders_from_existing_reports(runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "docs" / "memory.md"
    code, stdout, err = memory_cli(["docs", "--reuse-runs", "--runs-dir", str(runs_dir), "--out", str(out)], capsys)
    assert code == 0, err
    doc = out.read_text()
    assert doc.startswith("# Memory") and "python -m trainer.memory docs --reuse-runs" in doc
    assert "torch " in doc and "deepspeed " in doc and "CPUs" in doc  # the machine and versions at the top
    for layout in LAYOUTS:
        png = out.parent / f"memory_{layout.replace('-', '_')}.png"
        assert png.stat().st_size > 1000 and f"]({png.name})" in doc
    expert_rows = [line for line in doc.splitlines() if line.startswith("| params (expert)")]
    assert len(expert_rows) == 2 and all("(0.750x)" in row for row in expert_rows)  # 6 banks / 8 MoE layers
    assert "run.steps=3" in doc and "python -m trainer.memory compare" in doc
    assert "grads" in doc and "2.0% (grads)" in doc  # the analytic estimate's worst category
    for title in ("OLMoE-1B-7B", "Qwen3-MoE-style", "DeepSeek-MoE-style", "30B class"):
        assert f"### {title}" in doc
    assert doc.count("| 4 |") >= 4 and "python -m trainer.memory plan trainer/configs/olmoe.yaml" in doc
    assert "## Building at ZeRO-3" in doc
    assert "wrote" in stdout


def test_construction_table(tmp_path: Path) -> None:
    result = {"unique_params": 1229981696, "full_fp32_gib": 4.58, "until": "built", "paths": {
        "partitioned": {"rss_before_gib": [0.27, 0.27], "peak_built_gib": [3.45, 3.44],
                        "peak_engine_ready_gib": [None, None]},
        "plain": {"rss_before_gib": [0.27, 0.27], "peak_built_gib": [5.14, 5.13], "peak_engine_ready_gib": [6.0, 6.1]}}}
    path = tmp_path / "construction_memory_cpu.json"
    path.write_text(json.dumps(result))
    text = "\n".join(construction_section([path]))
    assert "| partitioned | 0.27 GiB | 3.45 GiB | 0.75 | - | - |" in text
    assert "| plain | 0.27 GiB | 5.14 GiB | 1.12 | 6.10 GiB | 1.33 |" in text
    assert "No results yet" in "\n".join(construction_section([]))
    path.write_text('{"paths": {}}')
    with pytest.raises(ValueError, match="construction_memory_cpu.json: not a construction_memory result"):
        construction_section([path])


def test_compare_writes_beside_the_first_run(runs_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first, second = (runs_dir / "zero3-ep2-bf16" / v for v in VARIANTS)
    code, _, err = memory_cli(["compare", str(first), str(second)], capsys)
    assert code == 0, err
    assert (first / "memory_compare.md").is_file() and (first / "memory_compare.png").is_file()
    assert not (tmp_path / "memory_compare.md").exists()


@pytest.mark.parametrize("argv,expected", [
    (["docs", "--steps", "0"], "--steps=0"),
    (["docs", "--out", "docs"], "--out=docs"),
    (["docs", "--out", "memory.txt"], "--out=memory.txt"),
    (["docs", "--bogus"], "unrecognized arguments"),
    (["docs", "--reuse-runs", "--runs-dir", "/nonexistent/runs"], "not found"),
    (["docs", "--reuse-runs", "--steps", "5"], "--steps=5"),  # nothing is trained: it was ignored
])
def test_docs_bad_input_is_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = memory_cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_compare_out_must_be_a_directory(runs_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    code, _, err = memory_cli(["compare", str(runs_dir / "zero3-ep2-bf16" / "tied"), "--out",
                               str(tmp_path / "file")], capsys)
    assert code == 2 and err.startswith("error: --out=") and err.count("\n") == 1, err


def test_compare_out_under_a_file_is_one_line(runs_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """`--out FILE/x` was a NotADirectoryError traceback, exit 1."""
    (tmp_path / "file").write_text("")
    code, _, err = memory_cli(["compare", str(runs_dir / "zero3-ep2-bf16" / "tied"), "--out",
                               str(tmp_path / "file" / "x")], capsys)
    assert code == 2 and err.startswith("error: --out=") and "cannot create" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.pop("world_size"), "no 'world_size'"),  # was a KeyError traceback
    (lambda r: r["per_rank"][1].update(total_bytes="12"), "per_rank[1].total_bytes='12': expected a number"),  # TypeError
])
def test_compare_hand_edited_report_is_named(edit, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = fake_report("tied", "zero3-ep2-bf16")
    report["per_rank"] = [dict(r) for r in report["per_rank"]]
    edit(report)
    (tmp_path / "memory_report.json").write_text(json.dumps(report))
    code, _, err = memory_cli(["compare", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'memory_report.json'}: " in err and expected in err, err


def test_compare_run_dir_that_is_a_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    code, _, err = memory_cli(["compare", str(tmp_path / "file")], capsys)
    assert code == 2 and "not a directory" in err, err


def test_docs_out_that_cannot_be_written_is_refused_before_training(runs_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """`--out FILE/memory.md` trained four runs (minutes), then failed with a FileExistsError traceback."""
    (tmp_path / "file").write_text("")
    for argv in (["--reuse-runs", "--runs-dir", str(runs_dir)], []):  # without --reuse-runs: refused before training
        code, _, err = memory_cli(["docs", *argv, "--out", str(tmp_path / "file" / "memory.md")], capsys)
        assert code == 2 and err.startswith("error: --out: cannot write") and err.count("\n") == 1, err
    code, _, err = memory_cli(["docs", "--runs-dir", str(tmp_path / "file")], capsys)
    assert code == 2 and "--runs-dir=" in err and "not a directory" in err, err


def test_compare_the_same_run_twice_is_refused(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`compare RUN RUN` printed one run as two columns (the second 1.000x the first)."""
    run = runs_dir / "zero3-ep2-bf16" / "tied"
    code, _, err = memory_cli(["compare", str(run), str(run) + "/"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is given twice" in err, err
