"""Starting ranks on this machine: the launcher behind `./run.sh` and the CPU-rank helpers tools use.

Without a launcher, `./run.sh` builds missing data once, then starts one rank per local GPU, or 2
CPU ranks without a GPU (`TIEDMOE_CPU_RANKS`), each running run.sh again with the torch.distributed
environment (`run_local_ranks`). Tools (`trainer.bench`, `trainer.memory`, `trainer.parity`,
`trainer.export`) start their `--worker` mode on CPU ranks with `spawn_cpu_ranks` (torchrun) and
read its JSON back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, run_lock
from trainer.cli import ERROR_DIR_ENV, error_file_name, heeded_stop_signals
from trainer.config import REPO_ROOT, TrainConfig
from trainer.data import check_source, ensure_data
from trainer.downstream import check_fewshot, check_task_names
from trainer.engine.ds_config import check_deepspeed_config


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
    return cpu_ranks(env.get("TIEDMOE_CPU_RANKS", "2")), env


def cpu_ranks(raw: str) -> int:
    """`TIEDMOE_CPU_RANKS` as a rank count: 0 started no rank and exited 0 with nothing trained, and `abc`
    failed with int()'s message, which does not name the variable."""
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"TIEDMOE_CPU_RANKS={raw!r}: expected a positive integer (CPU ranks to start; default 2)")
    return count


