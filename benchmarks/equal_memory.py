"""Equal-memory throughput: what tying buys when the memory it frees goes into a larger micro-batch.

    python benchmarks/equal_memory.py [--variants untied,g2,g4] [--micro-batch B] [--budget-gib G]
                                      [--max-micro-batch M] [--steps N] [--repeats R] [--gpu] [--json OUT]
                                      [key=value ...]
    python benchmarks/equal_memory.py --plot JSON       # redraw the PNG of a result written earlier

The paper's throughput gains come from here: with the same memory per device, a tied model fits a
larger micro-batch than its untied twin. For each variant this finds, by measurement, the largest
micro-batch whose peak memory per rank stays within the budget (default: the untied model's peak at
`--micro-batch`); then it times every variant at the common micro-batch ("equal batch") and at its own
("equal memory") with the trainer's own step, in alternating blocks, and prints tokens/s, MFU and the
tied/untied ratios; the JSON goes to `--json` and a plot of both beside it (.png).

Peak memory per rank is `torch.cuda.max_memory_allocated` on GPU and the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs before each probe) on CPU, the largest over ranks, counted
above what the rank held before the model was built (on CPU: the bare Python + torch + DeepSpeed
process, which varies by a few MiB between processes; the budget is in the same terms). Each
variant is probed in its own ranks, so no other engine's memory is counted; micro-batches are probed
in rising order and the probe stops at the first one over budget. On CPU at small scale the process
itself (Python, torch, DeepSpeed: hundreds of MiB) and the activations dwarf the model states tying
shrinks, so expect equal memory to be close to equal batch there: that is the honest CPU result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainer import engine as eng  # noqa: E402
from trainer.argtypes import OneLineParser, output_file, refuse_repeats  # noqa: E402
from trainer.bench import (DEFAULT_OVERRIDES, _device, check_data, collect_json, refuse_overrides,  # noqa: E402
                           timed_steps)
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.data import make_source  # noqa: E402
from trainer.launch import check_plot_beside, redraw, write_report_and_plot  # noqa: E402
from trainer.metrics import peak_flops  # noqa: E402
from trainer.session import Session, open_session, train_step  # noqa: E402

GIB = 1024 ** 3


def variant_config(name: str, overrides: list[str]) -> TrainConfig:
    """`untied` is the config's untied twin; `gN` the same model with tie_group_size N."""
    cfg = load_config(None, DEFAULT_OVERRIDES + overrides)
    if name == "untied":
        return cfg.untied()
    if not (name.startswith("g") and name[1:].isdigit()):
        raise ValueError(f"--variants: {name!r} is not 'untied' or gN (e.g. g2)")
    return load_config(None, DEFAULT_OVERRIDES + overrides + [f"model.tie_group_size={name[1:]}"])


def at_micro_batch(s: Session, micro_batch: int) -> Session:
    """The same engine fed micro-batches of another size (DeepSpeed does not check the batch shape;
    AutoEP is dropless, so nothing is sized by it): no second engine, hence no second set of states."""
    cfg = dataclasses.replace(s.cfg, batch=dataclasses.replace(s.cfg.batch, micro_batch_size=micro_batch))
    return dataclasses.replace(s, cfg=cfg, source=make_source(cfg, "train", s.rank, s.world))


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def peak_bytes() -> float:
    """This rank's peak since `reset_peak`, the largest over ranks."""
    if torch.cuda.is_available():
        local = float(torch.cuda.max_memory_allocated())
    else:
        status = Path("/proc/self/status").read_text()
        local = float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    return eng.max_over_ranks([local])[0]


