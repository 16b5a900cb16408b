"""Per-rank model-state memory, tied vs untied, measured from the tensors each rank actually holds.

    python -m trainer.memory [--json OUT] [key=value ...]

Builds the configured (tied) model and its untied twin on 2 CPU ranks, takes one optimizer step so
optimizer state exists, then sums per rank the bytes of: parameters as held (the ZeRO-3 partition
or the EP shard), the optimizer's own parameter copies (fp32 master / flat partitions, when distinct
from the module's), and optimizer state (Adam moments). Expert and non-expert parameters are
reported apart, because tying only shrinks the former. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer import engine as eng
from trainer.bench import DEFAULT_OVERRIDES, tied_and_untied
from trainer.config import REPO_ROOT, load_config
from trainer.launch import report_from_cpu_ranks
from trainer.session import open_session, train_step


def measure(engine: Any) -> dict[str, int]:
    """Bytes of model states this rank holds. Parameters count their own elements (ZeRO-3 partitions
    are views into one flat buffer); optimizer copies count unless they share a parameter's storage."""
    out = {"expert_param_bytes": 0, "other_param_bytes": 0, "optimizer_param_bytes": 0, "optimizer_state_bytes": 0}
    param_storages = set()
    for p in engine.module.parameters():
        held = eng.held_tensor(p)
        param_storages.add(held.untyped_storage().data_ptr())
        out["expert_param_bytes" if eng.is_expert_param(p) else "other_param_bytes"] += held.numel() * held.element_size()
    counted: set[int] = set()
    for key, tensors in (("optimizer_param_bytes", eng.optimizer_master_tensors(engine)),
                         ("optimizer_state_bytes", eng.optimizer_state_tensors(engine))):
        for t in tensors:
            if id(t) in counted or t.untyped_storage().data_ptr() in param_storages:
                continue
            counted.add(id(t))
            out[key] += t.numel() * t.element_size()
    out["total_bytes"] = sum(out.values())
    return out


def worker(args: argparse.Namespace) -> None:
    eng.init_distributed()
    result: dict[str, Any] = {"overrides": args.overrides, "world_size": eng.world_size()}
    for name, cfg in tied_and_untied(args.overrides).items():
        s = open_session(cfg)
        train_step(s, cfg.optim.lr)  # optimizer state exists after the first step
        mine = measure(s.engine)
        per_key = {key: eng.gather_over_ranks(float(value)) for key, value in mine.items()}
        result[name] = {"per_rank": [{key: int(per_key[key][r]) for key in mine} for r in range(eng.world_size())],
                        "zero_stage": s.engine.zero_optimization_stage(), "precision": cfg.run.precision}
        s.close()
        del s
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
    eng.shutdown()


def render(result: dict[str, Any]) -> str:
    keys = ["expert_param_bytes", "other_param_bytes", "optimizer_param_bytes", "optimizer_state_bytes",
            "total_bytes"]
    lines = [f"per-rank model-state memory (KiB), ZeRO-{result['tied']['zero_stage']}, "
             f"{result['tied']['precision']}, {result['world_size']} ranks; overrides: "
             f"{' '.join(result['overrides']) or '(default config)'}",
             f"{'rank':<5} {'what':<24} {'tied':>10} {'untied':>10} {'ratio':>7}"]
    for rank, (t, u) in enumerate(zip(result["tied"]["per_rank"], result["untied"]["per_rank"])):
        for key in keys:
            ratio = f"{t[key] / u[key]:.3f}" if u[key] else "-"
            lines.append(f"{rank:<5} {key.replace('_bytes', ''):<24} {t[key] / 1024:>10,.0f} {u[key] / 1024:>10,.0f} "
                         f"{ratio:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "memory_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to both variants")
    args = parser.parse_args(argv)
    load_config(None, DEFAULT_OVERRIDES + args.overrides)  # fail fast on bad overrides
    if args.worker:
        worker(args)
        return 0
    return report_from_cpu_ranks(["trainer.memory", "--worker", *args.overrides], render, args.json)


if __name__ == "__main__":
    sys.exit(main())
