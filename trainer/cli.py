"""Entry point behind run.sh: `[CONFIG.yaml] [key=value ...]`.

Under a launcher (torchrun / `deepspeed run.sh ...`, which set RANK and WORLD_SIZE) it trains on
this rank; started directly it hands over to `trainer.launch`, which starts the local ranks.

Exit codes: 0 done (or stopped by a stop signal, `STOP_SIGNALS`, with a checkpoint saved), 2 bad input (config,
data, checkpoint; one line `error: ...`), 3 training diverged (non-finite loss, run.on_nonfinite=stop),
130 a stop signal outside the training loop (while building or resuming: nothing to save), 1 a rank
killed by a signal it cannot catch (SIGKILL: the out-of-memory killer).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from trainer.argtypes import reader_may_leave
from trainer.config import REPO_ROOT, TrainConfig, load_config

# Signals that stop a run with a checkpoint: SIGHUP (a closed terminal, when not under nohup) and SIGUSR1 (Slurm's
# `--signal=USR1@N` warning before the time limit) killed the job without one. An ignored one stays ignored.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def heeded_stop_signals() -> list[signal.Signals]:
    """The stop signals this process does not ignore (SIGHUP under nohup, SIGINT of a background job stay so)."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]

ERROR_DIR_ENV = "TIEDMOE_ERROR_DIR"  # where ranks started by trainer.launch leave their one-line error
CALLER_CWD_ENV = "TIEDMOE_CALLER_CWD"  # the folder run.sh was called from (it then changes to the repo root)


USAGE = """usage: ./run.sh [CONFIG.yaml] [key=value ...]   train (default config: trainer/configs/default.yaml)
       ./run.sh test [pytest args]             the test suite
       ./run.sh eval TARGET [...]              python -m trainer.evaluate (see its --help)
CONFIG.yaml: a training config (trainer/configs/*.yaml); key=value: dotted overrides such as
run.steps=50 or model.tie_group_size=4 (every field is commented in trainer/config.py; a key given twice:
the last value wins)."""


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Drop the launcher's --local_rank, then take an optional YAML path and key=value overrides.

    Any other `-x` / `--flag` is refused by name: training takes no flags, and taking `--steps` for a
    config file would blame the wrong argument."""
    args = []
    for arg in argv:
        if arg.startswith("--local_rank"):
            if "=" in arg:
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg.startswith("-"):
            raise ValueError(f"unknown flag {arg.split('=', 1)[0]}: run.sh takes [CONFIG.yaml] [key=value ...] "
                             f"(e.g. run.steps=50), or --help")
        args.append(arg)
    config = None
    if args and "=" not in args[0]:
        config = _from_caller(args.pop(0))
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected key=value (only the first argument may be a config file)")
    return config, args


def _from_caller(config: str) -> str:
    """A relative config path as the caller meant it: run.sh changes to the repo root before Python starts,
    so `../run.sh my.yaml` from another folder said 'not found'. Repo-relative paths still work, also under a
    launcher started outside the repo."""
    caller = os.environ.get(CALLER_CWD_ENV)
    if caller and not Path(config).is_absolute() and (Path(caller) / config).exists():
        return str(Path(caller) / config)
    if not Path(config).is_absolute() and not Path(config).exists() and (REPO_ROOT / config).is_file():
        # under a launcher started in another folder (`deepspeed /repo/run.sh trainer/configs/x.yaml`) nothing
        # changes to the repo root: the shipped configs are found there, as parallel.ds_config and data.path are
        return str(REPO_ROOT / config)
    return config


def main(argv: list[str]) -> int:
    in_rank = "RANK" in os.environ
    if not in_rank and argv[:1] in (["-h"], ["--help"]):
        with reader_may_leave():  # `./run.sh --help | head -1`
            print(USAGE)
        return 0
    try:
        config, overrides = split_args(argv)
        cfg = load_config(config, overrides)  # fail fast, before any process starts
    except ValueError as err:
        return _fail(err, 2, in_rank, alike_on_every_rank=True)
    # torch and DeepSpeed take seconds to import: a bad command line or config is refused before that.
    # A signal during those imports is only recorded (a KeyboardInterrupt raised there can land in a finalizer,
    # which prints a traceback and drops it: the run went on), then acted on once they are done; from there
    # SIGTERM ends the process as Ctrl-C does, with one line and 130, until the training loop (ranks) or the
    # forwarding to the ranks (launcher) takes both signals over.
    watched = heeded_stop_signals()  # SIGINT of a background job stays ignored
    for sig in watched:
        signal.signal(sig, _record)
    try:
        return _run(cfg, config, overrides, in_rank, watched)
    except KeyboardInterrupt:
        if in_rank and not os.environ.get(ERROR_DIR_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
            # under torchrun / `deepspeed run.sh` a stop reaches every rank of the node: local rank 0 says it once.
            # It is also how those launchers end a rank whose peer already failed: this line hid the peer's error.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return _fail(INTERRUPTED, 130, in_rank)


INTERRUPTED = ("interrupted outside the training loop (before its first step or after its last checkpoint); "
               "run the same command again to continue")
_received: list[int] = []  # signals that arrived while the heavy modules were imported


def _record(signum: int, _frame: Any) -> None:
    _received.append(signum)


def _run(cfg: TrainConfig, config: str | None, overrides: list[str], in_rank: bool, watched: list[int]) -> int:
    """Start the local ranks (no launcher around us) or train on this rank."""
    from trainer.train import TrainingDiverged
    if not in_rank:
        from trainer.launch import launch
    else:
        from trainer.engine import RefusedOnEveryRank, shutdown
        from trainer.preemption import die_with_parent, interrupt
        from trainer.train import train
    for sig in watched:
        signal.signal(sig, interrupt if in_rank else signal.default_int_handler)
    if _received:
        raise KeyboardInterrupt
    try:
        if not in_rank:
            return launch(cfg, config, overrides)
        die_with_parent()
        train(cfg)
        shutdown()  # does not return
        return 0
    except ValueError as err:
        return _fail(err, 2, in_rank, alike_on_every_rank=in_rank and isinstance(err, RefusedOnEveryRank))
    except TrainingDiverged as err:
        return _fail(err, 3, in_rank)
    except Exception:
        if in_rank:
            _await_the_launcher()
        raise


REPORTED_PAUSE_S = 1.0  # how long a rank that reported its error stays (the launcher polls every 0.1 s)


def error_file_name(rank: int) -> str:
    """Where a rank started by `trainer.launch` leaves its one-line error, inside `TIEDMOE_ERROR_DIR`."""
    return f"rank{rank:05d}.txt"


def _peer_reported() -> bool:
    """Whether another rank started by `trainer.launch` already left with its one-line error (printed once by
    the launcher): this rank's own failure is then only the broken connection, a traceback that hid it."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    return bool(error_dir) and any(Path(error_dir).glob("rank*.txt"))