def resident_bytes() -> float:
    """What this rank holds before the model exists: the bare process (CPU RSS) or 0 (GPU allocator)."""
    if torch.cuda.is_available():
        return float(torch.cuda.memory_allocated())
    status = Path("/proc/self/status").read_text()
    return float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Peak bytes per rank at each candidate micro-batch, rising, until one exceeds the budget.

    Peaks are counted above what the rank held before building the model: on CPU the bare process
    (interpreter, torch, DeepSpeed) differs by a few MiB between processes, more than tying saves at
    tiny sizes, and is the same for every variant anyway.
    """
    baseline = eng.max_over_ranks([resident_bytes()])[0]
    s = open_session(variant_config(args.variant, args.overrides))
    peaks: dict[str, float] = {}
    for mb in args.candidates:
        run = at_micro_batch(s, mb)
        train_step(run, run.cfg.optim.lr)  # warm-up: allocator and optimizer state settle
        reset_peak()
        for _ in range(args.steps):
            train_step(run, run.cfg.optim.lr)
        peaks[str(mb)] = peak_bytes() - baseline
        if args.budget is not None and peaks[str(mb)] > args.budget:
            break
    return {"peaks": peaks, "baseline": baseline}


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s of each (variant, micro-batch) in `--plan`, alternating blocks, one engine per variant."""
    plan = [(v, int(mb)) for v, mb in (item.split(":") for item in args.plan.split(","))]
    engines = {v: open_session(variant_config(v, args.overrides)) for v in dict.fromkeys(v for v, _ in plan)}
    runs = {f"{v}:{mb}": at_micro_batch(engines[v], mb) for v, mb in plan}
    seconds = dict.fromkeys(runs, 0.0)
    for run in runs.values():
        timed_steps(run, 1)
    for _ in range(args.repeats):
        for key, run in runs.items():
            seconds[key] += timed_steps(run, args.steps)
    peak, source = peak_flops(next(iter(engines.values())).cfg)
    out: dict[str, Any] = {"peak_flops_per_rank": peak, "peak_flops_source": source, "runs": {}}
    for key, run in runs.items():
        tok_s = run.tokens_per_step * args.steps * args.repeats / seconds[key]
        flops = run.accounting.train_flops_per_token
        out["runs"][key] = {"tokens_per_s": tok_s, "model_flops_per_token": flops,
                            "mfu": flops * tok_s / run.world / peak}
    return out


def worker(args: argparse.Namespace) -> None:
    eng.init_distributed()
    result = probe(args) if args.mode == "probe" else timing(args)
    result.update(world_size=eng.world_size(), device=_device(), torch=torch.__version__)
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
    eng.shutdown()


