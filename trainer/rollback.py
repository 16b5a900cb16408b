"""Continue a run from an older checkpoint than `latest` (after a loss spike, a bad data stretch, a bad change).

    python -m trainer.rollback RUN_DIR --tag stepNNNNNNNN

A run resumes from the tag `latest` names. This tool verifies the chosen tag (every file against its
manifest, as a resume does), moves the newer tags into `RUN_DIR/replaced-<time>/checkpoints/` (kept, not
deleted: move them back to undo), copies `metrics.jsonl` there too, and points `latest` at the tag in
one atomic rename. The next start of the run (same config and run.name) continues from that step: it
drops the later rows of metrics.jsonl and TensorBoard hides their events (purge_step), so the curves
continue from the tag. Nothing is moved when the tag does not verify; an unknown tag names the ones
there are. A run still training is refused (`trainer.run_lock`): stop it first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trainer import checkpoint, run_lock
from trainer.argtypes import OneLineParser


def rollback(run_dir: str | Path, tag: str) -> tuple[list[str], Path | None]:
    """Make `tag` the run's `latest`; returns the newer tags moved aside and where (None: nothing newer)."""
    run_dir = Path(run_dir).resolve()
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ValueError(f"run directory {run_dir}: no checkpoints/ folder (is it a run directory?)")
    with run_lock.held(run_dir):  # a job training this run would write its next checkpoint over the rollback
        return _roll_back(run_dir, ckpt_dir, tag)


def _roll_back(run_dir: Path, ckpt_dir: Path, tag: str) -> tuple[list[str], Path | None]:
    tags = checkpoint.step_tags(ckpt_dir)
    if tag not in tags:
        there = ", ".join(tags) if tags else "none"
        raise ValueError(f"--tag {tag!r}: no such checkpoint under {ckpt_dir} (there: {there})")
    checkpoint.verify_tag(ckpt_dir, tag)
    newer = [t for t in tags if t > tag]
    aside = None
    try:
        if newer:
            aside = checkpoint.aside_dir(run_dir)
            (aside / "checkpoints").mkdir(parents=True)
            if (run_dir / "metrics.jsonl").is_file():  # the next start drops its rows after the tag's step
                shutil.copy2(run_dir / "metrics.jsonl", aside / "metrics.jsonl")
        checkpoint.point_latest(ckpt_dir, tag)  # first: a crash below leaves extra tags, never a lost latest
    except OSError as err:  # an unwritable run directory: a traceback, and a replaced-<time>/ left for nothing
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise ValueError(f"cannot roll back {run_dir} ({checkpoint.os_error_text(err)}); nothing was changed") from None
    for i, name in enumerate(newer):
        try:
            (ckpt_dir / name).rename(aside / "checkpoints" / name)
        except OSError as err:
            raise ValueError(f"{ckpt_dir / checkpoint.LATEST} now names {tag}, but {ckpt_dir / name} could not be "
                             f"moved to {aside} ({checkpoint.os_error_text(err)}): move {', '.join(newer[i:])} "
                             f"there before starting the run (it would write its checkpoints over them)") from None
    return newer, aside


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m trainer.rollback", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (runs/<name>)")
    parser.add_argument("--tag", required=True, help="the checkpoint to continue from, like step00000100")
    args = parser.parse_args(argv)
    try:
        newer, aside = rollback(args.run_dir, args.tag)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    copied = " and a copy of metrics.jsonl" if aside is not None and (aside / "metrics.jsonl").is_file() else ""
    moved = f"; moved {', '.join(newer)}{copied} to {aside}" if newer else ""
    print(f"{Path(args.run_dir) / 'checkpoints' / checkpoint.LATEST} -> {args.tag}{moved}. Start the run again "
          f"(same config and run.name) to continue from {args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
