"""Memory: what each rank holds, per run and tied vs untied, compared across runs, and planned ahead.

    python -m trainer.memory [measure] [--json OUT] [key=value ...]   tied vs untied on 2 CPU ranks
    python -m trainer.memory compare RUN_DIR [RUN_DIR ...] [--out DIR]  runs' memory reports side by side
    python -m trainer.memory plan PRESET_OR_CONFIG --gpus N --gpu-mem-gib M [...]  which g fits (no model built)
    python -m trainer.memory docs [--out docs/memory.md] [...]        regenerate the memory docs page

`measure` builds the configured (tied) model and its untied twin on 2 CPU ranks, takes one optimizer
step so optimizer state exists, then sums per rank the bytes of: parameters as held (the ZeRO-3
partition or the EP shard), gradients (as held at the step), the optimizer's own parameter copies
(fp32 master / flat partitions, when distinct from the module's) and optimizer state (Adam moments),
each split expert / non-expert, because tying only shrinks the expert part. Prints a table, writes JSON.

A training run writes `memory_report.json` / `.md` into its run directory through `write_run_report`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.accounting import activation_memory, layer_parts, rank_memory
from trainer import engine as eng
from trainer.argtypes import OneLineParser, output_file
from trainer.config import REPO_ROOT, load_config
from trainer.metrics import dumps, memory_gib

if TYPE_CHECKING:
    from trainer.session import Session

CATEGORIES = ("params", "grads", "master", "optimizer_state")  # each split expert / other
REPORT_JSON, REPORT_MD = "memory_report.json", "memory_report.md"
GIB, MIB = 2**30, 2**20


# --------------------------------------------------------------------------------------------------
# Measuring what a rank holds
# --------------------------------------------------------------------------------------------------

def measure(engine: Any, grads: eng.GradientWatch | None = None) -> dict[str, int]:
    """Bytes of model states this rank holds, `<expert|other>_<category>_bytes` plus totals.

    Parameters count their own elements (ZeRO-3 partitions are views into one flat buffer); optimizer
    copies count unless they share a parameter's storage. Gradients come from `grads` (read as the
    last optimizer step began, since ZeRO-0/1/2 free them after it); 0 without a watch.
    """
    out = {f"{kind}_{cat}_bytes": 0 for cat in CATEGORIES for kind in ("expert", "other")}
    param_storages = set()
    for p in engine.module.parameters():
        held = eng.held_tensor(p)
        param_storages.add(held.untyped_storage().data_ptr())
        out[f"{'expert' if eng.is_expert_param(p) else 'other'}_params_bytes"] += held.numel() * held.element_size()
    if grads is not None:
        out["expert_grads_bytes"], out["other_grads_bytes"] = grads.expert_bytes, grads.other_bytes
    counted: set[int] = set()
    for cat, tagged in (("master", "master"), ("optimizer_state", "state")):
        for is_expert, t in eng.optimizer_tensors_by_kind(engine)[tagged]:
            if id(t) in counted or t.untyped_storage().data_ptr() in param_storages:
                continue
            counted.add(id(t))
            out[f"{'expert' if is_expert else 'other'}_{cat}_bytes"] += t.numel() * t.element_size()
    for cat in CATEGORIES:
        out[f"{cat}_bytes"] = out[f"expert_{cat}_bytes"] + out[f"other_{cat}_bytes"]
    # Names the synthetic report has always had (tests and benchmarks/results read them).
    out["expert_param_bytes"], out["other_param_bytes"] = out["expert_params_bytes"], out["other_params_bytes"]
    out["optimizer_param_bytes"] = out["master_bytes"]
    out["total_bytes"] = sum(out[f"{cat}_bytes"] for cat in CATEGORIES)
    return out


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python on this rank (each storage once).

    Why: on CPU the resident set also holds the allocator's caches, libraries and the data loader;
    this is the part that is tensors. Tensors held only inside C++ (autograd graph) are missed.
    """
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # sparse / freed wrappers have no plain storage
            continue
    return sum(seen.values())


