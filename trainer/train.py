"""The training loop. Runs on every rank under a launcher (torchrun / deepspeed); see trainer.launch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer import checkpoint
from trainer import engine as eng
from trainer.config import TrainConfig
from trainer.data import ensure_data
from trainer.metrics import Progress, dumps
from trainer.routing_stats import routing_stats
from trainer.schedule import lr_at
from trainer.session import Session, StepResult, describe, open_session, train_step, validation_ce


@dataclass
class RunResult:
    run_dir: Path
    losses: list[float] = field(default_factory=list)  # mean total loss over ranks, per optimizer step
    ce: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)  # measured on log steps, else None
    val_loss: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def train(cfg: TrainConfig) -> RunResult:
    """Train as the config says; returns per-step losses (identical on every rank)."""
    s, run_dir = _start(cfg)
    start = _resume(s, run_dir)
    stop = min(s.steps, cfg.run.stop_at_step or s.steps)
    progress = Progress(run_dir, s, start)
    result = RunResult(run_dir=run_dir)
    for step in range(start, stop):
        lr = lr_at(step, s.steps, cfg.optim.lr, cfg.schedule)
        log_now = _due(step, cfg.run.log_every) or step + 1 == stop
        out = train_step(s, lr, measure_grad_norm=log_now)
        progress.record(out)
        result.losses.append(out.loss)
        result.ce.append(out.ce)
        result.grad_norms.append(out.grad_norm)
        if log_now:
            progress.log(step, lr, out, _routing(s, out))
        if _due(step, cfg.run.eval_every) and step + 1 < s.steps:
            progress.log_eval(step, validation_ce(s))
        if _due(step, cfg.run.save_every) or step + 1 == stop:
            checkpoint.save(s.engine, run_dir / "checkpoints", step + 1, s.source.state_dict(),
                            cfg.run.keep_checkpoints, checkpoint.identity(s.cfg))
    return _finish(s, run_dir, result, progress, start, stop)


def _due(step: int, every: int) -> bool:
    return every > 0 and (step + 1) % every == 0


def _start(cfg: TrainConfig) -> tuple[Session, Path]:
    """Process group, data, session; the run directory gets the resolved config and DeepSpeed config."""
    cfg.for_world(eng.launched_world_size())  # world-dependent config errors before any process group
    eng.init_distributed()
    run_dir = cfg.run_dir()
    if eng.rank() == 0:
        ensure_data(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    eng.barrier()
    s = open_session(cfg)
    if s.rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(s.cfg.to_dict(), sort_keys=False))
        (run_dir / "ds_config.json").write_text(dumps(s.ds_config, indent=2))
        acc = s.accounting
        print(f"run dir {run_dir}  world {s.world}  ZeRO {s.engine.zero_optimization_stage()}  EP "
              f"{s.cfg.parallel.expert_parallel_size}  unique params {acc.unique_params:,}  expert banks "
              f"{acc.expert_banks}/{acc.moe_layers}", flush=True)
    return s, run_dir


def _resume(s: Session, run_dir: Path) -> int:
    """Continue from the run's latest checkpoint (run.resume=auto); returns the first step to run."""
    ckpt_dir = run_dir / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir) if s.cfg.run.resume == "auto" else None
    if tag is None:
        if s.rank == 0:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return 0
    checkpoint.check_identity(ckpt_dir, tag, checkpoint.identity(s.cfg))
    state = checkpoint.load(s.engine, ckpt_dir, tag)
    s.source.load_state_dict(state["data"])
    if s.rank == 0:
        print(f"resumed from {ckpt_dir / tag} at step {state['step']}", flush=True)
    return state["step"]


def _routing(s: Session, out: StepResult) -> dict[str, float]:
    """Routing health of the step's last micro-batch, averaged over ranks."""
    stats = routing_stats(out.router_logits, s.model_cfg.top_k, s.plan)
    return dict(zip(stats, eng.mean_over_ranks(list(stats.values())))) if stats else {}


def _finish(s: Session, run_dir: Path, result: RunResult, progress: Progress, start: int, stop: int) -> RunResult:
    """Final validation loss and summary.json (nothing when the run was already complete)."""
    if start >= stop:
        progress.close()
        if s.rank == 0:
            print(f"nothing to do: {run_dir / 'checkpoints'} is already at step {start} of {s.steps} "
                  f"(set run.resume=never or another run.name to start over)", flush=True)
        return result
    result.val_loss = validation_ce(s)
    progress.log_eval(stop - 1, result.val_loss)
    progress.close()
    s.close()
    result.summary = describe(s)
    result.summary.update(final_loss=result.losses[-1], val_ce=result.val_loss, steps=stop, start_step=start)
    if s.rank == 0:
        val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
        print(f"done: step {stop}/{s.steps}, final loss {result.losses[-1]:.4f}, val ce {val}", flush=True)
        (run_dir / "summary.json").write_text(dumps(result.summary, indent=2))
    return result
