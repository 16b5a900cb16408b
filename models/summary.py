"""Print a model's size and FLOPs without building it, and per-rank memory for a parallel layout.

    python -m models.summary PRESET [key=value ...] [--world N --ep E --zero S --precision bf16|fp32]
    python -m models.summary olmoe tie_group_size=2
    python -m models.summary olmoe tie_group_size=4 --world 64 --ep 8 --zero 3
"""

from __future__ import annotations

import argparse
import sys

from models.accounting import account, check_layout, rank_memory
from models.config import from_preset, plan_notes, tie_groups, untied
from models.overrides import model_field_overrides
from trainer.argtypes import reader_may_leave


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render(preset: str, overrides: dict) -> str:
    cfg = from_preset(preset, **overrides)
    acc = account(cfg)
    rows = [
        ("unique params", _fmt(acc.unique_params)),
        ("params if untied", _fmt(acc.untied_params)),
        ("active params / token", _fmt(acc.active_params_per_token)),
        ("unique FFN params", _fmt(acc.unique_ffn_params)),
        ("untied FFN params", _fmt(acc.untied_ffn_params)),
        ("FFN reduction vs untied", f"{100 * acc.ffn_reduction:.1f}%"),
        ("expert banks / MoE layers", f"{acc.expert_banks} / {acc.moe_layers}"),
        (f"train FLOPs / token (seq {acc.seq_len})", _fmt(acc.train_flops_per_token)),
        ("tie groups", " ".join(str(g) for g in tie_groups(cfg) if len(g) > 1) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{preset} " + " ".join(f"{k}={v}" for k, v in overrides.items())]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"  note: {n}" for n in plan_notes(cfg)]
    return "\n".join(lines)


def render_memory(preset: str, overrides: dict, world: int, ep: int, zero: int, precision: str) -> str:
    """Tied vs untied model-state memory per rank (GiB) for one layout."""
    cfg = from_preset(preset, **overrides)
    tied_mem, untied_mem = (rank_memory(c, world, ep, zero, precision) for c in (cfg, untied(cfg)))
    lines = [f"  per-rank model states, {world} ranks, EP {ep}, ZeRO-{zero}, {precision} (GiB):",
             f"  {'':<18} {'tied':>8} {'untied':>8} {'ratio':>6}"]
    for field in ("expert_params", "other_params", "grads", "master_params", "optimizer_state", "total"):
        t, u = getattr(tied_mem, field), getattr(untied_mem, field)
        ratio = f"{t / u:.3f}" if u else "-"
        lines.append(f"  {field:<18} {t / 2**30:>8.2f} {u / 2**30:>8.2f} {ratio:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:  # anywhere, as argparse allows (`olmoe --help` was an error)
        with reader_may_leave():
            print(__doc__)
        return 0
    try:
        args = _parser().parse_intermixed_args(argv)  # key=value before or after the layout flags
        overrides = model_field_overrides(args.overrides)
        layout = (1 if args.ep is None else args.ep, 3 if args.zero is None else args.zero, args.precision or "bf16")
        if args.world is None and (args.ep, args.zero, args.precision) != (None, None, None):
            raise ValueError("--ep, --zero and --precision describe a layout: give --world too")
        if args.world is not None:  # validate before printing anything: no half a report for a bad layout
            check_layout(from_preset(args.preset, **overrides), args.world, *layout)
        with reader_may_leave():
            print(render(args.preset, overrides))
            if args.world is not None:
                print(render_memory(args.preset, overrides, args.world, *layout))
    except ValueError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting, so errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m models.summary", add_help=False)
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--world", type=int)
    parser.add_argument("--ep", type=int)  # default 1
    parser.add_argument("--zero", type=int)  # default 3
    parser.add_argument("--precision")  # default bf16
    return parser


if __name__ == "__main__":
    sys.exit(main())