def peak_memory() -> dict[str, int]:
    """This rank's peak: GPU allocator (max allocated and reserved), or CPU VmHWM / RSS and live tensors."""
    if torch.cuda.is_available():
        return {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    now = memory_gib()
    return {"rss_bytes": int(now["rss_gib"] * GIB), "peak_rss_bytes": int(now["peak_rss_gib"] * GIB),
            "live_tensor_bytes": live_tensor_bytes()}


# --------------------------------------------------------------------------------------------------
# Per-run report
# --------------------------------------------------------------------------------------------------

def write_run_report(s: Session, run_dir: Path) -> None:
    """Write `memory_report.json` and `memory_report.md` for this run into `run_dir`.

    Collective: every rank must call it (per-rank figures are gathered); rank 0 writes. Call it
    after an optimizer step, so optimizer state and the gradient figures exist.
    """
    mine = {**measure(s.engine, s.grads), **peak_memory()}
    keys = sorted(mine)
    gathered = {key: eng.gather_over_ranks(float(mine[key])) for key in keys}
    if s.rank != 0:
        return
    report = build_report(s, [{key: int(gathered[key][r]) for key in keys} for r in range(s.world)])
    for name, text in ((REPORT_JSON, dumps(report, indent=1)), (REPORT_MD, render_report(report))):
        _write_atomically(Path(run_dir) / name, text)


def _write_atomically(path: Path, text: str) -> None:
    """The report is rewritten at the end of a run; a crash mid-write must leave the earlier one whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_report(s: Session, per_rank: list[dict[str, int]]) -> dict[str, Any]:
    """The report's content: measurement, our analytic estimate and its error, DeepSpeed's estimators."""
    cfg, model_cfg = s.cfg, s.model_cfg
    zero, ep, precision = s.engine.zero_optimization_stage(), cfg.parallel.expert_parallel_size, cfg.run.precision
    analytic = rank_memory(model_cfg, s.world, ep, zero, precision)
    acts = activation_memory(model_cfg, cfg.batch.micro_batch_size, cfg.data.seq_len, precision,
                             cfg.parallel.activation_checkpointing)
    return {
        "run": cfg.run.name, "world_size": s.world, "zero_stage": zero, "expert_parallel_size": ep,
        "precision": precision, "micro_batch_size": cfg.batch.micro_batch_size, "seq_len": cfg.data.seq_len,
        "activation_checkpointing": cfg.parallel.activation_checkpointing, "model_preset": cfg.model.preset,
        "model_overrides": cfg.model.overrides, "unique_params": s.accounting.unique_params,
        "untied_params": s.accounting.untied_params, "expert_banks": s.accounting.expert_banks,
        "moe_layers": s.accounting.moe_layers, "optimizer_steps_seen": s.grads.steps,
        "per_rank": per_rank,
        "analytic": {"model_states": analytic.to_dict(), "activations": acts.to_dict()},
        "analytic_error": [analytic_error(r, analytic.to_dict()) for r in per_rank],
        "deepspeed_estimate": deepspeed_figures(s, zero),
    }


def analytic_error(measured: dict[str, int], analytic: dict[str, int]) -> dict[str, float | None]:
    """Relative error (analytic / measured - 1) per category; None where nothing was measured."""
    predicted = {"expert_params": analytic["expert_params"], "other_params": analytic["other_params"],
                 "params": analytic["expert_params"] + analytic["other_params"], "grads": analytic["grads"],
                 "master": analytic["master_params"], "optimizer_state": analytic["optimizer_state"],
                 "total": analytic["total"]}
    return {name: (value / measured[f"{name}_bytes"] - 1 if measured[f"{name}_bytes"] else None)
            for name, value in predicted.items()}


def deepspeed_figures(s: Session, zero: int) -> dict[str, Any]:
    """DeepSpeed's numeric estimators for this model and world, with what they leave out."""
    largest = max(sum(layer_parts(s.model_cfg, p).values()) for p in s.plan)
    figures = eng.deepspeed_estimates(s.accounting.unique_params, largest, s.world)
    figures["for_this_stage_bytes"] = figures["zero3_bytes_per_gpu" if zero == 3 else "zero2_bytes_per_gpu"]
    figures["ignores"] = ("expert parallelism (every parameter counted as data-parallel), tying beyond the "
                          "unique parameter count we pass, the precision actually used (always 16-bit weights "
                          "+ fp32 Adam), and the split of experts vs other parameters")
    if zero < 2:
        figures["note"] = f"DeepSpeed has no ZeRO-{zero} estimator; the ZeRO-2 one is shown"
    return figures


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.2f}"


def render_report(report: dict[str, Any]) -> str:
    """Markdown: per rank, measured bytes by category beside the analytic estimate; peaks; estimators."""
    model = report["analytic"]["model_states"]
    lines = [f"# Memory report: {report['run']}", "",
             f"{report['world_size']} ranks, ZeRO-{report['zero_stage']}, EP {report['expert_parallel_size']}, "
             f"{report['precision']}, micro-batch {report['micro_batch_size']} x {report['seq_len']} tokens, "
             f"activation checkpointing {'on' if report['activation_checkpointing'] else 'off'}; "
             f"{report['unique_params']:,} unique parameters ({report['untied_params']:,} if untied), "
             f"{report['expert_banks']} expert banks for {report['moe_layers']} MoE layers.", "",
             "Model states per rank (MiB), counted from the tensors each rank holds; analytic = "
             "`models.accounting.rank_memory` (ZeRO accounting with AutoEP's layout, tied banks once).", ""]
    analytic_of = {"params": model["expert_params"] + model["other_params"], "grads": model["grads"],
                   "master": model["master_params"], "optimizer_state": model["optimizer_state"]}
    for rank, (r, err) in enumerate(zip(report["per_rank"], report["analytic_error"])):
        lines += [f"## Rank {rank}", "", "| category | expert | other | total | analytic | error |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [_row(cat, r[f"expert_{cat}_bytes"], r[f"other_{cat}_bytes"], r[f"{cat}_bytes"], analytic_of[cat],
                       err[cat]) for cat in CATEGORIES]
        lines.append(_row("**total**", None, None, r["total_bytes"], model["total"], err["total"]))
        lines += ["", _peak_line(r), ""]
    acts = report["analytic"]["activations"]
    ds = report["deepspeed_estimate"]
    lines += ["## Estimates", "",
              f"- Activations (analytic, `models.accounting.activation_memory`, one micro-batch): saved "
              f"{_mib(acts['saved'])} MiB, peak during backward {_mib(acts['peak'])} MiB.",
              f"- DeepSpeed's estimator (`estimate_zero{3 if report['zero_stage'] == 3 else 2}_model_states_mem_needs`, "
              f"per GPU, no offload): {_mib(ds['for_this_stage_bytes'])} MiB (ZeRO-2 formula "
              f"{_mib(ds['zero2_bytes_per_gpu'])}, ZeRO-3 formula {_mib(ds['zero3_bytes_per_gpu'])}); it ignores "
              f"{ds['ignores']}." + (f" {ds['note']}." if "note" in ds else ""), ""]
    return "\n".join(lines)


