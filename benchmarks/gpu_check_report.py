"""Collect what benchmarks/gpu_check.sh measured into gpu_check.json and a markdown summary.

    python benchmarks/gpu_check_report.py OUT_DIR --steps STEPS.jsonl [--default-metrics M.json] [--dry-run 0|1]

Reads default_run.json, parity.json, throughput.json and activations.json from OUT_DIR (each may be missing when its
step failed: the summary then says so instead of failing), writes OUT_DIR/gpu_check.json and
OUT_DIR/summary.md, prints the summary, and exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.argtypes import OneLineParser, input_file, input_folder, reader_may_leave  # noqa: E402
from trainer.parity import cell_tolerance, grad_norm_tolerance  # noqa: E402

LOSS_TOL = 1e-5


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu ({platform.machine()}), torch {torch.__version__}"


def parity_lines(parity: dict[str, Any] | None) -> tuple[list[str], bool]:
    if parity is None:
        return ["parity: no result (see gpu_check.log)"], False
    lines = ["| cell | max abs loss diff | tolerance | grad-norm rel diff, step 1 | pass |", "|---|---|---|---|---|"]
    ok = True
    for name, c in parity["cells"].items():
        passed = (c["max_abs_loss_diff"] <= cell_tolerance(name, LOSS_TOL)
                  and c["first_rel_grad_norm_diff"] <= grad_norm_tolerance(name))
        ok = ok and passed
        lines.append(f"| {name} | {c['max_abs_loss_diff']:.2e} | {cell_tolerance(name, LOSS_TOL):.0e} | "
                     f"{c['first_rel_grad_norm_diff']:.2e} | {'yes' if passed else 'NO'} |")
    return lines, ok


def throughput_lines(tp: dict[str, Any] | None) -> list[str]:
    if tp is None:
        return ["throughput: no result (see gpu_check.log)"]
    lines = [f"Budget {tp['budget_gib_per_rank']:.2f} GiB per rank (untied peak at micro-batch "
             f"{tp['common_micro_batch']}); peak FLOP/s {tp['peak_flops_per_rank']:.3g} ({tp['peak_flops_source']}); "
             f"overrides: `{' '.join(tp['overrides'])}`", "",
             "| variant | peak GiB at common mb | tokens/s equal mb | MFU | ratio vs untied | mb at budget | "
             "peak GiB | tokens/s equal memory | MFU | ratio vs untied |", "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for v, r in tp["variants"].items():
        lines.append(f"| {v} | {r['peak_gib_at_common_micro_batch']:.2f} | {r['tokens_per_s_equal_batch']:,.0f} | "
                     f"{100 * r['mfu_equal_batch']:.1f}% | {fmt(r.get('ratio_equal_batch'), '.3f')} | "
                     f"{fmt(r['micro_batch_equal_memory'], 'd')} | {fmt(r['peak_gib_equal_memory'], '.2f')} | "
                     f"{fmt(r['tokens_per_s_equal_memory'], ',.0f')} | "
                     f"{fmt(r['mfu_equal_memory'], '.1%')} | "
                     f"{fmt(r.get('ratio_equal_memory'), '.3f')} |")
    return lines


def activation_lines(act: dict[str, Any] | None) -> list[str]:
    if act is None:
        return ["activations: no result (see gpu_check.log)"]
    from benchmarks.activation_memory import render

    return render(act).splitlines()


def default_lines(summary: dict[str, Any] | None, metrics: dict[str, Any] | None) -> list[str]:
    if summary is None:
        return ["default run: no summary (see gpu_check.log)"]
    keys = ("final_loss", "val_ce", "steps", "unique_params", "expert_banks", "moe_layers")
    line = ", ".join(f"{k} {summary[k]}" for k in keys if k in summary)
    if metrics:
        line += (f"; last interval: {metrics.get('tokens_per_s', float('nan')):,.0f} tokens/s, "
                 f"MFU {100 * (metrics.get('mfu') or 0):.1f}%, memory {metrics.get('memory')}")
    return [line]


def read_steps(parser: OneLineParser, path: Path) -> list[dict[str, Any]]:
    """gpu_check.sh's steps file: one JSON object a line with step, rc and seconds; anything else is refused."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--steps {path}: unreadable ({err.strerror if isinstance(err, OSError) else err.reason})")
    steps = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)
        except ValueError:
            step = None
        if not isinstance(step, dict) or not {"step", "rc", "seconds"} <= set(step):
            parser.error(f"--steps {path}: line {number} is not a JSON object with step, rc and seconds")
        steps.append(step)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=input_folder, help="the folder gpu_check.sh wrote its results into")
    parser.add_argument("--steps", type=input_file, required=True, help="JSON lines: step, rc, seconds")
    parser.add_argument("--default-metrics", type=input_file, help="last metrics.jsonl line of the default run")
    parser.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    args = parser.parse_args(argv)
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"argument out: cannot write gpu_check.json and summary.md into {str(args.out)!r}")
    steps = read_steps(parser, args.steps)
    default = read_json(args.out / "default_run.json")
    metrics = read_json(args.default_metrics) if args.default_metrics else None
    parity = read_json(args.out / "parity.json")
    throughput = read_json(args.out / "throughput.json")
    activations = read_json(args.out / "activations.json")
    plines, parity_ok = parity_lines(parity)
    failed = [s["step"] for s in steps if s["rc"] != 0]
    md = [f"# GPU check{' (dry run on CPU, tiny)' if args.dry_run else ''}", "",
          f"Device: {device_name()}. Steps: " + ", ".join(f"{s['step']} exit {s['rc']} in {s['seconds']} s" for s in steps),
          "", "## Default run (EP 1)", "", *default_lines(default, metrics),
          "", "## Parity vs the plain-PyTorch reference (one rank)", "", *plines,
          "", "## bf16 throughput and memory, tied vs untied", "", *throughput_lines(throughput),
          "", "## The memory planner's activation estimate vs the allocator", "", *activation_lines(activations), ""]
    (args.out / "summary.md").write_text("\n".join(md))
    report = {"device": device_name(), "dry_run": bool(args.dry_run), "steps": steps, "failed_steps": failed,
              "parity_pass": parity_ok, "default_run": default, "default_run_last_metrics": metrics,
              "parity": parity, "throughput": throughput,
              "activations": activations}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    with reader_may_leave():  # `... | head` is no error: the files are written already
        print("\n".join(md))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
