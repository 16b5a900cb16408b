"""`python -m trainer.memory docs [--out docs/memory.md] [--runs-dir DIR] [--steps N] [--reuse-runs]`.

Regenerates the memory docs page from measurements, so its numbers never go stale by hand:
1. the tiny default model tied (g=2, `trainer/configs/default.yaml`) and untied (`tiny_untied.yaml`)
   trained for a few steps as real runs (`./run.sh`, 2 CPU ranks, random tokens) in two layouts, each
   run writing its own `memory_report.json`; per layout the `compare` table and bar chart (PNG beside
   the page);
2. the planner's tables (`plan`, no model built) for the paper-size presets and a 30B-class model;
3. the ZeRO-3 construction measurements in `benchmarks/results/construction_memory_cpu*.json`, when
   `benchmarks/construction_memory.py` has written them (not run here: it needs ~10 GB and minutes).

`--reuse-runs` renders from the reports already in `--runs-dir` (no training): for a text change or
new construction results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from trainer.argtypes import output_file
from trainer.config import REPO_ROOT
from trainer.memory import MIB, OneLineParser
from trainer.memory_compare import column_names, figure, load_report, plot, render_table

# Layout directory: (section title, overrides). Both variants of a layout train with the same overrides.
LAYOUTS = {
    "zero3-ep2-bf16": ("ZeRO-3, expert parallel 2, bf16", [
        "parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2", "run.precision=bf16"]),
    "zero1-ep2-fp32": ("ZeRO-1, expert parallel 2, fp32", [
        "parallel.ds_config=ds_configs/zero1.json", "parallel.expert_parallel_size=2", "run.precision=fp32"]),
}
LAYOUT_NOTES = {"zero1-ep2-fp32": "fp32 ZeRO-1 reduces and frees the full gradients before the optimizer step "
                "begins, so the report counts the gradient partition held at the step while `rank_memory` counts the "
                "full gradients that exist at the end of backward: the grads error is that difference, not a miscount."}
# Untied first: the compare table gives ratios to the first run.
VARIANTS = {"untied": "trainer/configs/tiny_untied.yaml", "tied": "trainer/configs/default.yaml"}
RUN_OVERRIDES = ["data.source=random", "run.log_every=1", "run.eval_batches=1", "run.peak_flops=1e12"]

PLANS = [  # (title, why this layout, `plan` arguments)
    ("OLMoE-1B-7B", "The config's layout (ZeRO-3, EP 8, micro-batch 4 x 2048, checkpointing) on one node of 8 x 80 GB",
     ["trainer/configs/olmoe.yaml", "--gpus", "8", "--gpu-mem-gib", "80"]),
    ("Qwen3-MoE-style (paper)", "The config's layout (ZeRO-3, EP 4, micro-batch 4 x 2048, checkpointing) on 8 x 24 GB",
     ["trainer/configs/qwen3_moe.yaml", "--gpus", "8", "--gpu-mem-gib", "24"]),
    ("DeepSeek-MoE-style", "The config's layout (ZeRO-3, EP 8, micro-batch 4 x 2048, checkpointing; sized for "
     "8 x 80 GB) on 8 x 24 GB, where the model states decide the micro-batch",
     ["trainer/configs/deepseek_moe.yaml", "--gpus", "8", "--gpu-mem-gib", "24"]),
    ("30B class (Qwen3-30B-A3B shape: 48 layers, d 2048, 32/4 heads of 128, 128 experts top-8, FFN 768, "
     "vocab 151,936)", "One node of 8 x 80 GB, ZeRO-3, EP 8, micro-batch 1 x 4096, checkpointing",
     ["qwen3_moe", "d_model=2048", "n_layers=48", "n_heads=32", "n_kv_heads=4", "head_dim=128", "n_experts=128",
      "top_k=8", "expert_ffn_dim=768", "vocab_size=151936", "--gpus", "8", "--gpu-mem-gib", "80", "--ep", "8",
      "--micro-batch", "1", "--seq-len", "4096", "--activation-checkpointing"]),
]
CONSTRUCTION_GLOB = "construction_memory_cpu*.json"


def shown(path: Path) -> str:
    """A path as a reader types it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def run_command(runs_dir: Path, layout: str, variant: str, steps: int | str) -> list[str]:
    """`./run.sh` arguments of one run: the variant's config, the layout, a short run on random tokens."""
    return [VARIANTS[variant], *RUN_OVERRIDES, f"run.steps={steps}", *LAYOUTS[layout][1],
            f"run.out_dir={shown(runs_dir / layout)}", f"run.name={variant}"]


