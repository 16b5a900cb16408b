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
from models.config import LayerPlan, ModelConfig, layer_plan
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

    def log_eval(self, step: int, val_ce: float | None) -> None:
        if not self.enabled or val_ce is None:
            return
        print(f"step {step + 1:>6}/{self.steps}  val ce {val_ce:.4f}", flush=True)
        self.metrics.write(json.dumps({"step": step + 1, "val_ce": val_ce}) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            self.writer.add_scalar("val/ce", val_ce, step + 1)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def _mean_over_ranks(values: list[float]) -> list[float]:
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64, device=eng.comm_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def evaluate(engine: Any, cfg: TrainConfig, rank: int, world: int) -> float | None:
    """Mean cross-entropy over `run.eval_batches` validation micro-batches per rank (None: no validation data)."""
    source = make_source(cfg, "validation", rank, world)
    if source is None:
        return None
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg.run.eval_batches):
            batch = eng.to_device(source.next_batch(), engine)
            logits = engine(batch["input_ids"])
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()).item()
    engine.train()
    return _mean_over_ranks([total / cfg.run.eval_batches])[0]


@dataclass
class _Rank:
    """What one rank holds while training."""

    cfg: TrainConfig
    rank: int
    world: int
    run_dir: Path
    engine: Any
    source: Any
    tap: RouterTap
    steps: int
    model_cfg: ModelConfig
    plan: list[LayerPlan]
    summary: dict[str, Any]  # sizes from describe_run; final losses are added at the end

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def train(cfg: TrainConfig) -> RunResult:
    """Train as the config says; returns per-step losses (identical on every rank)."""
    run = _start(cfg)
    start = _resume(run)
    stop = min(run.steps, cfg.run.stop_at_step or run.steps)
    tokens_per_step = cfg.batch.micro_batch_size * cfg.batch.grad_accum * run.world * cfg.data.seq_len
    progress = Progress(run.run_dir, run.steps, tokens_per_step, enabled=run.rank == 0, start_step=start)
    result = RunResult(run_dir=run.run_dir)
    for step in range(start, stop):
        lr = lr_at(step, run.steps, cfg.optim.lr, cfg.schedule)
        eng.set_lr(run.engine, lr)
        (loss, ce, lb, z), router_logits = _optimizer_step(run)
        result.losses.append(loss)
        result.ce.append(ce)
        if _due(step, cfg.run.log_every) or step + 1 == stop:
            progress.log(step, {"loss": loss, "ce": ce, "lb": lb, "z": z, "lr": lr}, _routing(run, router_logits))
        if _due(step, cfg.run.eval_every) and step + 1 < run.steps:
            progress.log_eval(step, evaluate(run.engine, cfg, run.rank, run.world))
        if _due(step, cfg.run.save_every) or step + 1 == stop:
            checkpoint.save(run.engine, run.ckpt_dir, step + 1, run.source.state_dict(), cfg.run.keep_checkpoints,
                            checkpoint.identity(cfg))
    return _finish(run, result, progress, start, stop)


def _due(step: int, every: int) -> bool:
    return every > 0 and (step + 1) % every == 0


def _start(cfg: TrainConfig) -> _Rank:
    """Process group, data, engine; the run directory gets the resolved config and DeepSpeed config."""
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
    engine = eng.initialize(build_model(model_cfg, seed=cfg.run.seed), cfg)
    torch.manual_seed(cfg.run.seed + rank)
    summary = describe_run(engine, cfg, world)
    run = _Rank(cfg=cfg, rank=rank, world=world, run_dir=run_dir, engine=engine,
                source=make_source(cfg, "train", rank, world), tap=RouterTap(engine.module),
                steps=total_steps(cfg, world), model_cfg=model_cfg, plan=layer_plan(model_cfg), summary=summary)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "ds_config.json").write_text(json.dumps(eng.deepspeed_config(cfg, world), indent=2))
        print(f"run dir {run_dir}  world {world}  ZeRO {summary['zero_stage']}  EP {cfg.parallel.expert_parallel_size}"
              f"  unique params {summary['unique_params']:,}  expert banks {summary['expert_banks']}/"
              f"{summary['moe_layers']}", flush=True)
    return run


def _resume(run: _Rank) -> int:
    """Continue from the run's latest checkpoint (run.resume=auto); returns the first step to run."""
    tag = checkpoint.latest_tag(run.ckpt_dir) if run.cfg.run.resume == "auto" else None
    if tag is None:
        if run.rank == 0:
            (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return 0
    checkpoint.check_identity(run.ckpt_dir, tag, checkpoint.identity(run.cfg))
    state = checkpoint.load(run.engine, run.ckpt_dir, tag)
    run.source.load_state_dict(state["data"])
    if run.rank == 0:
        print(f"resumed from {run.ckpt_dir / tag} at step {state['step']}", flush=True)
    return state["step"]


def _optimizer_step(run: _Rank) -> tuple[list[float], list[torch.Tensor]]:
    """One optimizer step over grad_accum micro-batches; losses averaged over micro-batches and ranks."""
    cfg, top_k = run.cfg, run.model_cfg.top_k
    sums = torch.zeros(4, dtype=torch.float64)
    for _ in range(cfg.batch.grad_accum):
        batch = eng.to_device(run.source.next_batch(), run.engine)
        logits = run.engine(batch["input_ids"])
        router_logits = run.tap.take()
        parts = training_loss(logits, batch["labels"], router_logits, top_k, cfg.loss.load_balance_coef,
                              cfg.loss.z_loss_coef)
        run.engine.backward(parts.total)
        run.engine.step()
        sums += torch.tensor([parts.total.item(), parts.ce.item(), parts.lb.item(), parts.z.item()])
    return _mean_over_ranks((sums / cfg.batch.grad_accum).tolist()), router_logits


def _routing(run: _Rank, router_logits: list[torch.Tensor]) -> dict[str, float]:
    """Routing health of the last micro-batch, averaged over ranks."""
    stats = routing_stats(router_logits, run.model_cfg.top_k, run.plan)
    return dict(zip(stats, _mean_over_ranks(list(stats.values())))) if stats else {}


def _finish(run: _Rank, result: RunResult, progress: Progress, start: int, stop: int) -> RunResult:
    """Final validation loss and summary.json (nothing when the run was already complete)."""
    if start >= stop:
        progress.close()
        if run.rank == 0:
            print(f"nothing to do: {run.ckpt_dir} is already at step {start} of {run.steps} "
                  f"(set run.resume=never or another run.name to start over)", flush=True)
        return result
    result.val_loss = evaluate(run.engine, run.cfg, run.rank, run.world)
    progress.log_eval(stop - 1, result.val_loss)
    progress.close()
    run.tap.remove()
    result.summary = dict(run.summary)
    result.summary.update(final_loss=result.losses[-1], val_ce=result.val_loss, steps=stop, start_step=start)
    if run.rank == 0:
        val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
        print(f"done: step {stop}/{run.steps}, final loss {result.losses[-1]:.4f}, val ce {val}", flush=True)
        (run.run_dir / "summary.json").write_text(json.dumps(result.summary, indent=2))
    return result


def describe_run(engine: Any, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """Sizes worth recording: measured per-rank expert elements vs what the untied model would hold."""
    import deepspeed.comm as dist

    model_cfg = cfg.model_config()
    acc = account(model_cfg)
    ep = cfg.parallel.expert_parallel_size
    zero_stage = engine.zero_optimization_stage()
    measured = eng.local_expert_elements(engine)
    per_rank = torch.tensor([measured], dtype=torch.float64, device=eng.comm_device())
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
