"""Starting ranks on this machine: the launcher behind `./run.sh` and the CPU-rank helpers tools use.

Without a launcher, `./run.sh` builds missing data once, then starts one rank per local GPU, or 2
CPU ranks without a GPU (`TIEDMOE_CPU_RANKS`), through torch.distributed.run, each running run.sh
again. Tools (`trainer.bench`, `trainer.memory`, `trainer.parity`, `trainer.export`) start their
`--worker` mode on CPU ranks with `spawn_cpu_ranks` and read its JSON back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.config import REPO_ROOT, TrainConfig
from trainer.data import ensure_data, make_source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ranks() -> tuple[int, dict[str, str]]:
    """Ranks to start here and the environment they need."""
    env = dict(os.environ)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count(), env
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return int(env.get("TIEDMOE_CPU_RANKS", "2")), env


def torchrun_command(nproc: int, target: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """torch.distributed.run command for `nproc` local ranks running `target`, with the repo importable."""
    env = {**env, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *target]
    return cmd, env


def spawn_cpu_ranks(module_args: list[str], nproc: int = 2, capture: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m <module_args>` on `nproc` local CPU ranks (gloo) through torch.distributed.run."""
    cmd, env = torchrun_command(nproc, ["-m", *module_args],
                                {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=capture, text=True)


def collect_from_cpu_ranks(module_args: list[str], nproc: int = 2) -> Any:
    """Run a `--worker` module on CPU ranks; it writes JSON to the `--json-raw` path we give it.

    Returns the parsed JSON, or the exit code (after printing the ranks' output tail) on failure.
    """
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        proc = spawn_cpu_ranks([*module_args, "--json-raw", str(raw)], nproc, capture=True)
        if proc.returncode != 0 or not raw.is_file():
            print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n", file=sys.stderr)
            return proc.returncode or 1
        return json.loads(raw.read_text())


def report_from_cpu_ranks(module_args: list[str], render: Callable[[Any], str], path: str) -> int:
    """Run a measuring `--worker` module on 2 CPU ranks, print its table and write its JSON to `path`."""
    result = collect_from_cpu_ranks(module_args)
    if isinstance(result, int):
        return result
    print(render(result))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


def launch(cfg: TrainConfig, config: str | None, overrides: list[str]) -> int:
    """Check everything that can be checked here, then start the local ranks on run.sh."""
    nproc, env = local_ranks()
    cfg.for_world(nproc)  # world-dependent errors before any process starts
    ensure_data(cfg)
    # Open the train data once here (vocab check, files, tokenizer): bad data fails before ranks start.
    make_source(cfg, "train", 0, nproc)
    cmd, env = torchrun_command(nproc, [str(REPO_ROOT / "run.sh"), *([config] if config else []), *overrides], env)
    return subprocess.call(cmd, env=env)
