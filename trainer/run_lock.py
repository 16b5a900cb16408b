"""One job per run directory: an advisory lock on the directory itself.

Two jobs on one `run.name` (a requeued job while the first still runs, the same command in two shells)
both resumed from `latest`, then wrote the same checkpoint tags, `latest` and `metrics.jsonl` over each
other. Rank 0 of a training job holds an exclusive `flock` on `runs/<name>/` for its whole life; the
kernel releases it when the process ends, however it ends (SIGKILL too), so a lock is never stale. The
launcher and the tools that change a run directory (`trainer.rollback`, `trainer.reshard`) refuse a
directory another process holds, naming it when it runs on this machine (/proc/locks). The lock is on
the directory, not a file in it: a refused start still leaves the run directory byte-identical. A
filesystem that cannot lock a directory (NFS emulates flock with POSIX locks, which a directory cannot
take) gets a note and no lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_held: dict[Path, int] = {}  # run directory -> open descriptor; closing it releases the lock


def claim(run_dir: Path) -> None:
    """Hold the run directory until this process ends; ValueError when another process holds it."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    fd = _take(run_dir)
    if fd is not None:
        _held[run_dir] = fd


def release(run_dir: Path) -> None:
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


@contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """The lock for the length of a tool's change to a run directory (rollback, reshard); one this process held
    already (a training rank 0) stays held."""
    taken = run_dir.resolve() not in _held
    claim(run_dir)
    try:
        yield
    finally:
        if taken:
            release(run_dir)


def check_free(run_dir: Path) -> None:
    """Refuse (ValueError) a run directory another process holds; takes nothing. The launcher asks before
    its ranks start, so a second job is one line instead of ranks started and stopped; rank 0's `claim`
    decides."""
    run_dir = run_dir.resolve()
    if run_dir in _held or not run_dir.is_dir():
        return
    fd = _take(run_dir, quiet=True)
    if fd is not None:
        os.close(fd)


def _take(run_dir: Path, quiet: bool = False) -> int | None:
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:  # a missing or unreadable run directory is refused where it is made
        if not quiet:
            _no_lock(run_dir, err)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ValueError(f"run directory {run_dir} is in use by another job{holder}: wait for it to end or stop "
                         f"it, or choose another run.name") from None
    except OSError as err:
        os.close(fd)
        if not quiet:
            _no_lock(run_dir, err)
        return None
    return fd


def _no_lock(run_dir: Path, err: OSError) -> None:
    print(f"note: cannot lock {run_dir} ({err.strerror or err}): a second job on this run directory would not "
          f"be refused", flush=True)


def _holder(fd: int) -> str:
    """' (pid N: its command line)' when a process on this machine holds the lock, else ''."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            pid = fields[4]
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return f" (pid {pid})"
            return f" (pid {pid}: {' '.join(cmd.split())[:200]})"
    return ""
