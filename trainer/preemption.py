"""Stopping a run cleanly when the cluster asks: SIGTERM / SIGINT / SIGHUP / SIGUSR1, or the launcher dying.

A signal only sets a flag; after every optimizer step the ranks agree on it with one all-reduce
(`stop_requested`), so they all finish the same step, save one checkpoint and exit 0, and the next
start resumes from it. Each rank also asks the kernel for SIGTERM when its parent (the launcher)
dies, so no rank outlives a killed launcher; under `deepspeed run.sh` it also watches the `deepspeed`
command above its parent (see `_watch_deepspeed_runner`).
"""

from __future__ import annotations

import ctypes
import os
import signal
from types import FrameType

import psutil

from trainer import engine as eng
from trainer.cli import heeded_stop_signals

_PR_SET_PDEATHSIG = 1


_pending: list[str] = []  # signals `interrupt` saw before the loop
_runner: list[tuple[psutil.Process, int]] = []  # DeepSpeed's per-node launch.py and its parent pid at start
LAUNCHER_GONE = "the deepspeed launcher ended"
_RUNNER_GONE_CODE = 1000  # LAUNCHER_GONE in `stop_requested`'s all-reduce (signal numbers are below 65)


def interrupt(signum: int, _frame: FrameType | None) -> None:
    """Before and after the loop (building, resuming, final validation): stop as Ctrl-C does (exit 130), and
    remember the signal: a KeyboardInterrupt raised inside a finalizer (some run while DeepSpeed builds the
    engine) is printed and dropped, and the run went on to its last step as if never asked to stop;
    `StopSignal` then stops it after the first step, with a checkpoint."""
    _pending.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


class StopSignal:
    """Records a stop signal (`trainer.cli.STOP_SIGNALS`) instead of dying, while the loop runs; one the process
    ignores (SIGHUP under nohup, SIGINT of a background job) stays ignored."""

    def __init__(self) -> None:
        self.received: str | None = _pending[0] if _pending else None  # the first, as `_record` keeps
        self._previous = {sig: signal.signal(sig, self._record) for sig in heeded_stop_signals()}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:  # the first names the stop: Ctrl-C's SIGINT comes before the launcher's SIGTERM
            self.received = signal.Signals(signum).name

    def stop_requested(self) -> bool:
        """Collective: True on every rank when any rank got a signal (or saw the `deepspeed` command end). A rank
        that got none takes a peer's as `received` (the highest-numbered, when peers got different ones), so
        rank 0 names the one sent to rank 1."""
        if not self.received and _runner_gone():
            self.received = LAUNCHER_GONE
        mine = _RUNNER_GONE_CODE if self.received == LAUNCHER_GONE else (
            int(signal.Signals[self.received]) if self.received else 0)
        agreed = int(eng.max_over_ranks([float(mine)])[0])
        if agreed and not self.received:
            self.received = LAUNCHER_GONE if agreed == _RUNNER_GONE_CODE else signal.Signals(agreed).name
        return agreed > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """SIGTERM this process when its parent exits (Linux), then check the parent is not already gone."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: rely on the launcher's own cleanup
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    _watch_deepspeed_runner(parent)


def _watch_deepspeed_runner(parent: int) -> None:
    """Under `deepspeed run.sh` a rank's parent is `deepspeed.launcher.launch`, started by the `deepspeed` command
    the user (or a scheduler) runs, which on one node neither handles nor passes on SIGTERM: killing it left
    launch.py and the ranks training to the last step, unseen. launch.py's parent changing (it was re-parented)
    means that command ended; the ranks then stop as on SIGTERM, with a checkpoint."""
    try:
        proc = psutil.Process(parent)
        if "deepspeed.launcher.launch" in proc.cmdline():
            _runner.append((proc, proc.ppid()))
    except psutil.Error:
        pass


def _runner_gone() -> bool:
    try:
        return any(proc.ppid() != ppid for proc, ppid in _runner)
    except psutil.Error:  # launch.py itself is gone: PR_SET_PDEATHSIG sends this rank SIGTERM
        return False