def _row(name: str, expert: int | None, other: int | None, total: int, analytic: int | None,
         error: float | None) -> str:
    err = "-" if error is None or analytic is None else f"{100 * error:+.1f}%"
    return f"| {name} | {_mib(expert)} | {_mib(other)} | {_mib(total)} | {_mib(analytic)} | {err} |"


def _peak_line(r: dict[str, int]) -> str:
    if "peak_allocated_bytes" in r:
        return (f"Peak (GPU allocator): max allocated {_mib(r['peak_allocated_bytes'])} MiB, max reserved "
                f"{_mib(r['peak_reserved_bytes'])} MiB.")
    return (f"Peak (CPU): VmHWM {_mib(r['peak_rss_bytes'])} MiB, RSS now {_mib(r['rss_bytes'])} MiB, live tensors "
            f"{_mib(r['live_tensor_bytes'])} MiB.")


# --------------------------------------------------------------------------------------------------
# Activation measurement (checks models.accounting.activation_memory)
# --------------------------------------------------------------------------------------------------

def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, top_k: int) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + training loss of a plain
    model (each storage once, parameters excluded), via `torch.autograd.graph.saved_tensors_hooks`."""
    from trainer.losses import RouterTap, training_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tap = RouterTap(model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids)
            training_loss(logits, input_ids, tap.take(), top_k, 0.01, 1e-4)
    finally:
        tap.remove()
    return sum(saved.values())


# --------------------------------------------------------------------------------------------------
# Synthetic tied-vs-untied measurement (`measure`)
# --------------------------------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    from trainer.bench import tied_and_untied
    from trainer.session import open_session, train_step

    eng.init_distributed()
    result: dict[str, Any] = {"overrides": args.overrides, "world_size": eng.world_size()}
    for name, cfg in tied_and_untied(args.overrides).items():
        s = open_session(cfg)
        train_step(s, cfg.optim.lr)  # optimizer state exists after the first step
        mine = measure(s.engine, s.grads)
        per_key = {key: eng.gather_over_ranks(float(value)) for key, value in mine.items()}
        result[name] = {"per_rank": [{key: int(per_key[key][r]) for key in mine} for r in range(eng.world_size())],
                        "zero_stage": s.engine.zero_optimization_stage(), "precision": cfg.run.precision}
        s.close()
        del s
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
    eng.shutdown()


def render(result: dict[str, Any]) -> str:
    keys = [f"{kind}_{cat}_bytes" for cat in CATEGORIES for kind in ("expert", "other")] + ["total_bytes"]
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


def measure_main(argv: list[str]) -> int:
    from trainer.bench import DEFAULT_OVERRIDES
    from trainer.launch import report_from_cpu_ranks

    parser = OneLineParser(prog="python -m trainer.memory measure", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=output_file, default=str(REPO_ROOT / "benchmarks" / "results" / "memory_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to both variants")
    args = parser.parse_intermixed_args(argv)  # key=value before or after --json
    cfg = load_config(None, DEFAULT_OVERRIDES + args.overrides)  # fail fast on bad overrides
    if not args.worker:
        cfg.for_world(2)  # the 2 CPU ranks below: e.g. an EP size they cannot tile (was an error in every rank, exit 1)
    if args.worker:
        worker(args)
        return 0
    return report_from_cpu_ranks(["trainer.memory", "measure", "--worker", *args.overrides], render, args.json)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("measure", "compare", "plan", "docs")
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in commands else ("measure", argv)
    if argv and argv[0] not in commands and not argv[0].startswith("-") and "=" not in argv[0]:
        print(f"error: {argv[0]!r}: unknown command (expected one of {', '.join(commands)}, or key=value "
              f"overrides for measure)", file=sys.stderr)  # 'plna' was reported as an override without '='
        return 2
    try:
        if command == "compare":
            from trainer.memory_compare import compare_main

            return compare_main(rest)
        if command == "plan":
            from trainer.memory_plan import plan_main

            return plan_main(rest)
        if command == "docs":
            from trainer.memory_docs import docs_main

            return docs_main(rest)
        return measure_main(rest)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
