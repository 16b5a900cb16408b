"""The training loop. Runs on every rank under a launcher (torchrun / deepspeed); see trainer.cli."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from models.accounting import account
from models.config import layer_plan
from models.transformer import build_model
from trainer import checkpoint
from trainer import engine as eng
from trainer.config import REPO_ROOT, TrainConfig
from trainer.data import ensure_data, make_source
from trainer.losses import RouterTap, training_loss
from trainer.routing_stats import routing_stats
from trainer.schedule import lr_at


@dataclass
class RunResult:
    run_dir: Path
    losses: list[float] = field(default_factory=list)  # mean total loss over ranks, per optimizer step
    ce: list[float] = field(default_factory=list)
    val_loss: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def total_steps(cfg: TrainConfig, world_size: int) -> int:
    if cfg.run.tokens is None:
        return cfg.run.steps
    per_step = cfg.batch.micro_batch_size * cfg.batch.grad_accum * world_size * cfg.data.seq_len
    return max(1, cfg.run.tokens // per_step)


def run_dir_for(cfg: TrainConfig) -> Path:
    out = Path(cfg.run.out_dir)
    return (out if out.is_absolute() else REPO_ROOT / out) / cfg.run.name


class Progress:
    """One line per log step on rank 0: step, loss, tokens/s, ETA; also metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, steps: int, tokens_per_step: int, enabled: bool, start_step: int = 0) -> None:
        self.steps, self.tokens_per_step, self.enabled, self.start_step = steps, tokens_per_step, enabled, start_step
        self.start = time.perf_counter()
        self.metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def log(self, step: int, values: dict[str, float], routing: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        done = step + 1 - self.start_step
        tok_s = done * self.tokens_per_step / max(elapsed, 1e-9)
        eta = (self.steps - step - 1) * elapsed / done
        routing = routing or {}
        agree = f"  tie-agree {routing['mean/tie_agreement']:.2f}" if "mean/tie_agreement" in routing else ""
        print(f"step {step + 1:>6}/{self.steps}  loss {values['loss']:.4f}  ce {values['ce']:.4f}  "
              f"lb {values['lb']:.3f}  z {values['z']:.2f}  lr {values['lr']:.2e}{agree}  {tok_s:,.0f} tok/s  "
              f"eta {eta:,.0f}s", flush=True)
        self.metrics.write(json.dumps({"step": step + 1, "tokens_per_s": tok_s, **values, "routing": routing}) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step + 1)
            self.writer.add_scalar("train/tokens_per_s", tok_s, step + 1)
            for key, value in routing.items():
                self.writer.add_scalar(f"routing/{key}", value, step + 1)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def _mean_over_ranks(values: list[float]) -> list[float]:
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def evaluate(engine: Any, cfg: TrainConfig, rank: int, world: int) -> float:
    """Mean cross-entropy over `run.eval_batches` validation micro-batches per rank."""
    source = make_source(cfg, "validation", rank, world)
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg.run.eval_batches):
            batch = source.next_batch()
            logits = engine(batch["input_ids"])
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()).item()
    engine.train()
    return _mean_over_ranks([total / cfg.run.eval_batches])[0]