def torchrun_command(nproc: int, target: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """torch.distributed.run command for `nproc` local ranks running `target`, with the repo importable."""
    env = {**env, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *target]
    return cmd, env


PROGRESS_ENV = "TIEDMOE_PROGRESS_FILE"  # where a captured worker's rank 0 appends progress lines (`report_progress`)


def spawn_cpu_ranks(module_args: list[str], nproc: int = 2, capture: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m <module_args>` on `nproc` local CPU ranks (gloo) through torch.distributed.run. With
    `capture`, the ranks' output is kept for the error tail, and their progress lines (`report_progress`) are
    shown as they come: a benchmark or an export printed nothing for minutes."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if not capture:
        cmd, env = torchrun_command(nproc, ["-m", *module_args], env)
        return subprocess.run(cmd, env=env, cwd=REPO_ROOT, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "progress.txt"
        progress.touch()
        cmd, env = torchrun_command(nproc, ["-m", *module_args], {**env, PROGRESS_ENV: str(progress)})
        done = threading.Event()
        shower = threading.Thread(target=_show_progress, args=(progress, done), daemon=True)
        shower.start()
        try:
            return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        finally:
            done.set()
            shower.join()


def _show_progress(path: Path, done: threading.Event) -> None:
    """Copy the lines appended to `path` to stderr until `done` (then the rest)."""
    with path.open() as lines:
        while True:
            finished = done.wait(0.5)
            for line in lines.readlines():
                print(line.rstrip("\n"), file=sys.stderr, flush=True)
            if finished:
                return


def report_progress(line: str) -> None:
    """A progress line of a worker's rank 0: to the launcher's stderr through `PROGRESS_ENV` when its output is
    captured (`spawn_cpu_ranks`), else straight to stderr (torchrun on GPUs streams it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")
    else:
        print(line, file=sys.stderr, flush=True)


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


def report_from_cpu_ranks(module_args: list[str], render: Callable[[Any], str], path: str,
                          markdown: bool = False) -> int:
    """Run a measuring `--worker` module on 2 CPU ranks, print its table and write its JSON to `path`."""
    result = collect_from_cpu_ranks(module_args)
    if isinstance(result, int):
        return result
    return write_report(result, render, path, markdown)


def write_report(result: Any, render: Callable[[Any], str], path: str, markdown: bool = False) -> int:
    """Print a benchmark's table and write its JSON to `path` (folders made), with `markdown` the table
    too, beside it as .md (for tables meant to be read on GitHub); returns exit code 0."""
    table = render(result)
    print(table)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    written = [out]
    if markdown:
        written.append(out.with_suffix(".md"))
        written[-1].write_text(table + "\n")
    print("wrote " + " and ".join(str(p) for p in written))
    return 0


def check_plot_beside(json_path: str) -> None:
    """A benchmark that draws its result writes the PNG beside the JSON: a `--json` named .png would be
    replaced by it (ValueError, before anything is measured)."""
    if Path(json_path).suffix == ".png":
        raise ValueError(f"--json {json_path}: the plot is written beside the JSON as .png; name the JSON .json")


def write_report_and_plot(result: Any, render: Callable[[Any], str], plot: Callable[[Any, Path], bool],
                          path: str) -> int:
    """`write_report`, then `plot` draws the result beside the JSON (.png); `plot` returns False (with a note)
    where matplotlib is missing, e.g. on the GPU device: `--plot JSON` draws it later elsewhere."""
    code = write_report(result, render, path)
    png = Path(path).with_suffix(".png")
    if plot(result, png):
        print(f"wrote {png}")
    return code


def redraw(path: str, plot: Callable[[Any, Path], bool], script: str, keys: tuple[str, ...]) -> int:
    """`--plot JSON`: draw the plot of a result written earlier (beside it, .png), measuring nothing. A file
    that is no result of `script` (JSON without its `keys`, or rows without what the plot reads) or a PNG
    that cannot be written: one `error: --plot ...` line, exit 2. Exit 1 when matplotlib is missing."""
    try:
        result = json.loads(Path(path).read_text())
        for key in keys:
            if isinstance(result[key], (dict, list)) and not result[key]:  # an empty plot is no plot
                raise ValueError(f"its {key!r} is empty")
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: --plot {path}: expected a JSON file written by {script} ({err})", file=sys.stderr)
        return 2
    png = Path(path).with_suffix(".png")
    try:  # the keys above are in other JSON too; a row without what the plot reads is still not a result
        drawn = plot(result, png)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        print(f"error: --plot {path}: expected a JSON file written by {script} ({type(err).__name__}: {err})",
              file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a folder named like the PNG beside it
        print(f"error: --plot {path}: cannot write {png} ({err.strerror or err})", file=sys.stderr)
        return 2
    if not drawn:
        return 1
    print(f"wrote {png}")
    return 0


def launch(cfg: TrainConfig, config: str | None, overrides: list[str]) -> int:
    """Check everything that can be checked here, then start the local ranks on run.sh."""
    nproc, env = local_ranks()
    # The checks below import DeepSpeed too: without its ranks' accelerator it printed "Setting accelerator to
    # CPU" on stdout next to a refusal's one line.
    if "DS_ACCELERATOR" in env:
        os.environ.setdefault("DS_ACCELERATOR", env["DS_ACCELERATOR"])
    resolved = cfg.for_world(nproc)  # world-dependent errors before any process starts
    check_deepspeed_config(resolved)  # DeepSpeed's own schema: inside the ranks it comes after the process groups
    ensure_data(cfg)
    # Open the data once here (vocab check, files, tokenizer, a batch of each split): bad data fails before
    # ranks start, not at the final validation after every step was trained.
    check_source(cfg, "train", 0, nproc)
    check_source(cfg, "validation", 0, nproc)
    if cfg.run.downstream_every:
        check_task_names(cfg)
        check_fewshot(cfg)  # too many shots failed only at the first downstream scoring, mid-run (notes: rank 0)
    run_lock.check_free(cfg.run_dir())  # a job still training this run.name: refused before its checkpoints are read
    if cfg.run.resume == "auto":  # another model, layout or batch than the checkpoint's: refused before the ranks
        checkpoint.precheck_resume(cfg.run_dir() / "checkpoints", nproc, checkpoint.identity(resolved, nproc))
    cfg.make_run_dir()  # an unusable run.out_dir is one line here, not a traceback from rank 0
    return run_local_ranks(nproc, [sys.executable, str(REPO_ROOT / "run.sh"), *([config] if config else []),
                                   *overrides], env)


def run_local_ranks(nproc: int, cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` as `nproc` ranks of one job on this machine and wait; returns the job's exit code.

    Why not torchrun: it starts ranks in their own session (they outlive a killed launcher), dies on
    SIGTERM without letting them save, and wraps a rank's one-line error in a ChildFailedError
    traceback. Here SIGTERM / SIGINT / SIGHUP / SIGUSR1 are passed on to the ranks (which finish the step, save and exit
    0), a failed rank stops the others at once, and its one-line error is printed once; the exit
    code is the failed rank's (2: bad input or refused checkpoint).
    """
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tiedmoe-errors-") as errors:
        base = {**env, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""), ERROR_DIR_ENV: errors,
                "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
        ranks: list[subprocess.Popen] = []
        forwarded: list[int] = []
        # Forwarding is set up before the first rank starts: a signal while they start (a job killed at once)
        # reached a launcher that had none yet and died, leaving the started ranks running without it.
        previous = {sig: signal.signal(sig, _forward_to(ranks, forwarded)) for sig in heeded_stop_signals()}
        try:
            for r in range(nproc):
                if forwarded:
                    break
                ranks.append(subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}))
                if forwarded:  # it came while this rank started: the forwarding did not see it yet
                    ranks[-1].send_signal(signal.SIGTERM)
            code = _wait_for(ranks, Path(errors)) if ranks else -signal.SIGTERM
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
        reported = sorted(Path(errors).glob("rank*.txt"))
        if code and reported:
            print(reported[0].read_text().strip(), file=sys.stderr)
        elif code < 0:
            # A rank ended by a signal it had no handler for yet (python still starting, before trainer.cli sets
            # one): the launcher used to exit 1 without a word.
            if forwarded:
                print("error: interrupted while the ranks were starting (before the first step: nothing to save); "
                      "run the same command again to continue", file=sys.stderr)
            else:
                hint = " (out of memory?)" if -code == signal.SIGKILL else ""
                print(f"error: a rank was killed by {_signal_name(-code)}{hint}", file=sys.stderr)
    if code < 0:
        return 130 if forwarded else 1
    return code


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _forward_to(ranks: list[subprocess.Popen], forwarded: list[int]) -> Callable[[int, Any], None]:
    def forward(signum: int, _frame: Any) -> None:
        forwarded.append(signum)
        for proc in ranks:
            if proc.poll() is None:
                # ranks save at the end of the current step and name the signal; SIGINT goes on as SIGTERM (the
                # ranks of a background job ignore SIGINT)
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    return forward


def _wait_for(ranks: list[subprocess.Popen], errors: Path | None = None) -> int:
    """0 when every rank ends with 0; else the first failure's code (2 first; -N: killed by signal N), after
    killing the rest (they would wait forever in a collective for the failed rank).

    A rank that leaves with a one-line error writes it to `errors` first and pauses (`trainer.cli._fail`): the
    others are stopped then, while its connections are still open, so none of them sees a peer vanish in a
    collective and prints gloo's warnings or a traceback next to the one line."""
    while True:
        reporters = _reporting_ranks(errors, len(ranks))
        if reporters:
            return _stop_all_but(ranks, reporters)
        codes = [proc.poll() for proc in ranks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
            return 2 if 2 in failed else next((c for c in failed if c > 0), failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def _reporting_ranks(errors: Path | None, nproc: int) -> list[int]:
    if errors is None:
        return []
    return sorted(r for r in range(nproc) if (errors / error_file_name(r)).is_file())


def _stop_all_but(ranks: list[subprocess.Popen], reporters: list[int]) -> int:
    """Kill every rank that reported nothing, then let the reporters leave with their own exit code."""
    for r, proc in enumerate(ranks):
        if r not in reporters and proc.poll() is None:
            proc.kill()
    codes = []
    for r in reporters:
        try:
            codes.append(ranks[r].wait(timeout=30))
        except subprocess.TimeoutExpired:
            ranks[r].kill()
            codes.append(ranks[r].wait())
    for proc in ranks:
        proc.wait()
    failed = [c for c in codes if c > 0]
    return 2 if 2 in failed else (failed[0] if failed else 1)
