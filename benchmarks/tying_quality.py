"""Does tying cost quality? Untied vs tied g=2 vs tied g=4 on the default corpus, same everything else.

    python benchmarks/tying_quality.py [--steps N] [--json OUT] [key=value ...]
    python benchmarks/tying_quality.py --plot JSON       # redraw the PNG of a result written earlier

A CPU-sized version of the paper's headline comparison: each variant trains with `./run.sh`'s default
setup (2 ranks, ZeRO-3, expert parallel 2) for the same steps and tokens; the script prints unique
parameters, unique FFN parameters and final validation cross-entropy, writes the JSON to `--json`
(default benchmarks/results/tying_quality_cpu.json) and plots the curves beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.accounting import account  # noqa: E402
from trainer.argtypes import OneLineParser, output_file  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.launch import check_plot_beside, redraw, write_report_and_plot  # noqa: E402

VARIANTS = {"untied": ["model.tie_group_size=1"], "tied g=2": ["model.tie_group_size=2"],
            "tied g=4": ["model.tie_group_size=4"]}
RESULTS = REPO / "benchmarks" / "results"


def run_name(name: str) -> str:
    return "quality_" + name.replace(" ", "").replace("=", "")


def variant_args(name: str, overrides: list[str], steps: int, extra: list[str]) -> list[str]:
    """The `./run.sh` overrides of one variant."""
    return overrides + [f"run.steps={steps}", "run.log_every=10", f"run.eval_every={max(steps // 6, 1)}",
                        "run.eval_batches=16", "run.out_dir=runs", f"run.name={run_name(name)}", "run.resume=never",
                        *extra]


def run_variant(name: str, overrides: list[str], steps: int, extra: list[str]) -> dict:
    args = variant_args(name, overrides, steps, extra)
    print(f"== {name}: ./run.sh {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, str(REPO / "run.sh"), *args], cwd=REPO, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed with exit code {proc.returncode}")
    run_dir = load_config(None, args).run_dir()  # where run.sh wrote it: a run.out_dir override moves it
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(run_dir / "config.yaml")
    acc = account(cfg.model_config())
    return {"train": [(r["step"], r["ce"]) for r in rows if "ce" in r],
            "val": [(r["step"], r["val_ce"]) for r in rows if "val_ce" in r],
            "unique_params": acc.unique_params, "unique_ffn_params": acc.unique_ffn_params,
            "ffn_reduction": acc.ffn_reduction, "summary": json.loads((run_dir / "summary.json").read_text())}


def render(result: dict) -> str:
    results = result["variants"]
    base = results["untied"]
    lines = [f"\n{'variant':<10} {'unique params':>14} {'unique FFN':>11} {'FFN saved':>10} {'val CE':>8} "
             f"{'vs untied':>10}"]
    for name, r in results.items():
        val = r["val"][-1][1]
        lines.append(f"{name:<10} {r['unique_params']:>14,} {r['unique_ffn_params']:>11,} "
                     f"{100 * r['ffn_reduction']:>9.1f}% {val:>8.4f} {val - base['val'][-1][1]:>+10.4f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Train and validation curves of every variant; False (and a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, no plot; `python benchmarks/tying_quality.py --plot "
              f"{path.with_suffix('.json')}` draws it where it is", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["variants"].items():
        label = f"{name} ({r['unique_ffn_params'] / 1e3:.0f}K unique FFN params)"
        ax_train.plot(*zip(*r["train"]), label=label)
        ax_val.plot(*zip(*r["val"]), marker="o", label=label)
    ax_train.set(title="train cross-entropy", xlabel="step", ylabel="CE (nats)")
    ax_val.set(title="validation cross-entropy", xlabel="step")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Expert tying on the default corpus (tiny OLMoE-style, 2 CPU ranks, ZeRO-3, EP 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, metavar="N")
    parser.add_argument("--json", type=output_file, metavar="OUT", default=str(RESULTS / "tying_quality_cpu.json"),
                        help="result JSON; the plot goes beside it as .png (default: benchmarks/results/"
                        "tying_quality_cpu.json)")
    parser.add_argument("--plot", metavar="JSON", help="only draw JSON's plot (beside it, .png); trains nothing")
    parser.add_argument("overrides", nargs="*", help="applied to every variant")
    args = parser.parse_args(argv)
    if args.plot:
        parser.refuse_beside(args, "plot")
        return redraw(args.plot, plot, "tying_quality.py", ("variants",))
    try:  # every variant's config before the first trains: a bad override is one line, exit 2
        check_plot_beside(args.json)
        for override in args.overrides:  # set here per variant: applied to all, they would make them one
            key = override.split("=", 1)[0].strip().replace("model.overrides.", "model.", 1)
            if key in ("run.name", "model.tie_group_size"):
                raise ValueError(f"{override}: tying_quality.py sets {key} itself for each variant "
                                 f"({', '.join(map(run_name, VARIANTS))}); leave it out "
                                 "(run.out_dir moves the runs)")
        for name, o in VARIANTS.items():
            load_config(None, variant_args(name, o, args.steps, args.overrides))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {name: run_variant(name, o, args.steps, args.overrides) for name, o in VARIANTS.items()}
    return write_report_and_plot({"steps": args.steps, "overrides": args.overrides, "variants": results}, render,
                                 plot, args.json)


if __name__ == "__main__":
    sys.exit(main())
