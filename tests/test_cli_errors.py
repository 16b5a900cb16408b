"""Bad command lines, configs and files give one `error: ...` line naming the culprit, exit 2, no traceback.

Regression tests for the README audit: each case runs a documented command as a user would (a
subprocess) with one bad input, and stops at validation (no ranks start, no model is trained).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.is_file() else sys.executable


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`python ARGS` from the repo root, outside any launcher (no RANK), on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([PYTHON, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 2, stderr exactly one `error: ...` line mentioning every one of `names`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])


# --------------------------------------------------------------------------------------------------
# ./run.sh (trainer.cli): configs, overrides, flags


def test_run_sh_help_prints_usage_and_exits_0():
    proc = _run(["run.sh", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ./run.sh [CONFIG.yaml] [key=value ...]")


@pytest.mark.parametrize("argv, flag", [(["--steps", "5"], "--steps"), (["--steps=5"], "--steps"), (["-x"], "-x")])
def test_run_sh_unknown_flag_is_named(argv, flag):
    _assert_one_error_line(_run(["run.sh", *argv]), f"unknown flag {flag}")


def test_run_sh_duplicate_yaml_key_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: the first section would be dropped without a word."""
    config = tmp_path / "dup.yaml"
    config.write_text("run:\n  steps: 3\nrun:\n  steps: 4\n")
    _assert_one_error_line(_run(["run.sh", str(config)]), str(config), "duplicate key 'run'")


def test_run_sh_config_that_is_a_directory_says_so(tmp_path):
    _assert_one_error_line(_run(["run.sh", str(tmp_path)]), str(tmp_path), "is a directory")


@pytest.mark.parametrize("text, where", [("[1, 2]", "the file"), ('{"zero_optimization": 3}', "zero_optimization")])
def test_run_sh_ds_config_that_is_no_json_object(tmp_path, text, where):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(text)
    _assert_one_error_line(_run(["run.sh", f"parallel.ds_config={ds_config}"]), "parallel.ds_config", where)


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "''", ".."])
def test_run_sh_run_name_must_be_a_plain_folder_name(name):
    _assert_one_error_line(_run(["run.sh", f"run.name={name}"]), "run.name=")
