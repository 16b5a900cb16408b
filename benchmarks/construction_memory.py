"""Host memory to build a model on 2 CPU ranks at ZeRO-3: tiedmoe's partitioned build vs building it whole first.

    python benchmarks/construction_memory.py [--paths partitioned,plain] [--json OUT] [key=value ...]

Default model: OLMoE-shaped (d_model 2048, 16 layers, vocab 50304) with 12 experts of width 1024 per MoE layer,
tied in pairs (g=2): 1.23B unique parameters, 4.6 GiB in fp32. ZeRO-3, expert parallel 2, fp32; key=value
overrides change it (e.g. `model.n_layers=8` for a quick look).

Each path runs in fresh ranks, so each rank's resident-set high-water mark (VmHWM) belongs to that path alone:
- `partitioned`: `trainer.engine.build` (deepspeed.zero.Init; followers build no bank; AutoEP's blocks are
  built from the partitions and a follower's gets its leader's bank), what `./run.sh` does at ZeRO-3;
- `plain`: `models.transformer.build_model` (the whole model on every rank, partitioned by the engine).

Per rank: the resident set before building (imports and process group), its peak when the model is complete
(EP blocks in place, tied, partitioned, no optimizer state yet: `engine.initialize(on_built=...)`), and the
peak once the engine is ready (ZeRO-3 adds fp32 flat partitions of the weights for the optimizer). Ratios
are to the full fp32 model (unique parameters x 4 bytes); the goal for the partitioned build is a peak of at
most 0.6 of it while building, where the plain build needs more than the whole model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.accounting import account  # noqa: E402
from models.transformer import build_model  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.argtypes import OneLineParser, output_file, refuse_repeats  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.launch import collect_from_cpu_ranks, write_report  # noqa: E402
from trainer.metrics import memory_gib, strict  # noqa: E402

DEFAULT_OVERRIDES = ["model.preset=olmoe", "model.n_experts=12", "model.top_k=2", "model.tie_group_size=2",
                     "parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2",
                     "data.source=random", "data.seq_len=32", "batch.micro_batch_size=1", "run.precision=fp32"]
GOAL = 0.6
GIB = 2**30


def worker(args: argparse.Namespace) -> None:
    eng.init_distributed()
    cfg = load_config(None, DEFAULT_OVERRIDES + args.overrides).for_world(eng.world_size())
    model_cfg = cfg.model_config()
    before = memory_gib()["rss_gib"]
    if args.path == "partitioned":
        model = eng.build(model_cfg, cfg)
    else:
        model = build_model(model_cfg, seed=cfg.run.seed)
    at_built: dict[str, float] = {}

    def built() -> None:
        at_built.update(memory_gib())
        if args.until == "built":
            raise _Built

    try:
        eng.initialize(model, cfg, on_built=built)
        ready = memory_gib()
    except _Built:
        ready = {"peak_rss_gib": math.nan, "rss_gib": math.nan}
    mine = [before, at_built["peak_rss_gib"], ready["peak_rss_gib"], ready["rss_gib"]]
    per_rank = [eng.gather_over_ranks(v) for v in mine]
    if eng.rank() == 0:
        keys = ["rss_before_gib", "peak_built_gib", "peak_engine_ready_gib", "rss_engine_ready_gib"]
        Path(args.json_raw).write_text(json.dumps(strict({k: v for k, v in zip(keys, per_rank)})))
    eng.shutdown()


class _Built(Exception):
    """Raised from `on_built` to stop before the optimizer (`--until built`: large models, less memory)."""


def measure(path: str, until: str, overrides: list[str]) -> dict[str, Any]:
    result = collect_from_cpu_ranks(["benchmarks.construction_memory", "--worker", "--path", path, "--until", until,
                                     *overrides])
    if isinstance(result, int):
        raise SystemExit(f"error: the {path} build failed on the ranks (exit {result}); their output is above")
    return result


def render(report: dict[str, Any]) -> str:
    full = report["full_fp32_gib"]
    lines = [f"model: {report['unique_params'] / 1e9:.2f}B unique parameters, full fp32 {full:.2f} GiB; "
             f"2 CPU ranks, ZeRO-3, EP {report['expert_parallel_size']}, g={report['tie_group_size']}",
             "", "| build | rank | RSS before | peak, model built | / full fp32 | peak, engine ready | / full fp32 |",
             "|---|---|---|---|---|---|---|"]
    for path, r in report["paths"].items():
        for rank, (b, built, ready) in enumerate(zip(r["rss_before_gib"], r["peak_built_gib"],
                                                     r["peak_engine_ready_gib"])):
            ready_cells = "- | -" if ready is None else f"{ready:.2f} GiB | {ready / full:.2f}"
            lines.append(f"| {path} | {rank} | {b:.2f} GiB | {built:.2f} GiB | {built / full:.2f} | {ready_cells} |")
    part = report["paths"].get("partitioned")
    if part:
        worst = max(part["peak_built_gib"]) / full
        lines += ["", f"partitioned build: peak {worst:.2f} x full fp32 while building (goal <= {GOAL}): "
                      f"{'met' if worst <= GOAL else 'NOT met'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="partitioned,plain", help="partitioned and/or plain, comma-separated")
    parser.add_argument("--json", type=output_file, default=str(REPO / "benchmarks" / "results" / "construction_memory_cpu.json"))
    parser.add_argument("--until", choices=["built", "ready"], default="ready",
                        help="stop once the model is built (large models: no optimizer partitions) or the engine is ready")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides of the model and layout")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in ("partitioned", "plain")]
    if bad or not paths:
        print(f"error: --paths {args.paths!r}: expected 'partitioned' and/or 'plain', comma-separated", file=sys.stderr)
        return 2
    try:
        refuse_repeats("--paths", paths)
        cfg = load_config(None, DEFAULT_OVERRIDES + args.overrides).for_world(2)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_cfg = cfg.model_config()
    unique = account(model_cfg, cfg.data.seq_len).unique_params
    report = {"unique_params": unique, "full_fp32_gib": unique * 4 / GIB, "overrides": DEFAULT_OVERRIDES + args.overrides,
              "tie_group_size": model_cfg.tie_group_size, "expert_parallel_size": cfg.parallel.expert_parallel_size,
              "goal_peak_over_full": GOAL, "until": args.until,
              "paths": {p: measure(p, args.until, args.overrides) for p in paths}}
    return write_report(report, render, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
