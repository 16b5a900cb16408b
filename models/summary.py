"""Print a model's size and FLOPs without building it.

    python -m models.summary PRESET [key=value ...]
    python -m models.summary olmoe tie_group_size=2
"""

from __future__ import annotations

import sys

from models.accounting import account
from models.config import from_preset, plan_notes, tie_groups
from models.overrides import parse_overrides


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        print(render(argv[0], parse_overrides(argv[1:])))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
