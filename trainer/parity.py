"""Check the DeepSpeed engine against the plain-PyTorch reference, cell by cell.

    python -m trainer.parity [--cells quick|all|muon] [--steps N] [--json OUT]
    python -m trainer.parity --cells muon --only zero3   # the Muon cells whose name contains "zero3"
    python -m trainer.parity --cells gpu1 [--gpu] [--json OUT]   # the cells one GPU holds, on one rank

Starts 2 CPU ranks (gloo) that train every cell of ZeRO {0,1,2,3} x expert-parallel {1,2} x
{tied g=2, untied} (and the tied-router / tied-attention / widening ablations, and a subset of the Muon
cells; `--cells muon` runs every Muon cell, ZeRO 0-3 x EP 1/2 x tied/untied, fp32 and bf16) with `trainer.train`,
then replays each in one process with `trainer.reference` and prints the largest loss difference and
the largest relative difference of the global gradient norm (before clipping, each tied tensor once).
It also checks, with SGD, that a tied bank's gradient is the sum of its layers' gradients, and that
Muon orthogonalising a bank as one flattened matrix would differ by far more than the tolerance.
Exit code 1 when any cell differs by more than --tol. `--cells gpu1` runs the cells that fit one
device (ZeRO 0 and 3, EP 1, tied and untied, fp32 and bf16) on one rank (`--world N` for more), on the
GPU with `--gpu` (benchmarks/gpu_check.sh); the gather count, SGD check and controls need 2 ranks and
are left out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.transformer import build_model
from trainer import engine as eng
from trainer.argtypes import OneLineParser, non_empty, output_file
from trainer.bench import collect_json, run_pair
from trainer.config import TrainConfig, load_config
from trainer.data import make_source
from trainer.losses import RouterTap, training_loss
from trainer.optim import expert_bank_uses, expert_owner_of
from trainer.reference import reference_run, untied_copy
from trainer.session import open_session, train_step
from trainer.train import train

WORLD = 2
# log_every=1: the trainer measures its gradient norm at every step, compared with the reference's.
BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=4", "batch.grad_accum=2",
        "schedule.warmup_steps=1", "optim.lr=3e-3", "optim.grad_clip=0.5", "run.log_every=1",
        "run.eval_batches=1", "model.vocab_size=512"]


def cells(which: str) -> dict[str, list[str]]:
    """Cell name -> overrides."""
    if which == "gpu1":
        return one_device_cells()
    out = {}
    zeros = [0, 1, 2, 3]
    for zero, ep, g in itertools.product(zeros, [1, 2], [2, 1]):
        if which == "quick" and (zero, ep) not in ((0, 1), (2, 2), (3, 2), (3, 1), (1, 2)):
            continue
        out[f"zero{zero}-ep{ep}-{'tied' if g > 1 else 'untied'}"] = [
            f"parallel.ds_config=ds_configs/zero{zero}.json", f"parallel.expert_parallel_size={ep}",
            f"model.tie_group_size={g}"]
    z3 = ["parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2", "model.tie_group_size=2"]
    out["zero3-ep2-tied-router"] = z3 + ["model.tie_router=true"]
    out["zero3-ep2-tied-attention"] = z3 + ["model.tie_attention=true"]
    out["zero3-ep2-tied-widen2"] = z3 + ["model.widen_factor=2"]
    out["zero3-ep2-tied-actckpt"] = z3 + ["parallel.activation_checkpointing=true"]
    for zero in zeros:
        out[f"zero{zero}-ep2-tied-bf16"] = [f"parallel.ds_config=ds_configs/zero{zero}.json",
                                            "parallel.expert_parallel_size=2", "model.tie_group_size=2",
                                            "run.precision=bf16"]
    out["zero3-ep2-tied-g3-deepseek"] = ["parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2",
                                         "model.preset=deepseek_moe_tiny", "model.tie_group_size=3"]
    return (out if which != "muon" else {}) | muon_cells(full=which == "muon")


def muon_cells(full: bool = True) -> dict[str, list[str]]:
    """optim.name=muon: ZeRO {0,1,2,3} x EP {1,2} x {tied g=2, untied} in fp32, ZeRO {0,1,2,3} x EP 2 tied in
    bf16, and DeepSeek-style (dense layer, shared experts) with g=3 at ZeRO-3. full=False: the subset
    `--cells all` (and so CI) checks; `--cells muon` checks them all."""
    out = {}
    for zero, ep, g in itertools.product([0, 1, 2, 3], [1, 2], [2, 1]):
        out[f"zero{zero}-ep{ep}-{'tied' if g > 1 else 'untied'}-muon"] = MUON + [
            f"parallel.ds_config=ds_configs/zero{zero}.json", f"parallel.expert_parallel_size={ep}",
            f"model.tie_group_size={g}"]
    for zero in [0, 1, 2, 3]:
        out[f"zero{zero}-ep2-tied-muon-bf16"] = MUON + [f"parallel.ds_config=ds_configs/zero{zero}.json",
                                                        "parallel.expert_parallel_size=2", "model.tie_group_size=2",
                                                        "run.precision=bf16"]
    out["zero3-ep2-tied-g3-deepseek-muon"] = MUON + [
        "parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2",
        "model.preset=deepseek_moe_tiny", "model.tie_group_size=3"]
    if not full:
        out = {k: v for k, v in out.items() if k in MUON_CI_CELLS}
    return out


# The paper's Muon lr; tied banks at 1/sqrt(g), the AdamW half at 0.1x.
MUON = ["optim.name=muon", "optim.lr=2e-2"]
# One cell per ZeRO stage, both EP sizes, tied and untied, one bf16 and the DeepSeek layout (see muon_cells).
MUON_CI_CELLS = ("zero0-ep1-untied-muon", "zero1-ep2-tied-muon", "zero2-ep1-untied-muon", "zero3-ep2-tied-muon",
                 "zero3-ep2-tied-muon-bf16", "zero3-ep2-tied-g3-deepseek-muon")


def one_device_cells() -> dict[str, list[str]]:
    """ZeRO {0, 3} x EP 1 x {tied, untied} x {fp32, bf16}: what one rank (one GPU) can check."""
    out = {}
    for zero, g, precision in itertools.product([0, 3], [2, 1], ["fp32", "bf16"]):
        name = f"zero{zero}-ep1-{'tied' if g > 1 else 'untied'}" + ("-bf16" if precision == "bf16" else "")
        out[name] = [f"parallel.ds_config=ds_configs/zero{zero}.json", "parallel.expert_parallel_size=1",
                     f"model.tie_group_size={g}", f"run.precision={precision}"]
    return out


def default_world(which: str) -> int:
    """The ranks a cell set is meant for: `gpu1` holds the cells one device runs (it ran them on 2 ranks
    unless `--world 1` was given, so `--cells gpu1` alone checked another layout than it says)."""
    return 1 if which == "gpu1" else WORLD


def cell_tolerance(name: str, tol: float) -> float:
    """bf16 cells are compared with the fp32 reference, so only loosely (rounding, not exactness)."""
    return 5e-2 if name.endswith("bf16") else tol


def grad_norm_tolerance(name: str) -> float:
    """Relative, first step (same weights): the trainer's global gradient norm (before clipping) vs
    clip_grad_norm_ on the reference. Later steps only agree to ~1e-3: a router's top-k choice flips on
    a 1e-7 weight difference, which moves the gradient far more than the loss."""
    return 1e-2 if name.endswith("bf16") else 1e-5


def per_use_grad_norm(cfg: TrainConfig, world: int) -> float:
    """The reference's first-step gradient norm with each tied bank counted at every layer using it:
    what a norm that did not de-duplicate tied tensors would report (the negative control)."""
    model = reference_run(cfg, world, steps=1).model  # gradients of step 1 are still on the parameters
    uses = expert_bank_uses(model.config)
    total = 0.0
    for name, param in model.named_parameters():
        owner = expert_owner_of(name, uses)
        total += (uses[owner] if owner is not None else 1) * param.grad.double().pow(2).sum().item()
    return total ** 0.5


def cell_config(overrides: list[str], steps: int, out_dir: str) -> TrainConfig:
    return load_config(None, BASE + [f"run.steps={steps}", f"run.out_dir={out_dir}"] + overrides)


SGD_CELL = ["parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2", "model.tie_group_size=2",
            "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=0.0", "optim.grad_clip=0",
            "optim.tied_lr_scale=none", "schedule.kind=constant", "schedule.warmup_steps=0",
            "loss.load_balance_coef=0.0", "loss.z_loss_coef=0.0", "batch.grad_accum=1"]


def _bank(engine: Any, layer: int) -> dict[str, torch.Tensor]:
    """Full copies (all experts, fp32) of one layer's expert bank, in the model's own layout."""
    state = eng.gather_state_dict(engine)
    return {k: state[f"model.layers.{layer}.mlp.experts.{k}"] for k in ("gate_up_proj", "down_proj")}


def worker(args: argparse.Namespace) -> None:
    """Runs on each rank under torch.distributed.run."""
    results: dict[str, Any] = {}
    for name, overrides in cells(args.cells).items():
        if args.only and args.only not in name:
            continue
        result = train(cell_config(overrides + [f"run.name={name}"], args.steps, args.out_dir))
        results[name] = {"losses": result.losses, "grad_norms": result.grad_norms, "summary": result.summary}

    if args.cells not in ("gpu1", "muon"):
        results.update(two_rank_checks(args))
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(results))
    eng.shutdown()


STRICT_ZERO3 = "ds_configs/zero3_strict.json"  # what gather counts are measured under (see two_rank_checks)


def two_rank_checks(args: argparse.Namespace) -> dict[str, Any]:
    """Gather traffic (tied vs untied) and the SGD tied-bank gradient: both need 2 ranks and EP 2."""
    results: dict[str, Any] = {}
    # ZeRO-3 expert all-gather traffic per step, tied vs untied (goal: banks / MoE layers). Strict
    # settings (no persistence, no prefetch): every parameter is fetched on use, so the count sees each
    # bank's gathers; with the shipped persistence threshold the tiny banks would never be re-gathered.
    for ep in (1, 2):
        pair = run_pair(BASE + [f"parallel.ds_config={STRICT_ZERO3}", f"parallel.expert_parallel_size={ep}",
                                "model.tie_group_size=2"], steps=1, repeats=1, warmup=1, progress=None)
        results[f"comm_ep{ep}"] = {k: pair[k] for k in ("expert_gather_ratio_tied_over_untied", "goal_banks_over_layers")}
        results[f"comm_ep{ep}"]["tied_expert_gathers"] = pair["tied"]["expert_gathers"]
        results[f"comm_ep{ep}"]["untied_expert_gathers"] = pair["untied"]["expert_gathers"]

    # SGD: one trainer step; the bank's change / -lr is the gradient DeepSpeed applied.
    s = open_session(cell_config(SGD_CELL, 1, args.out_dir))
    leader = next(p.expert_owner for p in s.plan if p.is_tied_follower)
    before = _bank(s.engine, leader)
    train_step(s, s.cfg.optim.lr)
    after = _bank(s.engine, leader)
    grads = {k: ((before[k] - after[k]) / s.cfg.optim.lr).tolist() for k in before}
    results["sgd"] = {"leader": leader, "grad": grads}
    return results


def sgd_expected(cfg: TrainConfig, leader: int) -> dict[str, torch.Tensor]:
    """Sum over the tie group's layers of per-layer gradients in an UNTIED copy with the same weights."""
    model_cfg = cfg.model_config()
    tied = build_model(model_cfg, seed=cfg.run.seed)
    untied = untied_copy(tied)
    members = [layer.plan.index for layer in tied.model.layers if layer.plan.expert_owner == leader]
    tap = RouterTap(untied)
    total = 0
    for rank in range(WORLD):
        batch = make_source(cfg, "train", rank, WORLD).next_batch()
        parts = training_loss(untied(batch["input_ids"]), batch["labels"], tap.take(), model_cfg.top_k, 0.0, 0.0)
        total = total + parts.total / WORLD
    total.backward()
    return {k: sum(getattr(untied.model.layers[i].mlp.experts, k).grad for i in members)
            for k in ("gate_up_proj", "down_proj")}