LAUNCHER_STOP_GRACE_S = 3.0  # how long a failed rank waits before its traceback, for the launcher to stop it


def _await_the_launcher() -> None:
    """Leave quietly when this rank's failure is only a peer gone: a peer that left with its one-line error, or
    one killed (the OOM killer's SIGKILL), breaks this rank's collective, and the traceback hid the launcher's
    one line about the peer. The launcher stops every rank within its poll of a failed one; a rank still here
    after the grace has a failure of its own, and its traceback follows. Only under `trainer.launch`."""
    if not os.environ.get(ERROR_DIR_ENV):
        return
    deadline = time.monotonic() + LAUNCHER_STOP_GRACE_S
    while time.monotonic() < deadline:
        if _peer_reported():
            os._exit(1)
        time.sleep(0.1)


PEER_GRACE_S = 10.0  # how long a quiet rank waits for its local rank 0 to report a command-line error


def _fail(err: object, code: int, in_rank: bool, alike_on_every_rank: bool = False) -> int:
    """One line on stderr, even when the message quotes a multi-line YAML parser error.

    In a rank started by `trainer.launch`, the line goes to a file the launcher prints once (not once per
    rank), and the rank leaves after a pause in which the launcher stops its peers (they may be waiting for
    it in a collective, and must not see its connections close). Under another launcher (torchrun, `deepspeed run.sh`) an error every rank meets
    alike (the command line, the config) is printed by local rank 0 only, one line per node instead of
    one per rank; the other ranks wait quietly for the launcher, which stops them when rank 0 leaves.
    """
    line = "error: " + " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if in_rank and error_dir:
        path = Path(error_dir) / error_file_name(int(os.environ["RANK"]))
        path.with_suffix(".tmp").write_text(line + "\n")
        path.with_suffix(".tmp").replace(path)  # the launcher reads it as soon as it appears: never half-written
        time.sleep(REPORTED_PAUSE_S)  # the launcher stops the peers while this rank's connections are still open
    elif in_rank and alike_on_every_rank and os.environ.get("LOCAL_RANK", "0") != "0":
        for sig in heeded_stop_signals():  # the launcher's stop ends this wait quietly: nothing to save
            signal.signal(sig, signal.SIG_DFL)
        time.sleep(PEER_GRACE_S)  # rank 0's exit comes first, so the launcher reports its code
    else:
        print(line, file=sys.stderr)
    if in_rank:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
