"""Entry point behind run.sh: `[CONFIG.yaml] [key=value ...]`.

Under a launcher (torchrun / `deepspeed run.sh ...`, which set RANK and WORLD_SIZE) it trains on
this rank; started directly it hands over to `trainer.launch`, which starts the local ranks.
"""

from __future__ import annotations

import os
import sys

from trainer.config import load_config
from trainer.engine import shutdown
from trainer.launch import launch
from trainer.train import train


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Drop the launcher's --local_rank, then take an optional YAML path and key=value overrides."""
    args = []
    for arg in argv:
        if arg.startswith("--local_rank"):
            if "=" in arg:
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        args.append(arg)
    config = None
    if args and "=" not in args[0]:
        config = args.pop(0)
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected key=value (only the first argument may be a config file)")
    return config, args


def main(argv: list[str]) -> int:
    try:
        config, overrides = split_args(argv)
        cfg = load_config(config, overrides)  # fail fast, before any process starts
        if "RANK" not in os.environ:
            return launch(cfg, config, overrides)
        train(cfg)
        shutdown()  # does not return
        return 0
    except ValueError as err:
        # One line, even when the message quotes a multi-line YAML parser error.
        print("error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()), file=sys.stderr)
        return 2