CONTROL_STEPS = 8  # the negative controls' minimum run length (see compare)


def compare(raw: dict[str, Any], which: str, steps: int, out_dir: str, world: int = WORLD) -> dict[str, Any]:
    """Replay every cell with the reference; returns a report (also the JSON written by --json)."""
    report: dict[str, Any] = {"cells": {}, "world_size": world, "steps": steps}
    cache: dict[str, Any] = {}
    for name, overrides in cells(which).items():
        if name not in raw:  # left out by --only
            continue
        cfg = cell_config(overrides, steps, out_dir)
        key = json.dumps([cfg.model.__dict__, cfg.optim.__dict__], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = reference_run(cfg, world)
        ref = cache[key]
        got = raw[name]["losses"]
        summary = raw[name]["summary"]
        diff = max(abs(a - b) for a, b in zip(got, ref.losses))
        norms = raw[name]["grad_norms"]
        report["cells"][name] = {"max_abs_loss_diff": diff, "losses": got, "reference": ref.losses,
                                 "first_rel_grad_norm_diff": abs(norms[0] - ref.grad_norms[0]) / ref.grad_norms[0],
                                 "max_rel_grad_norm_diff": max(abs(a - b) / b for a, b in zip(norms, ref.grad_norms)),
                                 "grad_norms": norms,
                                 "reference_grad_norms": ref.grad_norms,
                                 "expert_elements_per_rank": summary["expert_elements_per_rank_measured"],
                                 "expert_elements_per_rank_if_untied": summary["expert_elements_per_rank_if_untied"],
                                 "expert_banks": summary["expert_banks"], "moe_layers": summary["moe_layers"],
                                 "followers_share_leader_bank": summary["followers_share_leader_bank"]}
    if which == "gpu1":
        return report
    # The negative controls are reference-only runs; they need a few steps to drift apart (a flattened-bank
    # Muon differs by ~2e-5 after 2 steps, under 3x the tolerance), so they never run fewer than CONTROL_STEPS.
    control_steps = max(steps, CONTROL_STEPS)
    muon_cfg = cell_config(muon_cells()["zero3-ep2-tied-muon"], control_steps, out_dir)
    # What Muon orthogonalising each bank as one flattened matrix would show: far above the tolerance.
    report["control_muon_flat_bank_loss_diff"] = max(abs(a - b) for a, b in zip(
        reference_run(muon_cfg, WORLD, flat_banks=True).losses, reference_run(muon_cfg, WORLD).losses))
    if which == "muon":
        return report
    control_cfg = cell_config(cells(which)["zero3-ep2-tied"], control_steps, out_dir)
    control = reference_run(control_cfg, WORLD, untie_after_init=True).losses
    tied_ref = reference_run(control_cfg, WORLD).losses
    # What a trainer that silently untied the experts would show: must be far above the tolerance.
    report["control_untied_copy_loss_diff"] = max(abs(a - b) for a, b in zip(control, tied_ref))
    # What a gradient norm counting a tied bank at every use would show: far above the tolerance.
    first = report["cells"]["zero3-ep2-tied"]["grad_norms"][0]
    report["control_per_use_grad_norm_rel_diff"] = abs(per_use_grad_norm(control_cfg, world) - first) / first
    for ep in (1, 2):
        report[f"comm_ep{ep}"] = raw[f"comm_ep{ep}"]
    sgd = raw["sgd"]
    expected = sgd_expected(cell_config(SGD_CELL, 1, out_dir), sgd["leader"])
    report["sgd_grad_max_abs_diff"] = max(
        (torch.tensor(sgd["grad"][k]) - expected[k]).abs().max().item() for k in expected)
    report["sgd_grad_max_abs"] = max(expected[k].abs().max().item() for k in expected)
    return report


def controls_ok(report: dict[str, Any], tol: float) -> bool:
    """Print the SGD check, the ZeRO-3 traffic and the negative controls the report holds; False if one fails."""
    if "control_muon_flat_bank_loss_diff" not in report:  # --cells gpu1
        return True
    flat = report["control_muon_flat_bank_loss_diff"]
    print(f"control: Muon orthogonalising each expert bank as one flattened matrix would differ by {flat:.2e}")
    ok = flat > 3 * tol
    if "sgd_grad_max_abs_diff" not in report:  # --cells muon
        return ok
    print(f"SGD tied-bank gradient vs sum of per-layer gradients: max |diff| {report['sgd_grad_max_abs_diff']:.2e} "
          f"(gradient scale {report['sgd_grad_max_abs']:.2e})")
    for ep in (1, 2):
        comm = report[f"comm_ep{ep}"]
        print(f"ZeRO-3 EP{ep} expert all-gather elements per step, tied/untied: "
              f"{comm['expert_gather_ratio_tied_over_untied']:.3f} (goal banks/layers {comm['goal_banks_over_layers']:.3f})")
    ok = ok and report["sgd_grad_max_abs_diff"] <= tol
    print(f"control: a silently untied trainer would differ by {report['control_untied_copy_loss_diff']:.2e}")
    ok = ok and report["control_untied_copy_loss_diff"] > 3 * tol
    print(f"control: a gradient norm counting tied banks per use would differ by "
          f"{report['control_per_use_grad_norm_rel_diff']:.2e} (relative)")
    return ok and report["control_per_use_grad_norm_rel_diff"] > 100 * grad_norm_tolerance("fp32")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m trainer.parity", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", choices=["quick", "all", "muon", "gpu1"], default="all")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--json", type=output_file, help="write the report here")
    parser.add_argument("--only", type=non_empty("part of a cell name"),
                        help="--cells muon: only the cells whose name contains this")
    parser.add_argument("--world", type=int, help=f"ranks (default: the cells' own, {WORLD}; 1 for --cells gpu1)")
    parser.add_argument("--gpu", action="store_true", help="ranks on GPUs (torchrun) instead of CPU ranks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.world = default_world(args.cells) if args.world is None else args.world
    for flag, value in (("--steps", args.steps), ("--world", args.world)):
        if value < 1:
            parser.error(f"{flag}={value}: expected a positive integer")
    if not args.tol > 0 or args.tol == float("inf"):  # `not >` also catches nan; 0 or less fails every cell
        parser.error(f"--tol={args.tol}: expected a positive number")
    if args.only and args.cells != "muon":
        parser.error("--only needs --cells muon (the other sets' controls need their full cells)")
    if args.only and not any(args.only in name for name in cells(args.cells)):
        parser.error(f"--only={args.only}: matches no cell of --cells {args.cells} ({', '.join(cells(args.cells))})")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device is visible here; leave --gpu out to run on CPU ranks")
    if args.cells != "gpu1" and args.world != WORLD:
        parser.error(f"--cells {args.cells} needs --world {WORLD} (the EP 2 cells); use --cells gpu1 for one rank")
    with tempfile.TemporaryDirectory() as tmp:
        module_args = ["trainer.parity", "--worker", "--cells", args.cells, "--steps", str(args.steps), "--out-dir", tmp,
                       *(["--only", args.only] if args.only else [])]
        raw = collect_json(module_args, args.world, args.gpu, tmp)
        if isinstance(raw, int):
            return raw
        report = compare(raw, args.cells, args.steps, tmp, args.world)
    report["device"] = "gpu" if args.gpu else "cpu"
    worst = max(max(c["max_abs_loss_diff"] / cell_tolerance(name, args.tol),
                    c["first_rel_grad_norm_diff"] / grad_norm_tolerance(name)) for name, c in report["cells"].items())
    print(f"{'cell':<30} {'max |loss - ref|':>17} {'grad norm rel diff (step 1 / max)':>34} {'expert elems/rank':>18} "
          f"{'if untied':>10}")
    for name, c in report["cells"].items():
        norm = f"{c['first_rel_grad_norm_diff']:.1e} / {c['max_rel_grad_norm_diff']:.1e}"
        print(f"{name:<30} {c['max_abs_loss_diff']:>17.2e} {norm:>34} "
              f"{c['expert_elements_per_rank'][0]:>18,} {c['expert_elements_per_rank_if_untied']:>10,}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    ok = worst <= 1.0 and controls_ok(report, args.tol)
    print("PASS" if ok else f"FAIL (tolerance {args.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