def train_runs(runs_dir: Path, steps: int) -> int:
    """Train every layout x variant through run.sh (the launcher starts 2 CPU ranks without a GPU).

    Returns 0, or the exit code of the first run that failed (after printing its output's tail)."""
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning")}
    for layout in LAYOUTS:
        for variant in VARIANTS:
            shutil.rmtree(runs_dir / layout / variant, ignore_errors=True)  # a fresh run, not a resume
            start = time.time()
            cmd = [sys.executable, str(REPO_ROOT / "run.sh"), *run_command(runs_dir, layout, variant, steps)]
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
                print(f"error: the {layout}/{variant} run failed (exit {proc.returncode}); its output is above",
                      file=sys.stderr)
                return proc.returncode
            print(f"trained {layout}/{variant} in {time.time() - start:.0f} s", flush=True)
    return 0


def machine_line() -> str:
    import torch

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    device = (f"GPU {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if torch.cuda.is_available()
              else "no GPU")
    return (f"{os.cpu_count()} CPUs ({platform.system()} {platform.machine()}), {device}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, deepspeed {pkg('deepspeed')}")


def max_error(report: dict[str, Any]) -> str:
    """The analytic estimate's largest |relative error| over ranks and categories, with its category."""
    worst = max(((abs(e), cat) for errors in report["analytic_error"] for cat, e in errors.items() if e is not None),
                default=None)
    if worst is None:
        return "-"
    return f"{100 * worst[0]:.1f}%" + (f" ({worst[1]})" if round(100 * worst[0], 1) else "")


def trained_steps(run_dir: Path) -> int | None:
    """`run.steps` from the run's resolved config.yaml (None when it has none)."""
    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def runs_section(runs_dir: Path, out: Path) -> list[str]:
    lines = ["## Tiny runs: tied (g=2) vs untied", "",
             "Each column is a real training run of the tiny default model (`./run.sh` for a few steps on random "
             "tokens; 2 CPU ranks without a GPU, else one rank per local GPU) that wrote its own "
             "`memory_report.json`; the tables are `python -m trainer.memory compare` of the untied and the tied "
             "run (MiB, largest over ranks, ratio to untied). Tying shrinks only the expert categories, by expert "
             "banks / MoE layers (6/8 = 0.750). On CPU the peak is the resident-set high-water mark (VmHWM), "
             "which also holds the libraries and allocator caches, so tying's few MiB hardly show in it.", ""]
    for layout, (title, _) in LAYOUTS.items():
        dirs = [runs_dir / layout / variant for variant in VARIANTS]
        reports = [load_report(str(d)) for d in dirs]
        names = column_names([str(d) for d in dirs])
        png = out.parent / f"memory_{layout.replace('-', '_')}.png"
        plot(reports, names, png)
        untied, tied = reports  # the order of VARIANTS
        ds = tied["deepspeed_estimate"]
        steps = trained_steps(dirs[0]) or "N"
        lines += [f"### {title}", "", "```bash"]
        lines += [f"./run.sh {shlex.join(run_command(runs_dir, layout, v, steps))}" for v in VARIANTS]
        lines += [f"python -m trainer.memory compare {' '.join(shown(d) for d in dirs)}", "```", "",
                  render_table(reports, names).rstrip("\n"), "",
                  f"![{title}: memory per rank by category, untied vs tied]({png.name})", "",
                  f"- Model states per rank: {figure(tied, 'total_bytes') / MIB:,.2f} MiB tied vs "
                  f"{figure(untied, 'total_bytes') / MIB:,.2f} untied.",
                  f"- Analytic estimate (`models.accounting.rank_memory`), largest error over ranks and categories: "
                  f"tied {max_error(tied)}, untied {max_error(untied)}.",
                  f"- DeepSpeed's estimator for this stage (per GPU, no EP, 16-bit weights + fp32 Adam whatever the "
                  f"precision, tied model): {ds['for_this_stage_bytes'] / MIB:,.2f} MiB"
                  + (f"; {ds['note']}." if "note" in ds else ".")]
        lines += [f"- {LAYOUT_NOTES[layout]}", ""] if layout in LAYOUT_NOTES else [""]
    return lines



def plan_section() -> list[str]:
    from trainer.memory_plan import render, run_plan

    lines = ["## Planner: paper-size presets", "",
             "`python -m trainer.memory plan` builds no model: per GPU, model states (`rank_memory`), activations "
             "of one micro-batch (the backward peak), ZeRO's workspace and a 1 GiB reserve, for g = 1, 2, 3, 4. "
             "Estimates, checked on CPU (model states exactly, saved activations to 1.7%); not counted: routing "
             "imbalance under EP and AutoEP's all-to-all buffers.", ""]
    for title, why, argv in PLANS:
        _, name, layout, rows = run_plan(argv)
        text = render(name, layout, rows).splitlines()
        notes = [f"- {line.removeprefix('note: ')}" for line in text if line.startswith("note: ")]
        lines += [f"### {title}", "", f"{why}:", "", "```bash", f"python -m trainer.memory plan {shlex.join(argv)}",
                  "```", "", *[line for line in text if not line.startswith("note: ")], ""]
        lines += [*notes, ""] if notes else []
    return lines