def train(cfg: TrainConfig) -> RunResult:
    """Train as the config says; returns per-step losses (identical on every rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    eng.check_world(cfg, world)
    eng.init_distributed()
    import deepspeed.comm as dist

    rank = dist.get_rank()
    run_dir = run_dir_for(cfg)
    if rank == 0:
        ensure_data(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    model_cfg = cfg.model_config()
    model = build_model(model_cfg, seed=cfg.run.seed)
    engine = eng.initialize(model, cfg)
    torch.manual_seed(cfg.run.seed + rank)
    source = make_source(cfg, "train", rank, world)
    tap = RouterTap(engine.module)
    plan = layer_plan(model_cfg)
    steps = total_steps(cfg, world)
    tokens_per_step = cfg.batch.micro_batch_size * cfg.batch.grad_accum * world * cfg.data.seq_len
    summary = describe_run(engine, cfg, world)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "ds_config.json").write_text(json.dumps(eng.deepspeed_config(cfg, world), indent=2))
        print(f"run dir {run_dir}  world {world}  ZeRO {summary['zero_stage']}  EP {cfg.parallel.expert_parallel_size}"
              f"  unique params {summary['unique_params']:,}  expert banks {summary['expert_banks']}/"
              f"{summary['moe_layers']}", flush=True)
    ckpt_dir = run_dir / "checkpoints"
    start = 0
    tag = checkpoint.latest_tag(ckpt_dir) if cfg.run.resume == "auto" else None
    if tag is not None:
        checkpoint.check_identity(ckpt_dir, tag, checkpoint.identity(cfg))
        state = checkpoint.load(engine, ckpt_dir, tag)
        source.load_state_dict(state["data"])
        start = state["step"]
        if rank == 0:
            print(f"resumed from {ckpt_dir / tag} at step {start}", flush=True)
    elif rank == 0:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    stop = min(steps, cfg.run.stop_at_step or steps)
    progress = Progress(run_dir, steps, tokens_per_step, enabled=rank == 0, start_step=start)
    result = RunResult(run_dir=run_dir)

    for step in range(start, stop):
        lr = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
        eng.set_lr(engine, lr)
        sums = torch.zeros(4, dtype=torch.float64)
        for _ in range(cfg.batch.grad_accum):
            batch = source.next_batch()
            logits = engine(batch["input_ids"])
            router_logits = tap.take()
            parts = training_loss(logits, batch["labels"], router_logits, model_cfg.top_k,
                                  cfg.loss.load_balance_coef, cfg.loss.z_loss_coef)
            engine.backward(parts.total)
            engine.step()
            sums += torch.tensor([parts.total.item(), parts.ce.item(), parts.lb.item(), parts.z.item()])
        loss, ce, lb, z = _mean_over_ranks((sums / cfg.batch.grad_accum).tolist())
        result.losses.append(loss)
        result.ce.append(ce)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == stop:
            routing = routing_stats(router_logits, model_cfg.top_k, plan)  # last micro-batch, mean over ranks
            routing = dict(zip(routing, _mean_over_ranks(list(routing.values())))) if routing else {}
            progress.log(step, {"loss": loss, "ce": ce, "lb": lb, "z": z, "lr": lr}, routing)
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < steps:
            val = evaluate(engine, cfg, rank, world)
            if rank == 0:
                print(f"step {step + 1:>6}/{steps}  val ce {val:.4f}", flush=True)
        if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or step + 1 == stop:
            checkpoint.save(engine, ckpt_dir, step + 1, source.state_dict(), cfg.run.keep_checkpoints,
                            checkpoint.identity(cfg))
    if start >= stop:
        if rank == 0:
            print(f"nothing to do: {ckpt_dir / str(tag)} is already at step {start} of {steps} "
                  f"(set run.resume=never or another run.name to start over)", flush=True)
        progress.close()
        return result
    result.val_loss = evaluate(engine, cfg, rank, world)
    tap.remove()
    summary.update(final_loss=result.losses[-1], val_ce=result.val_loss, steps=stop, start_step=start)
    result.summary = summary
    if rank == 0:
        print(f"done: step {stop}/{steps}, final loss {result.losses[-1]:.4f}, val ce {result.val_loss:.4f}", flush=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    progress.close()
    return result


def describe_run(engine: Any, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """Sizes worth recording: measured per-rank expert elements vs what the untied model would hold."""
    import deepspeed.comm as dist

    model_cfg = cfg.model_config()
    acc = account(model_cfg)
    ep = cfg.parallel.expert_parallel_size
    zero_stage = engine.zero_optimization_stage()
    measured = eng.local_expert_elements(engine)
    per_rank = torch.tensor([measured], dtype=torch.float64)
    gathered = [torch.zeros_like(per_rank) for _ in range(world)]
    dist.all_gather(gathered, per_rank)
    # Untied expert elements per rank: every MoE layer's bank, sharded over EP (and over the
    # expert-data-parallel group at ZeRO-3).
    untied_expert = sum(p.n_experts * 3 * model_cfg.expert_ffn_dim * model_cfg.d_model
                        for p in layer_plan(model_cfg)
                        if p.ffn == "moe")
    shard = ep * (world // ep if zero_stage == 3 else 1)
    return {
        "zero_stage": zero_stage, "world_size": world, "expert_parallel_size": ep,
        "unique_params": acc.unique_params, "untied_params": acc.untied_params,
        "expert_banks": acc.expert_banks, "moe_layers": acc.moe_layers,
        "expert_elements_per_rank_measured": [int(t.item()) for t in gathered],
        "expert_elements_per_rank_if_untied": untied_expert // shard,
    }
