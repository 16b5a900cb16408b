"""argparse types and checks the tools share, so a bad count or output path is refused as it is parsed, before any
rank starts or any measuring is done (ending in argparse's `error:` line and exit 2)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn


def positive_int(text: str) -> int:
    """A count of at least 1 (0 steps or repeats would time nothing and divide by zero)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_empty(expected: str) -> Callable[[str], str]:
    """A flag's value that must say something: an empty one (`--out ''`, a shell variable that was unset) was
    read as 'not given' and fell back to a default (exporting over the default export), or matched everything."""

    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{text!r} is empty; expected {expected}")
        return text

    return check


def output_file(text: str) -> str:
    """The file a tool writes when it ends: refused at once (its folders made) if it cannot be written
    there, rather than with a traceback after minutes of measuring."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{str(blocking)!r} is a file, not a folder" if blocking is not None else err.strerror or err
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {why}") from None
    return text


def input_file(text: str) -> Path:
    """A file a tool reads: a missing one, or a folder, is refused as it is parsed (not read as empty, nor a
    traceback once the tool has started)."""
    return _existing(text, folder=False)


def input_folder(text: str) -> Path:
    """A folder a tool reads (and may write its results into): missing, or a file, refused as it is parsed."""
    return _existing(text, folder=True)


def _existing(text: str, folder: bool) -> Path:
    path = Path(text)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise argparse.ArgumentTypeError(f"{text!r} is a {other}, expected a {kind}")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: {kind} not found")
    return path


def refuse_repeats(flag: str, values: Sequence[object]) -> None:
    """A list flag (sizes, cells, variants, tasks) naming one entry twice would measure or score it twice, and
    count it twice in a mean: ValueError naming the flag and the repeated entry."""
    seen: set[object] = set()
    for value in values:
        if value in seen:
            shown = ",".join(str(v) for v in values)
            raise ValueError(f"{flag} {shown}: {value} is given twice; give each entry once")
        seen.add(value)


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """Around what a command prints to stdout: when its reader stops early (`... --help | head -1`), the rest
    is not wanted and nothing is wrong, so the command goes on quietly instead of ending in a BrokenPipeError
    traceback (stdout goes to /dev/null, so Python's flush at exit is quiet too)."""
    try:
        yield
        sys.stdout.flush()  # the last buffered lines fail here, inside the block, not at interpreter exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end with one `error: ...` line and exit 2 (argparse would add a usage block, and its
    `PROG: error:` line would not start with `error:` as every other refusal of the tools does)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def refuse_beside(self, args: argparse.Namespace, dest: str) -> None:
        """`--DEST` does its one thing and reads no other argument: one given with it (`--plot J --steps 3`)
        would be ignored silently, so it is refused."""
        for action in self._actions:
            value = getattr(args, action.dest, None)
            if action.dest in (dest, "help") or value == action.default or (value == [] and action.default is None):
                continue
            name = "/".join(action.option_strings) or " ".join(map(str, value if isinstance(value, list) else [value]))
            self.error(f"--{dest.replace('_', '-')} takes no other arguments; {name} was given too")
