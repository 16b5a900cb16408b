"""`python -m trainer.memory compare RUN_DIR [RUN_DIR ...] [--out DIR]`: runs' memory reports side by side.

Reads each run's `memory_report.json` (written by `trainer.memory.write_run_report`), prints a markdown
table by category with each run's figure and its ratio to the first run, and writes the table
(`memory_compare.md`) and a bar chart (`memory_compare.png`) into `--out` (default: the first run's
directory, beside the reports it reads rather than wherever the command was started). Figures are the
largest over a run's ranks: the busiest rank is the one that must fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainer.argtypes import non_empty, reader_may_leave, refuse_repeats
from trainer.memory import CATEGORIES, MIB, REPORT_JSON, OneLineParser

COMPARE_MD, COMPARE_PNG = "memory_compare.md", "memory_compare.png"
LAYOUT_KEYS = ("world_size", "zero_stage", "expert_parallel_size", "precision", "unique_params", "expert_banks",
               "moe_layers")


def rows() -> list[tuple[str, str]]:
    """(label, per-rank key) in table order: model states by category and kind, then total and peak."""
    out = [(f"{cat} ({kind})", f"{kind}_{cat}_bytes") for cat in CATEGORIES for kind in ("expert", "other")]
    return out + [("model states total", "total_bytes"), ("peak", "peak")]


def load_report(run_dir: str) -> dict[str, Any]:
    """One run's report; a missing directory or report is a ValueError naming it."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run directory {run_dir}: {'not a directory' if path.exists() else 'not found'}")
    report = path / REPORT_JSON
    if not report.is_file():
        raise ValueError(f"run directory {run_dir}: no {REPORT_JSON} (written after the run's first optimizer step)")
    try:
        loaded = json.loads(report.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{report}: invalid JSON ({err})") from None
    ranks = loaded.get("per_rank") if isinstance(loaded, dict) else None
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) for r in ranks):
        raise ValueError(f"{report}: not a memory report (expected an object with a per_rank list of objects)")
    for key in LAYOUT_KEYS:  # the table's layout lines read these: a hand-edited report is named, not a KeyError
        if key not in loaded:
            raise ValueError(f"{report}: not a memory report (no {key!r})")
    for i, rank in enumerate(ranks):
        for key, value in rank.items():
            if key.endswith("_bytes") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{report}: per_rank[{i}].{key}={value!r}: expected a number of bytes")
    return loaded


def peak_bytes(rank: dict[str, int]) -> int:
    """GPU: max allocated; CPU: the resident-set high-water mark."""
    return rank.get("peak_allocated_bytes", rank.get("peak_rss_bytes", 0))


def figure(report: dict[str, Any], key: str) -> int:
    """The largest value of `key` over the run's ranks."""
    per_rank = report["per_rank"]
    return max(peak_bytes(r) if key == "peak" else r.get(key, 0) for r in per_rank)


def column_names(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, or the path as given where two names would collide."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, run_dirs)]


def render_table(reports: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown: one row per category, one column per run (MiB, with the ratio to the first run)."""
    header = "| category (MiB, max over ranks) | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for text, key in rows():
        base = figure(reports[0], key)
        cells = []
        for i, report in enumerate(reports):
            value = figure(report, key)
            ratio = "" if i == 0 else (f" ({value / base:.3f}x)" if base else " (-)")
            cells.append(f"{value / MIB:,.2f}{ratio}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    layout = [f"{name}: {r['world_size']} ranks, ZeRO-{r['zero_stage']}, EP {r['expert_parallel_size']}, "
              f"{r['precision']}, {r['unique_params']:,} unique params, {r['expert_banks']}/{r['moe_layers']} "
              f"expert banks/MoE layers" for name, r in zip(names, reports)]
    return "\n".join(lines + [""] + [f"- {line}" for line in layout]) + "\n"


def plot(reports: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Grouped bars (MiB) per category, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [text for text, _ in rows()]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(labels)), 4.5))
    for i, (report, name) in enumerate(zip(reports, names)):
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [figure(report, key) / MIB for _, key in rows()], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("MiB (max over ranks)")
    ax.set_yscale("log")
    ax.set_title("memory per rank by category")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_main(argv: list[str]) -> int:
    parser = OneLineParser(prog="python -m trainer.memory compare", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", type=non_empty("a directory for memory_compare.md and .png"),
                        help="where memory_compare.md and memory_compare.png go (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    refuse_repeats("RUN_DIR", [os.path.realpath(d) for d in args.run_dirs])  # one run twice is no comparison
    reports = [load_report(d) for d in args.run_dirs]
    names = column_names(args.run_dirs)
    out = Path(args.out if args.out is not None else args.run_dirs[0])
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={args.out}: not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a folder under a file
        raise ValueError(f"--out={args.out}: cannot create it ({err.strerror or err})") from None
    table = render_table(reports, names)
    with reader_may_leave():
        print(table, end="")
    (out / COMPARE_MD).write_text(table)
    plot(reports, names, out / COMPARE_PNG)
    print(f"wrote {out / COMPARE_MD} and {out / COMPARE_PNG}")
    return 0
