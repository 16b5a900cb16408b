"""Which ZeRO-3 knobs to ship: the trainer's own step under several `zero_optimization` settings, side by side.

    python benchmarks/zero3_settings.py [--steps N] [--repeats R] [--json OUT] [key=value ...]

Builds one engine per variant in the same 2 CPU ranks (same model, data and seed; default cell:
tied g=2, ZeRO-3, EP 2) and times `trainer.session.train_step` on each in alternating blocks, so
load on the shared machine hits every variant alike. Per variant it also counts one step's ZeRO-3
all-gathers (expert vs other elements): a parameter below the persistence threshold is gathered once
and never released, so it disappears from the count. The `numactl` variant unsets `LOCAL_SIZE` (see
`trainer.engine.set_cpu_local_size`) during its blocks only. Only ratios against `strict` mean
anything on a CPU. `strict+numactl` differs from `strict` only by the forks (cheap where numactl is
not installed, as on the machine these results come from: the fork fails at exec), so its ratio is
also a rough read of the machine's noise. "median/round" is the median of per-round ratios, robust
to bursts of load from other users. Writes benchmarks/results/zero3_settings_cpu*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer import engine as eng  # noqa: E402
from trainer.bench import (DEFAULT_OVERRIDES, gathers_per_step, mfu, mfu_basis, mfu_note, refuse_overrides,  # noqa: E402
                           timed_rounds, timed_steps, timing_main)
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.session import open_session  # noqa: E402

# name -> zero_optimization keys on top of {"stage": 3, "contiguous_gradients", "reduce_scatter"};
# None means DeepSpeed's default (prefetch bucket 5e7 elements, persistence threshold 1e5 elements).
VARIANTS: dict[str, dict[str, Any]] = {
    "strict": {"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0},
    "strict+numactl": {"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0},
    "prefetch": {"stage3_param_persistence_threshold": 0},
    "persist": {"stage3_prefetch_bucket_size": 0},
    "defaults": {},
}


def variant_file(directory: Path, name: str) -> Path:
    """A ds_config holding exactly this variant's knobs (each rank writes its own identical copy)."""
    zero = {"stage": 3, "contiguous_gradients": True, "reduce_scatter": True, **VARIANTS[name]}
    path = directory / f"{name.replace('+', '_')}.json"
    path.write_text(json.dumps({"zero_optimization": zero, "steps_per_print": 1000000}))
    return path


@contextlib.contextmanager
def environment_of(name: str) -> Iterator[None]:
    """The `numactl` variant times DeepSpeed's unpatched path: no LOCAL_SIZE, so every reduce-scatter forks."""
    if not name.endswith("numactl"):
        yield
        return
    saved = os.environ.pop("LOCAL_SIZE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_SIZE"] = saved


def worker(args: argparse.Namespace) -> None:
    eng.init_distributed()
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            cfg = load_config(None, DEFAULT_OVERRIDES + args.overrides
                              + [f"parallel.ds_config={variant_file(Path(tmp), name)}"])
            sessions[name] = open_session(cfg)
    blocks: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():
        with environment_of(name):
            timed_steps(s, 2)
    for _ in timed_rounds(args.repeats, "zero3_settings"):
        for name, s in sessions.items():
            with environment_of(name):
                blocks[name].append(timed_steps(s, args.steps))
    basis = mfu_basis(sessions["strict"])
    result: dict[str, Any] = {"overrides": args.overrides, "steps": args.steps, "repeats": args.repeats, **basis,
                              "variants": {}}
    for name, s in sessions.items():
        tokens_per_s = s.tokens_per_step * args.steps * args.repeats / sum(blocks[name])
        result["variants"][name] = {"zero_optimization": VARIANTS[name], "tokens_per_s": tokens_per_s,
                                    "mfu": mfu(basis, tokens_per_s, s.world),
                                    "block_seconds": blocks[name],
                                    "speed_vs_strict_median": per_round_median(blocks["strict"], blocks[name]),
                                    **gathers_per_step(s)}
    base = result["variants"]["strict"]["tokens_per_s"]
    for v in result["variants"].values():
        v["speed_vs_strict"] = v["tokens_per_s"] / base
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
    eng.shutdown()


def per_round_median(reference: list[float], other: list[float]) -> float:
    """Median over rounds of reference time / this variant's time in the same round: a burst of load
    from other users lands in one round and moves the mean, not the median."""
    return statistics.median(r / o for r, o in zip(reference, other))


def render(result: dict[str, Any]) -> str:
    lines = [f"ZeRO-3 settings, 2 CPU ranks; overrides: {' '.join(result['overrides']) or '(default cell)'}",
             f"{'variant':<16} {'speed vs strict':>15} {'median/round':>12} {'MFU':>7} {'expert gather elems/step':>25} "
             f"{'other gather elems/step':>24}"]
    for name, v in result["variants"].items():
        lines.append(f"{name:<16} {v['speed_vs_strict']:>15.3f} {v['speed_vs_strict_median']:>12.3f} "
                     f"{100 * v['mfu']:>6.2f}% "
                     f"{v['expert_gather_elements']:>25,} "
                     f"{v['other_gather_elements']:>24,}")
    lines.append(mfu_note(result))
    return "\n".join(lines)


def check(cfg: TrainConfig, overrides: list[str]) -> None:
    """Each variant is its own ds_config (VARIANTS): one given on the command line would be replaced."""
    refuse_overrides(overrides, ("parallel.ds_config",), "zero3_settings.py")


def main(argv: list[str] | None = None) -> int:
    return timing_main(argv, __doc__, "benchmarks.zero3_settings", worker, render,
                       (5, 4, "zero3_settings_cpu.json", "variant"), check=check)


if __name__ == "__main__":
    sys.exit(main())
