"""The paper's comparisons at a scale these machines can train: one command, resumable.

    python benchmarks/reproduce.py [--scale cpu|gpu] [--seeds 0 1] [--only NAME ...] [--steps N] [--table-only]

Each variant x seed is its own run directory under runs/repro-<scale>/ trained by `./run.sh` (the real
trainer: 2 CPU ranks or all local GPUs, ZeRO-3, expert parallel 2); a finished run (summary.json at its
last step) is skipped, so the suite can be spread over several sittings. Afterwards it writes
docs/reproduction.md (the table: unique / active parameters, validation CE mean +- half-range over
seeds, tokens/s, per-rank model-state memory, tie-group routing agreement), benchmarks/results/
reproduce_<scale>.json and a PNG of validation CE per variant.

CPU scale: 8 layers, 16 experts (top-2), d_model 128, expert FFN 64, seq 128, 300 steps on the default
corpus: a variant trains in a few minutes on 2 cores, the whole suite (11 variants x 2 seeds) in about
two hours. Seed noise at this scale is of the order of the differences tying makes: read the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.accounting import account  # noqa: E402
from trainer.config import load_config  # noqa: E402

SCALES: dict[str, list[str]] = {
    "cpu": ["model.preset=olmoe_tiny", "model.d_model=128", "model.n_experts=16", "model.top_k=2",
            "model.expert_ffn_dim=64", "data.seq_len=128", "batch.micro_batch_size=8", "run.steps=300",
            "run.eval_every=50", "run.eval_batches=16", "run.log_every=10", "run.save_every=100"],
    "gpu": ["trainer/configs/olmoe.yaml", "model.d_model=1024", "model.n_layers=16", "model.expert_ffn_dim=512",
            "run.steps=5000", "run.eval_every=500", "run.eval_batches=64", "run.save_every=1000"],
}
# The paper's optimizer: Muon (lr 2e-2, AdamW at 0.1x for the rest), at ZeRO-0 as the committed runs were
# trained (Muon also runs at ZeRO 1-3 and in bf16 now, see trainer/optim.py).
MUON = ["optim.name=muon", "optim.lr=2e-2", "parallel.ds_config=ds_configs/zero0.json"]
# The paper's ablations, each as overrides on top of the scale (AdamW unless the name says Muon).
VARIANTS: dict[str, list[str]] = {
    "untied": ["model.tie_group_size=1"],
    "g=2": ["model.tie_group_size=2"],
    "g=4": ["model.tie_group_size=4"],
    "g=2 tied router": ["model.tie_group_size=2", "model.tie_router=true"],
    "g=2 tied attention": ["model.tie_group_size=2", "model.tie_attention=true"],
    "g=2 widened x2": ["model.tie_group_size=2", "model.widen_factor=2"],
    "g=2 lr divisor none": ["model.tie_group_size=2", "optim.tied_lr_scale=none"],
    "narrow (equal params to g=2)": ["model.tie_group_size=1", "model.narrow_factor=2"],
    "untied Muon": ["model.tie_group_size=1"] + MUON,
    "g=2 Muon": ["model.tie_group_size=2"] + MUON,
}
RESULTS = REPO / "benchmarks" / "results"


def run_name(variant: str, seed: int) -> str:
    name = "".join(c for c in variant.replace(" ", "-") if c.isalnum() or c == "-")
    return f"repro-{name}-s{seed}"


def overrides_for(scale: str, variant: str, seed: int, steps: int | None) -> tuple[str | None, list[str]]:
    """(config file or None, key=value overrides) of one run."""
    base = list(SCALES[scale])
    config = base.pop(0) if base and base[0].endswith(".yaml") else None
    extra = [f"run.steps={steps}"] if steps else []
    return config, base + VARIANTS[variant] + extra + [f"run.seed={seed}", f"run.out_dir=runs/repro-{scale}",
                                                       f"run.name={run_name(variant, seed)}"]


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps") == steps


def train(scale: str, variant: str, seed: int, steps: int | None) -> Path:
    config, overrides = overrides_for(scale, variant, seed, steps)
    cfg = load_config(config, overrides)  # bad overrides fail here, before any rank starts
    run_dir = cfg.run_dir()
    if finished(run_dir, cfg.run.steps):
        print(f"== {variant} seed {seed}: done already ({run_dir})", flush=True)
        return run_dir
    print(f"== {variant} seed {seed}: ./run.sh {config or ''} {' '.join(overrides)}", flush=True)
    proc = subprocess.run([sys.executable, str(REPO / "run.sh"), *([config] if config else []), *overrides],
                          cwd=REPO, env={"PYTHONWARNINGS": "ignore::FutureWarning", **os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant!r} seed {seed} failed (exit {proc.returncode}); rerun to resume it")
    return run_dir


def collect(run_dir: Path) -> dict[str, Any]:
    """What the table shows, from the files the run wrote."""
    cfg = load_config(run_dir / "config.yaml")
    acc = account(cfg.model_config(), cfg.data.seq_len)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "tokens_per_s" in r]
    late = train_rows[len(train_rows) // 2:] or train_rows
    agreement = [r["routing"].get("mean/tie_agreement") for r in late if r.get("routing")]
    agreement = [a for a in agreement if a is not None]
    memory = json.loads((run_dir / "memory_report.json").read_text())["per_rank"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"val_ce": summary["val_ce"], "unique_params": acc.unique_params,
            "active_params": acc.active_params_per_token, "unique_ffn_params": acc.unique_ffn_params,
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in late),
            "model_state_bytes_per_rank": memory["total_bytes"],
            "tie_agreement": statistics.mean(agreement) if agreement else None,
            "val_curve": [(r["step"], r["val_ce"]) for r in rows if "val_ce" in r]}


def table(results: dict[str, list[dict[str, Any]]], scale: str, seeds: list[int]) -> str:
    base = results.get("untied")
    base_ce = statistics.mean(r["val_ce"] for r in base) if base else None
    lines = [f"# Reproduction ({scale} scale, seeds {', '.join(map(str, seeds))})", "",
             "Validation cross-entropy after the last step (mean +- half the range over seeds); every variant "
             "trained by `python benchmarks/reproduce.py` with the same data, steps and batch. tokens/s come from "
             "separate runs and compare only on an otherwise idle machine; `python -m trainer.bench` measures "
             "throughput ratios side by side.", "",
             "| variant | unique params | active params/token | val CE | vs untied | tokens/s | model states/rank (MiB) "
             "| tie agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        ces = [r["val_ce"] for r in runs]
        mean, spread = statistics.mean(ces), (max(ces) - min(ces)) / 2
        delta = f"{mean - base_ce:+.3f}" if base_ce is not None else "-"
        agree = [r["tie_agreement"] for r in runs if r["tie_agreement"] is not None]
        agree_text = f"{statistics.mean(agree):.2f}" if agree else "-"
        lines.append(f"| {name} | {runs[0]['unique_params']:,} | {runs[0]['active_params']:,} | {mean:.3f} +- "
                     f"{spread:.3f} | {delta} | {statistics.mean(r['tokens_per_s'] for r in runs):,.0f} | "
                     f"{runs[0]['model_state_bytes_per_rank'] / 2**20:.2f} | {agree_text} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [statistics.mean(r["val_ce"] for r in results[n]) for n in names]
    spreads = [(max(r["val_ce"] for r in results[n]) - min(r["val_ce"] for r in results[n])) / 2 for n in names]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(names, means, yerr=spreads, capsize=4)
    ax.set_ylim(min(means) - 0.2, max(means) + 0.1)
    ax.set_ylabel("validation CE")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="train only these variants")
    parser.add_argument("--steps", type=int, help="override the scale's step count (smoke runs)")
    parser.add_argument("--table-only", action="store_true", help="train nothing; tabulate the finished runs")
    args = parser.parse_args(argv)
    variants = args.only or list(VARIANTS)
    results: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        for seed in args.seeds:
            if args.table_only:
                config, overrides = overrides_for(args.scale, variant, seed, args.steps)
                run_dir = load_config(config, overrides).run_dir()
                if not (run_dir / "summary.json").is_file():
                    continue
            else:
                run_dir = train(args.scale, variant, seed, args.steps)
            results.setdefault(variant, []).append(collect(run_dir))
    if not results:
        print("error: no finished runs to tabulate", file=sys.stderr)
        return 2
    text = table(results, args.scale, args.seeds)
    print(text)
    (REPO / "docs").mkdir(exist_ok=True)
    (REPO / "docs" / "reproduction.md").write_text(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"reproduce_{args.scale}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"reproduce_{args.scale}.png")
    print(f"wrote docs/reproduction.md, {RESULTS / f'reproduce_{args.scale}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
