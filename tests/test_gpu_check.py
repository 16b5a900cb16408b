"""benchmarks/gpu_check.sh --dry-run: the GPU check's own steps on CPU at tiny size, so the script that
only ever runs on a lent GPU cannot rot between loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
def test_gpu_check_dry_run_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=420)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["failed_steps"] == [] and report["parity_pass"]
    assert [s["step"] for s in report["steps"]] == ["default_run", "parity", "throughput", "activations"]
    assert len(report["parity"]["cells"]) == 8  # ZeRO {0,3} x EP 1 x {tied, untied} x {fp32, bf16}
    variants = report["throughput"]["variants"]
    assert set(variants) == {"untied", "g2", "g4"}
    for name in ("g2", "g4"):
        # at tiny size on CPU the largest micro-batch within the budget may be the common one, or none
        assert variants[name]["ratio_equal_batch"] > 0 and "micro_batch_equal_memory" in variants[name]
    assert report["default_run"]["steps"] == 3
    rows = report["activations"]["rows"]  # on CPU: saved-tensor bytes against the planner's estimate
    assert [r["checkpointing"] for r in rows] == [False, True] and report["activations"]["saved_within_goal"]
    assert "# GPU check (dry run" in (out / "summary.md").read_text()
    assert (out / "throughput.png").exists()  # drawn where matplotlib is (the device lacks it: 7 files there)
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


@pytest.mark.parametrize("args, named", [(["--dryrun"], "--dryrun"), (["a", "b"], "'b'"),
                                         (["README.md/out"], "README.md/out")])
def test_bad_arguments_are_refused_before_anything_runs(args: list[str], named: str) -> None:
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "error:" in proc.stderr.splitlines()[-1] and named in proc.stderr, proc.stderr
    assert not (REPO / "a").exists() and not (REPO / "--dryrun").exists()


def test_help_shows_the_header() -> None:
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]" in proc.stdout


@pytest.mark.parametrize("args, code, says", [(["--help"], 0, "benchmarks/fetch_gpu_wheels.sh\n"),
                                              (["--dry-run"], 2, "unexpected argument '--dry-run'")])
def test_fetch_gpu_wheels_help_and_bad_arguments_download_nothing(args: list[str], code: int, says: str) -> None:
    """Arguments were ignored: `fetch_gpu_wheels.sh --help` built and downloaded every wheel into .whl/."""
    whl = REPO / ".whl"
    before = sorted(whl.iterdir()) if whl.is_dir() else None
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "fetch_gpu_wheels.sh"), *args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == code and says in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert (sorted(whl.iterdir()) if whl.is_dir() else None) == before


def test_summary_shows_a_missing_mfu_as_a_dash() -> None:
    """A variant with no micro-batch within the budget has no MFU there: the summary printed '-%'."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check_report import throughput_lines

    row = {"peak_gib_at_common_micro_batch": 1.0, "tokens_per_s_equal_batch": 100.0, "mfu_equal_batch": 0.25,
           "ratio_equal_batch": 1.0, "micro_batch_equal_memory": None, "peak_gib_equal_memory": None,
           "tokens_per_s_equal_memory": None, "mfu_equal_memory": None, "ratio_equal_memory": None}
    tp = {"budget_gib_per_rank": 1.0, "common_micro_batch": 2, "peak_flops_per_rank": 1e12, "peak_flops_source": "x",
          "overrides": [], "variants": {"g4": row}}
    assert throughput_lines(tp)[-1] == "| g4 | 1.00 | 100 | 25.0% | 1.000 | - | - | - | - | - |"


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_report.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case, named", [
    ("no arguments", "required: out, --steps"),  # was argparse's usage block, its last line `PROG: error: ...`
    ("missing out", "'{tmp}/nope': folder not found"),  # FileNotFoundError traceback
    ("out is a file", "'{tmp}/steps.jsonl' is a file, expected a folder"),  # NotADirectoryError traceback
    ("missing steps", "argument --steps: 'x': file not found"),  # read as no steps at all: exit 0
    ("steps is a folder", "is a folder, expected a file"),
    ("bad steps line", "line 2 is not a JSON object with step, rc and seconds"),
    ("missing metrics", "argument --default-metrics"),
    ("dry-run 2", "argument --dry-run"),
])
def test_report_bad_arguments_are_one_error_line(tmp_path: Path, case: str, named: str) -> None:
    steps = tmp_path / "steps.jsonl"
    steps.write_text('{"step": "parity", "rc": 0, "seconds": 3}\n' + ("oops\n" if case == "bad steps line" else ""))
    out, given = str(tmp_path), str(steps)
    args = {"no arguments": [], "missing out": [f"{tmp_path}/nope", "--steps", given],
            "out is a file": [given, "--steps", given], "missing steps": [out, "--steps", "x"],
            "steps is a folder": [out, "--steps", out], "bad steps line": [out, "--steps", given],
            "missing metrics": [out, "--steps", given, "--default-metrics", f"{tmp_path}/m.json"],
            "dry-run 2": [out, "--steps", given, "--dry-run", "2"]}[case]
    proc = _report(*args)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert named.format(tmp=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "summary.md").exists()


def test_report_of_a_folder_with_no_results_says_so(tmp_path: Path) -> None:
    """Each result may be missing when its step failed: the summary says so, and a failed step exits 1."""
    steps = tmp_path / "steps.jsonl"
    steps.write_text('{"step": "parity", "rc": 124, "seconds": 3}\n')
    proc = _report(str(tmp_path), "--steps", str(steps), "--dry-run", "1")
    assert proc.returncode == 1 and "parity: no result" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed_steps"] == ["parity"]