def candidates(base: int, largest: int) -> list[int]:
    """Micro-batches to probe: base, then steps of a quarter of it (at least 1) up to `largest`."""
    step = max(1, base // 4)
    return list(range(base, largest + 1, step))


def run_ranks(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = collect_json(["benchmarks.equal_memory", "--worker", "--steps", str(args.steps), "--repeats",
                            str(args.repeats), *extra, *args.overrides], args.world, args.gpu, tmp)
    if isinstance(raw, int):
        raise SystemExit(f"equal_memory: worker failed with exit code {raw}")
    return raw


def largest_within(peaks: dict[str, float], budget: float) -> int | None:
    fits = [int(mb) for mb, peak in peaks.items() if peak <= budget]
    return max(fits) if fits else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Probe every variant (untied first: it sets the default budget), then time them all."""
    variants = args.variants.split(",")
    base, top = args.micro_batch, args.max_micro_batch or 4 * args.micro_batch
    budget = args.budget_gib * GIB if args.budget_gib else None
    peaks: dict[str, dict[str, float]] = {}
    for v in sorted(variants, key=lambda name: name != "untied"):
        cands = [base] if budget is None and v == "untied" else candidates(base, top)
        extra = ["--mode", "probe", "--variant", v, "--candidates", ",".join(map(str, cands))]
        peaks[v] = run_ranks(args, extra + ([] if budget is None else ["--budget", str(budget)]))["peaks"]
        if budget is None:
            budget = peaks[v][str(base)]  # the reference: the first (untied) variant at the common micro-batch
    chosen = {v: largest_within(peaks[v], budget) for v in variants}
    plan = sorted({f"{v}:{base}" for v in variants} | {f"{v}:{mb}" for v, mb in chosen.items() if mb})
    timed = run_ranks(args, ["--mode", "time", "--plan", ",".join(plan)])
    return summarize(args, variants, peaks, chosen, budget, timed)


def summarize(args: argparse.Namespace, variants: list[str], peaks: dict[str, dict[str, float]],
              chosen: dict[str, int | None], budget: float, timed: dict[str, Any]) -> dict[str, Any]:
    base = args.micro_batch
    rows = {}
    for v in variants:
        eq_batch, mb = timed["runs"][f"{v}:{base}"], chosen[v]
        eq_mem = timed["runs"].get(f"{v}:{mb}") if mb else None
        rows[v] = {"peak_gib_at_common_micro_batch": peaks[v].get(str(base), float("nan")) / GIB,
                   "tokens_per_s_equal_batch": eq_batch["tokens_per_s"], "mfu_equal_batch": eq_batch["mfu"],
                   "micro_batch_equal_memory": mb, "peak_gib_equal_memory": peaks[v][str(mb)] / GIB if mb else None,
                   "tokens_per_s_equal_memory": eq_mem["tokens_per_s"] if eq_mem else None,
                   "mfu_equal_memory": eq_mem["mfu"] if eq_mem else None, "probed_peaks_gib": {
                       k: p / GIB for k, p in peaks[v].items()}}
    ref = rows.get("untied")
    for v, r in rows.items():
        if ref and v != "untied":
            r["ratio_equal_batch"] = r["tokens_per_s_equal_batch"] / ref["tokens_per_s_equal_batch"]
            if r["tokens_per_s_equal_memory"] and ref["tokens_per_s_equal_memory"]:
                r["ratio_equal_memory"] = r["tokens_per_s_equal_memory"] / ref["tokens_per_s_equal_memory"]
    return {"overrides": args.overrides, "common_micro_batch": base, "budget_gib_per_rank": budget / GIB,
            "steps": args.steps, "repeats": args.repeats, "world_size": timed["world_size"], "device": timed["device"],
            "torch": timed["torch"], "peak_flops_per_rank": timed["peak_flops_per_rank"],
            "peak_flops_source": timed["peak_flops_source"], "variants": rows}


def render(result: dict[str, Any]) -> str:
    lines = [f"equal-memory throughput on {result['world_size']} ranks, {result['device']}; budget "
             f"{result['budget_gib_per_rank']:.3f} GiB per rank; overrides: {' '.join(result['overrides']) or '-'}",
             f"{'variant':<8} {'peak GiB@mb' + str(result['common_micro_batch']):>13} {'tok/s equal mb':>15} "
             f"{'MFU':>6} {'mb@budget':>9} {'peak GiB':>9} {'tok/s equal mem':>16} {'MFU':>6} "
             f"{'ratio eq mb':>11} {'ratio eq mem':>12}"]
    for v, r in result["variants"].items():
        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)
        lines.append(f"{v:<8} {r['peak_gib_at_common_micro_batch']:>13.3f} {r['tokens_per_s_equal_batch']:>15,.0f} "
                     f"{100 * r['mfu_equal_batch']:>5.1f}% {num(r['micro_batch_equal_memory'], 'd'):>9} "
                     f"{num(r['peak_gib_equal_memory'], '.3f'):>9} {num(r['tokens_per_s_equal_memory'], ',.0f'):>16} "
                     f"{num(r['mfu_equal_memory'] and 100 * r['mfu_equal_memory'], '.1f'):>5}% "
                     f"{num(r.get('ratio_equal_batch'), '.3f'):>11} {num(r.get('ratio_equal_memory'), '.3f'):>12}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Peak memory per rank against micro-batch for each variant, with the budget, beside tokens/s at equal
    batch and at equal memory: the picture of the paper's claim. False (and a note) without matplotlib,
    which the GPU device lacks: the JSON is written first, `--plot JSON` draws it later."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, no plot; `python benchmarks/equal_memory.py --plot "
              f"{path.with_suffix('.json')}` draws it where it is", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(variants.items()):
        points = sorted((int(mb), gib) for mb, gib in r["probed_peaks_gib"].items())
        line, = ax_mem.plot(*zip(*points), marker="o", label=name)
        if r["micro_batch_equal_memory"]:
            ax_mem.plot(r["micro_batch_equal_memory"], r["peak_gib_equal_memory"], marker="*", markersize=14,
                        color=line.get_color(), linestyle="none")
        for j, key in enumerate(("tokens_per_s_equal_batch", "tokens_per_s_equal_memory")):
            value = r[key]
            if value is None:
                continue
            bar = ax_tps.bar(i + (j - 0.5) * 0.38, value, width=0.36, color=line.get_color(), alpha=0.55 + 0.45 * j,
                             label=("equal batch (light), equal memory (dark)" if i == 0 and j == 0 else None))
            ratio = r.get("ratio_equal_batch" if j == 0 else "ratio_equal_memory")
            if ratio is not None:
                ax_tps.bar_label(bar, labels=[f"{ratio:.2f}x"], fontsize=8)
    ax_mem.axhline(result["budget_gib_per_rank"], color="grey", linestyle="--", label="budget")
    ax_mem.set(title="peak memory per rank (star: largest micro-batch within budget)", xlabel="micro-batch",
               ylabel="GiB above the bare process (VmHWM)" if result["device"].startswith("cpu")
               else "GiB (max_memory_allocated)")
    ax_mem.xaxis.get_major_locator().set_params(integer=True)
    ax_tps.set(title=f"tokens/s (common micro-batch {result['common_micro_batch']}); ratio to untied",
               xticks=range(len(variants)), xticklabels=list(variants), ylabel="tokens/s")
    for ax in (ax_mem, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Equal-memory throughput, {result['world_size']} x {result['device']}; "
                 f"{' '.join(result['overrides']) or 'default config'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="untied,g2,g4", help="untied and/or gN, comma-separated")
    parser.add_argument("--micro-batch", type=int, default=8, help="the common micro-batch (equal batch)")
    parser.add_argument("--max-micro-batch", type=int, help="largest micro-batch probed (default 4x --micro-batch)")
    parser.add_argument("--budget-gib", type=float, help="per-rank budget (default: untied peak at --micro-batch)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block and per memory probe")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed blocks per run")
    parser.add_argument("--world", type=int, default=2, help="ranks (CPU ranks, or GPUs with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one rank per GPU (torchrun) instead of CPU ranks")
    parser.add_argument("--json", type=output_file, default=str(REPO / "benchmarks" / "results" / "equal_memory_cpu.json"))
    parser.add_argument("--plot", metavar="JSON", help="only draw JSON's plot (beside it, .png); measures nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["probe", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--candidates", type=lambda v: [int(x) for x in v.split(",")], help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every variant")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.plot:
        parser.refuse_beside(args, "plot")
        return redraw(args.plot, plot, "equal_memory.py", ("variants", "budget_gib_per_rank"))
    try:
        check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return write_report_and_plot(measure(args), render, plot, args.json)


def check_args(args: argparse.Namespace) -> None:
    """Fail fast, before any rank starts: bad variants or overrides, counts below 1, a budget of no memory."""
    for flag in ("micro_batch", "max_micro_batch", "steps", "repeats", "world"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value}: expected a positive integer")
    if args.max_micro_batch is not None and args.max_micro_batch < args.micro_batch:
        raise ValueError(f"--max-micro-batch={args.max_micro_batch}: expected at least --micro-batch={args.micro_batch}")
    if args.budget_gib is not None and not 0 < args.budget_gib < float("inf"):
        raise ValueError(f"--budget-gib={args.budget_gib}: expected a positive number")
    check_plot_beside(args.json)
    if args.gpu and not torch.cuda.is_available():
        raise ValueError("--gpu: no CUDA device is visible here; leave --gpu out to run on CPU ranks")
    refuse_overrides(args.overrides, ("model.tie_group_size",), "equal_memory.py (--variants)")
    refuse_repeats("--variants", args.variants.split(","))
    for v in args.variants.split(","):
        variant_config(v, args.overrides).for_world(args.world)  # e.g. expert parallelism that --world cannot tile
    check_data(variant_config("untied", args.overrides), args.world)  # e.g. data.path=... with no data set there


if __name__ == "__main__":
    sys.exit(main())
