"""Helpers shared by test files: 2-rank worker scripts under torchrun, `trainer.memory` called in-process.

A module, not conftest.py: pytest puts tests/ on sys.path, so tests import these by name (`from helpers import
...`), while conftest.py stays for pytest's own hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.config import REPO_ROOT
from trainer.launch import torchrun_command
from trainer.memory import main as memory_main

WORKERS = REPO_ROOT / "tests" / "workers"


def run_python(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`python ARGS` from the repo root as a user runs a tool: outside any launcher (no RANK), on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_worker(worker: str, args: list[str], ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/workers/`worker` on `ranks` CPU ranks (gloo), started the way the tools start theirs."""
    cmd, env = torchrun_command(ranks, [str(WORKERS / worker), *args],
                                {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def output_tail(proc: subprocess.CompletedProcess) -> str:
    """The end of the ranks' output: enough for an assertion message to show the failing rank's error."""
    return proc.stdout[-3000:] + proc.stderr[-6000:]


def worker_json(worker: str, args: list[str], out: Path, ranks: int = 2, timeout: int = 600) -> Any:
    """Run a worker whose `args` name `out`, the JSON it writes on rank 0; return that JSON."""
    proc = run_worker(worker, args, ranks, timeout)
    assert out.is_file(), output_tail(proc)
    return json.loads(out.read_text())


def memory_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`python -m trainer.memory <argv>` run in-process (argparse's exits become codes): code, stdout, stderr."""
    try:
        code = memory_main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
