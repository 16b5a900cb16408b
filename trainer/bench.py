"""Tied vs untied, side by side in one run: training throughput and ZeRO-3 expert traffic.

    python -m trainer.bench [--steps N] [--repeats R] [--json OUT] [key=value ...]
    torchrun --nproc_per_node 8 -m trainer.bench --json benchmarks/results/tying_gpu.json [key=value ...]

Starts 2 CPU ranks (or uses the launcher's ranks on GPUs) and builds both engines in the same
processes, then times them in alternating blocks so machine noise hits both alike. Reports tokens/s
and their ratio (goal: tied / untied >= 0.98), expert all-gather elements per step (goal at ZeRO-3:
banks / MoE layers of the untied model) and per-rank expert elements held. Absolute tokens/s from a
CPU mean little; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer import engine as eng
from trainer.config import REPO_ROOT, TrainConfig, load_config

DEFAULT_OVERRIDES = ["data.source=random", "run.log_every=1000000"]


class Runner:
    """One engine plus its data, able to run timed blocks of optimizer steps."""

    def __init__(self, cfg: TrainConfig) -> None:
        import deepspeed.comm as dist

        from models.transformer import build_model
        from trainer.data import make_source
        from trainer.losses import RouterTap

        self.cfg = cfg
        self.model_cfg = cfg.model_config()
        self.engine = eng.initialize(build_model(self.model_cfg, seed=cfg.run.seed), cfg)
        self.source = make_source(cfg, "train", dist.get_rank(), dist.get_world_size())
        self.tap = RouterTap(self.engine.module)
        self.counter = eng.GatherCounter()
        eng.set_lr(self.engine, cfg.optim.lr)

    def step(self) -> None:
        from trainer.losses import training_loss

        for _ in range(self.cfg.batch.grad_accum):
            batch = eng.to_device(self.source.next_batch(), self.engine)
            parts = training_loss(self.engine(batch["input_ids"]), batch["labels"], self.tap.take(),
                                  self.model_cfg.top_k, self.cfg.loss.load_balance_coef, self.cfg.loss.z_loss_coef)
            self.engine.backward(parts.total)
            self.engine.step()

    def timed(self, steps: int) -> float:
        import deepspeed.comm as dist

        from deepspeed.accelerator import get_accelerator

        dist.barrier()
        get_accelerator().synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        get_accelerator().synchronize()
        dist.barrier()
        return time.perf_counter() - start

    def gathers_per_step(self) -> dict[str, int]:
        self.counter.reset()
        with self.counter.active():
            self.step()
        return {"expert_gather_elements": self.counter.expert_elements,
                "expert_gathers": self.counter.expert_gathers, "other_gather_elements": self.counter.other_elements}


def run_pair(overrides: list[str], steps: int, repeats: int, warmup: int = 3) -> dict[str, Any]:
    """Tied (as configured) and untied (tie_group_size=1) engines, measured alternately."""
    import deepspeed.comm as dist

    from trainer.train import describe_run

    world = dist.get_world_size()
    variants = {"tied": overrides, "untied": overrides + ["model.tie_group_size=1", "model.tie_groups=null"]}
    runners = {name: Runner(load_config(None, DEFAULT_OVERRIDES + o)) for name, o in variants.items()}
    times = {name: 0.0 for name in runners}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    for _ in range(repeats):
        for name, runner in runners.items():
            times[name] += runner.timed(steps)
    out: dict[str, Any] = {}
    for name, runner in runners.items():
        cfg = runner.cfg
        tokens = cfg.batch.micro_batch_size * cfg.batch.grad_accum * world * cfg.data.seq_len * steps * repeats
        info = describe_run(runner.engine, cfg, world)
        out[name] = {"tokens_per_s": tokens / times[name], "seconds": times[name],
                     "expert_elements_per_rank": info["expert_elements_per_rank_measured"],
                     "expert_banks": info["expert_banks"], "moe_layers": info["moe_layers"],
                     "local_param_elements": eng.local_param_elements(runner.engine)}
        if runner.engine.zero_optimization_stage() == 3:
            out[name].update(runner.gathers_per_step())
    out["throughput_ratio_tied_over_untied"] = out["tied"]["tokens_per_s"] / out["untied"]["tokens_per_s"]
    if "expert_gather_elements" in out["tied"]:
        out["expert_gather_ratio_tied_over_untied"] = (out["tied"]["expert_gather_elements"]
                                                       / out["untied"]["expert_gather_elements"])
    out["expert_memory_ratio_tied_over_untied"] = (out["tied"]["expert_elements_per_rank"][0]
                                                   / out["untied"]["expert_elements_per_rank"][0])
    out["goal_banks_over_layers"] = out["tied"]["expert_banks"] / out["tied"]["moe_layers"]
    return out


def worker(args: argparse.Namespace) -> None:
    import deepspeed.comm as dist


    eng.init_distributed()
    result = run_pair(args.overrides, args.steps, args.repeats)
    result.update(overrides=args.overrides, steps=args.steps, repeats=args.repeats, world_size=dist.get_world_size(),
                  device=_device(), torch=torch.__version__)
    if dist.get_rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
        if not args.worker:  # started by a launcher (e.g. torchrun on GPUs): report here
            print(render(result))
            print(f"wrote {args.json_raw}", flush=True)
    eng.shutdown()


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def render(result: dict[str, Any]) -> str:
    lines = [f"tied vs untied on {result['world_size']} ranks, {result['device']}; overrides: "
             f"{' '.join(result['overrides']) or '(default config)'}",
             f"{'':<8} {'tokens/s':>10} {'expert elems/rank':>18} {'expert gather elems/step':>25}"]
    for name in ("tied", "untied"):
        r = result[name]
        lines.append(f"{name:<8} {r['tokens_per_s']:>10,.0f} {r['expert_elements_per_rank'][0]:>18,} "
                     f"{r.get('expert_gather_elements', 0):>25,}")
    lines.append(f"throughput ratio tied/untied      {result['throughput_ratio_tied_over_untied']:.3f}  (goal >= 0.98)")
    lines.append(f"expert memory ratio tied/untied   {result['expert_memory_ratio_tied_over_untied']:.3f}  "
                 f"(banks/layers = {result['goal_banks_over_layers']:.3f})")
    if "expert_gather_ratio_tied_over_untied" in result:
        lines.append(f"expert all-gather ratio           {result['expert_gather_ratio_tied_over_untied']:.3f}  "
                     f"(goal {result['goal_banks_over_layers']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="alternating blocks per variant")
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "tying_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to both variants")
    args = parser.parse_args(argv)
    load_config(None, DEFAULT_OVERRIDES + args.overrides)  # fail fast on bad overrides
    if args.worker or "RANK" in os.environ:
        if not args.json_raw:
            args.json_raw = args.json
        worker(args)
        return 0
    from trainer.cli import report_from_cpu_ranks

    return report_from_cpu_ranks(["trainer.bench", "--worker", "--steps", str(args.steps), "--repeats",
                                  str(args.repeats), *args.overrides], render, args.json)


if __name__ == "__main__":
    sys.exit(main())