def construction_section(paths: list[Path]) -> list[str]:
    """The table of `benchmarks/construction_memory.py` results (GiB per rank, largest over ranks)."""
    lines = ["## Building at ZeRO-3", "",
             "Host memory per rank while building a model on 2 CPU ranks at ZeRO-3, EP 2, fp32: tiedmoe's "
             "partitioned build (`deepspeed.zero.Init`; followers build no bank) against building the whole model "
             "first (`plain`). Peaks are the resident-set high-water mark, largest over ranks, and their ratio to "
             "the full fp32 model (unique parameters x 4 bytes); the goal for the partitioned build is at most 0.6 "
             "while building. Measured by `python benchmarks/construction_memory.py` (about 10 GB of RAM and "
             "minutes, so not run by this command).", ""]
    if not paths:
        return lines + ["No results yet: `benchmarks/results/construction_memory_cpu*.json` do not exist. Run the "
                        "benchmark, then `python -m trainer.memory docs --reuse-runs` to add them here.", ""]
    lines += ["| results | unique params | full fp32 | build | RSS before | peak, model built | / full | "
              "peak, engine ready | / full |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for path in paths:
        lines += construction_rows(path)
    return lines + [""]


def construction_rows(path: Path) -> list[str]:
    import json

    try:
        result = json.loads(path.read_text())
        full = result["full_fp32_gib"]
        rows = []
        for build, r in result["paths"].items():
            built = max(r["peak_built_gib"])
            ready = [v for v in r.get("peak_engine_ready_gib") or [] if v is not None]
            ready_cells = f"{max(ready):.2f} GiB | {max(ready) / full:.2f}" if ready else "- | -"
            rows.append(f"| `{path.name}` | {result['unique_params'] / 1e9:.2f}B | {full:.2f} GiB | {build} | "
                        f"{max(r['rss_before_gib']):.2f} GiB | {built:.2f} GiB | {built / full:.2f} | {ready_cells} |")
        return rows
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{shown(path)}: not a construction_memory result ({type(err).__name__}: {err})") from None


def render_doc(command: str, runs_dir: Path, out: Path, construction: list[Path], reused: bool = False) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    origin = (f" from the runs already in `{shown(runs_dir)}` (which `python -m trainer.memory docs` without "
              "`--reuse-runs` trains first)" if reused else "")
    lines = ["# Memory: tied vs untied, and which g fits", "",
             f"Generated by `{command}`{origin} on {today} on {machine_line()}. Do not edit by hand: rerun the "
             "command (`--reuse-runs` re-renders from the runs already trained). The commands and fields are "
             "described in README.md, section Memory.", ""]
    lines += runs_section(runs_dir, out) + plan_section() + construction_section(construction)
    return "\n".join(lines).rstrip("\n") + "\n"


DEFAULT_STEPS = 3


def docs_main(argv: list[str]) -> int:
    parser = OneLineParser(prog="python -m trainer.memory docs", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "memory.md"),
                        help="the page to write; PNGs go beside it (default: docs/memory.md)")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "memory-docs"),
                        help="where the runs go, one folder per layout (default: runs/memory-docs)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="render from the reports already in --runs-dir instead of training")
    args = parser.parse_args(argv)
    if args.steps is not None and args.reuse_runs:  # nothing is trained: it would be ignored
        raise ValueError(f"--steps={args.steps}: trains the runs, which --reuse-runs does not; give one or the other")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps}: expected a positive integer")
    out, runs_dir = Path(args.out), Path(args.runs_dir).resolve()
    if out.is_dir() or out.suffix != ".md":
        raise ValueError(f"--out={args.out}: expected a markdown file path (.md)")
    try:  # checked (its folders made) now, not after minutes of training
        output_file(args.out)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--out: {err}") from None
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ValueError(f"--runs-dir={args.runs_dir}: not a directory")
    if args.reuse_runs:
        for layout in LAYOUTS:  # every report checked before anything is written
            for variant in VARIANTS:
                load_report(str(runs_dir / layout / variant))
    elif code := train_runs(runs_dir, args.steps or DEFAULT_STEPS):
        return code
    out.parent.mkdir(parents=True, exist_ok=True)
    construction = sorted((REPO_ROOT / "benchmarks" / "results").glob(CONSTRUCTION_GLOB))
    command = shlex.join(["python", "-m", "trainer.memory", "docs", *argv])
    text = render_doc(command, runs_dir, out, construction, args.reuse_runs)
    out.write_text(text)
    print(f"wrote {out} and its PNGs")
    return 0
