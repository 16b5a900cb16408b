"""The training loop. Runs on every rank under a launcher (torchrun / deepspeed); see trainer.launch."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import plan_notes
from trainer import checkpoint, downstream, run_lock
from trainer import engine as eng
from trainer.config import TrainConfig
from trainer.data import check_source, ensure_data, validation_reuse_note
from trainer.memory import write_run_report
from trainer.metrics import Progress, dumps
from trainer.preemption import LAUNCHER_GONE, StopSignal
from trainer.reshard import resume_layout_free
from trainer.routing_stats import routing_stats
from trainer.schedule import lr_at
from trainer.session import Session, StepResult, describe, nonfinite_layers, open_session, train_step, validation_ce


@dataclass
class RunResult:
    run_dir: Path
    losses: list[float] = field(default_factory=list)  # mean total loss over ranks, per optimizer step
    ce: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)  # measured on log steps, else None
    val_loss: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


FAULT_NAN_ENV = "TIEDMOE_FAULT_NAN_AT_STEP"
FAULT_SIGTERM_ENV = "TIEDMOE_FAULT_SIGTERM_AT_STEP"  # tests only: rank 0 sends itself SIGTERM during this step


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm with run.on_nonfinite=stop; nothing of that step was saved."""


def train(cfg: TrainConfig) -> RunResult:
    """Train as the config says; returns per-step losses (identical on every rank)."""
    s, run_dir = _start(cfg)
    start = _resume(s, run_dir)
    _record_run_files(s, run_dir)  # only now: a refused resume leaves the run directory untouched
    stop = min(s.steps, cfg.run.stop_at_step or s.steps)
    progress = Progress(run_dir, s, start)
    tokenizer = downstream.check(s) if cfg.run.downstream_every else None
    result = RunResult(run_dir=run_dir)
    signals = StopSignal()
    skips_in_a_row = 0
    fault_step = int(os.environ.get(FAULT_NAN_ENV, "0"))  # tests only: a NaN loss at this step
    sigterm_step = int(os.environ.get(FAULT_SIGTERM_ENV, "0"))
    try:
        for step in range(start, stop):
            lr = lr_at(step, s.steps, cfg.optim.lr, cfg.schedule)
            log_now = _due(step, cfg.run.log_every) or step + 1 == stop
            s.grads.armed = step == start or step + 1 == stop  # the steps a memory report follows
            out = train_step(s, lr, measure_grad_norm=log_now, poison=step + 1 == fault_step)
            skips_in_a_row = skips_in_a_row + 1 if out.skipped else 0
            _check_finite(s, step, out, skips_in_a_row)
            if step == start:
                with progress.paused():
                    write_run_report(s, run_dir)  # memory_report.json/.md after the first optimizer step
            progress.record(out)
            result.losses.append(out.loss)
            result.ce.append(out.ce)
            result.grad_norms.append(out.grad_norm)
            if log_now:
                progress.log(step, lr, out, _routing(s, out))
            if _due(step, cfg.run.eval_every) and step + 1 < stop:  # `_finish` validates the last step
                with progress.paused():
                    progress.log_eval(step, validation_ce(s))
            if _due(step, cfg.run.downstream_every):
                with progress.paused():
                    progress.log_downstream(step, downstream.scores(s, tokenizer))
            if step + 1 == sigterm_step and s.rank == 0:  # a signal that lands inside this step, deterministically
                os.kill(os.getpid(), signal.SIGTERM)
            preempted = signals.stop_requested()
            if _due(step, cfg.run.save_every) or step + 1 == stop or preempted:
                with progress.paused():
                    _check_weights(s, step)
                    checkpoint.save(s.engine, run_dir / "checkpoints", step + 1, s.source.state_dict(),
                                    cfg.run.keep_checkpoints, checkpoint.identity(s.cfg, s.world))
            if preempted:  # on the last step too: the final validation is left to the next start (`_finish`)
                return _preempted(s, run_dir, result, progress, step + 1, signals.received, stop)
    finally:
        signals.restore()
    return _finish(s, run_dir, result, progress, start, stop)


def _due(step: int, every: int) -> bool:
    return every > 0 and (step + 1) % every == 0


def _start(cfg: TrainConfig) -> tuple[Session, Path]:
    """Process group, data, session; the run directory gets the resolved config and DeepSpeed config."""
    try:  # config errors before any process group; every rank meets them alike (one line per node)
        eng.check_deepspeed_config(cfg.for_world(eng.launched_world_size()))
    except ValueError as err:
        raise eng.RefusedOnEveryRank(str(err)) from None
    eng.init_distributed()
    run_dir = cfg.run_dir()
    eng.on_rank_zero(lambda: _prepare(cfg, run_dir))
    s = open_session(cfg)
    # Under any launcher (trainer.launch read it already): streamed files are read lazily, and a bad validation
    # file failed only at the final validation, after every step was trained and saved.
    eng.on_every_rank(lambda: check_source(s.cfg, "validation", s.rank, s.world))
    if s.rank == 0:
        acc = s.accounting
        print(f"run dir {run_dir}  world {s.world}  ZeRO {s.engine.zero_optimization_stage()}  EP "
              f"{s.cfg.parallel.expert_parallel_size}  unique params {acc.unique_params:,}  expert banks "
              f"{acc.expert_banks}/{acc.moe_layers}", flush=True)
        note = s.cfg.tokens_note(s.world)
        if note:
            print(note, flush=True)
        for note in plan_notes(s.model_cfg):  # a short last group, or tie_* settings that tie nothing
            print(f"note: model: {note}", flush=True)
        for note in s.cfg.unused_optim_notes():
            print(note, flush=True)
        note = validation_reuse_note(s.cfg, s.world)
        if note:
            print(note, flush=True)
    return s, run_dir


def _prepare(cfg: TrainConfig, run_dir: Path) -> None:
    """Rank 0's part of the start: the data built once, the run directory made and held by this job until it
    ends (`trainer.run_lock`: a second job on this run.name is refused)."""
    ensure_data(cfg)
    cfg.make_run_dir()
    run_lock.claim(run_dir)


def _record_run_files(s: Session, run_dir: Path) -> None:
    """The resolved config and what DeepSpeed got, for export and for the record."""
    if s.rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(s.cfg.to_dict(), sort_keys=False))
        (run_dir / "ds_config.json").write_text(dumps(s.ds_config, indent=2))


def _resume(s: Session, run_dir: Path) -> int:
    """Continue from the newest complete, valid checkpoint (run.resume=auto); returns the first step to run.

    Everything that can refuse a resume (manifest, rank files, model, layout and batch identity) is decided
    before anything in the run directory is written.
    """
    ckpt_dir = run_dir / "checkpoints"
    if s.cfg.run.resume == "auto":
        moved = resume_layout_free(s, ckpt_dir)  # a checkpoint converted for another layout
        if moved is not None:
            return moved
    ident = checkpoint.identity(s.cfg, s.world)
    point = (checkpoint.choose_resume(ckpt_dir, s.world, ident) if s.cfg.run.resume == "auto"
             else checkpoint.ResumePoint(None, None))
    if point.skipped and s.rank == 0:
        print(point.skipped, flush=True)
    if point.tag is None:
        if s.rank == 0:
            if s.cfg.run.resume == "never":
                _set_aside_previous(run_dir)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        eng.barrier()
        return 0
    state = checkpoint.load(s.engine, ckpt_dir, point.tag, verify=False)
    try:
        s.source.load_state_dict(state["data"])
    except ValueError as err:  # named neither the checkpoint nor the setting that changed
        raise ValueError(f"checkpoint {ckpt_dir / point.tag}: its data position does not fit this run's data ({err}); "
                         f"resume with the data it was written with (the data.* settings in "
                         f"{run_dir / 'config.yaml'}), or use another run.name or run.resume=never") from None
    if s.rank == 0:
        note = checkpoint.check_identity(ckpt_dir, point.tag, ident)  # the batch change it accepted, if any
        if note:
            print(note, flush=True)
        print(f"resumed from {ckpt_dir / point.tag} at step {state['step']}", flush=True)
    return state["step"]


def _set_aside_previous(run_dir: Path) -> None:
    """run.resume=never starts over: an earlier run's checkpoints, TensorBoard events, metrics.jsonl and the
    files describing it are moved into `replaced-<time>/` (not deleted), so a later `run.resume=auto` cannot
    resume the run that was replaced and the new curves do not mix with the old ones (its metrics.jsonl was
    deleted while its events were kept)."""
    old = [run_dir / name for name in ("checkpoints", "tb", "metrics.jsonl", "summary.json", "config.yaml",
                                       "ds_config.json", "memory_report.json", "memory_report.md")
           if (run_dir / name).exists()]
    if not old:
        return
    aside = checkpoint.aside_dir(run_dir)
    aside.mkdir()
    for path in old:
        path.rename(aside / path.name)
    print(f"run.resume=never: the previous run's {' and '.join(p.name for p in old)} moved to {aside}", flush=True)


def _check_finite(s: Session, step: int, out: StepResult, skips_in_a_row: int) -> None:
    """run.on_nonfinite: `skip` counts a dropped update (train_step dropped it: its loss was non-finite);
    `stop`, and `skip` when only the gradient norm was non-finite, raise before anything of this step is
    saved. The same values are seen on every rank, so all ranks agree."""
    if out.finite:
        return
    layers = nonfinite_layers(s, out)
    where = f"; router logits non-finite in layer(s) {layers}" if layers else ""
    norm = out.grad_norm if out.grad_norm is not None else out.engine_grad_norm
    if math.isfinite(out.loss):  # a finite loss with a non-finite norm was called a "non-finite loss"
        what = f"step {step + 1}: non-finite gradient norm {norm} (loss {out.loss:.4g}){where}"
    else:
        what = f"step {step + 1}: non-finite loss {out.loss}{where}"
    kept = _last_checkpoint(s)
    if out.skipped and skips_in_a_row >= s.cfg.run.max_consecutive_skips:
        raise TrainingDiverged(f"{what}; {skips_in_a_row} updates in a row were skipped, so the model, not a batch, "
                               f"is broken; stopped without saving ({kept})")
    if out.skipped:
        _check_weights(s, step)  # skipping helps a bad batch, not weights that are already broken
        if s.rank == 0:
            print(f"{what}: update skipped (run.on_nonfinite=skip)", flush=True)
        return
    if s.cfg.run.on_nonfinite == "skip":  # the loss was finite (else train_step dropped the update), the norm not
        raise TrainingDiverged(f"{what}; stopped without saving it (run.on_nonfinite=skip drops only updates whose "
                               f"loss is non-finite; {kept}: lower optim.lr)")
    skip = " or set run.on_nonfinite=skip" if not math.isfinite(out.loss) else ""  # skip drops non-finite losses only
    raise TrainingDiverged(f"{what}; stopped without saving it (run.on_nonfinite=stop; {kept}: lower optim.lr{skip})")


def _last_checkpoint(s: Session) -> str:
    """What a restart would resume from: 'the last checkpoint is still the latest' was said of runs with none."""
    return checkpoint.latest_note(s.cfg.run_dir() / "checkpoints")


def _check_weights(s: Session, step: int) -> None:
    """A checkpoint of non-finite weights must never become `latest` (a finite loss can still come with
    an update that overflows the weights)."""
    if not eng.params_finite(s.engine):
        raise TrainingDiverged(f"step {step + 1}: the weights are non-finite after the update; stopped without "
                               f"saving them ({_last_checkpoint(s)}: lower optim.lr)")


def _preempted(s: Session, run_dir: Path, result: RunResult, progress: Progress, step: int,
               signal_name: str | None, stop: int) -> RunResult:
    """A signal asked the job to stop: the checkpoint of `step` is saved; leave so the job can be resumed. At
    the last step (`stop`) the final validation is left too: it ran for minutes under a scheduler's SIGTERM,
    whose grace period ends in SIGKILL; the next start writes it (`_finish`). The memory report is refreshed (peak of
    the run so far), as a finished run's is: the next start, training nothing, keeps it."""
    with progress.paused():
        write_run_report(s, run_dir)  # collective: every rank stops here alike
    progress.close()
    s.close()
    if s.rank == 0:  # a peer's signal is named too (`StopSignal.stop_requested`)
        why = (f"{signal_name} received" if signal_name not in (None, LAUNCHER_GONE) else
               signal_name or "a stop signal on another rank")
        rest = "resume" if step < stop else "write its final validation and summary.json"
        print(f"stopped at step {step} of {s.steps} ({why}): checkpoint saved in "
              f"{run_dir / 'checkpoints'}; run the same command again to {rest}", flush=True)
    return result


def _routing(s: Session, out: StepResult) -> dict[str, float]:
    """Routing health of the step's last micro-batch, averaged over ranks."""
    stats = routing_stats(out.router_logits, s.model_cfg.top_k, s.plan)
    return dict(zip(stats, eng.mean_over_ranks(list(stats.values())))) if stats else {}


def _finish(s: Session, run_dir: Path, result: RunResult, progress: Progress, start: int, stop: int) -> RunResult:
    """Final validation loss and summary.json (nothing when the run was already complete)."""
    written_from = checkpoint.fingerprint(run_dir / "checkpoints", checkpoint.tag_for(stop))  # saved in the loop
    finishing = start == stop and not _summary_written(run_dir, stop, written_from)  # (past run.stop_at_step: not)
    if finishing:  # a stop during the final validation: `nothing to do` left the run without its summary for good
        if s.rank == 0:
            print(f"step {stop} is trained and saved, but its final validation and summary.json were not written "
                  f"(stopped before or during them): writing them now", flush=True)
        result.losses.append(_last_logged_loss(run_dir, stop))
    elif start >= stop:
        progress.close()
        if s.rank == 0:
            # below the run's length, only run.stop_at_step stops it: starting over is not the hint to give
            hint = (f"run.stop_at_step={s.cfg.run.stop_at_step}: raise or remove it to continue" if start < s.steps
                    else "set run.resume=never or another run.name to start over")
            print(f"nothing to do: {run_dir / 'checkpoints'} is already at step {start} of {s.steps} ({hint})",
                  flush=True)
        return result
    result.val_loss = validation_ce(s)
    if not finishing:  # no step in this session: the report of the one that trained stays
        write_run_report(s, run_dir)  # refreshed at the end (peak memory of the whole run)
    progress.log_eval(stop - 1, result.val_loss)
    progress.close()
    s.close()
    result.summary = describe(s)
    result.summary.update(final_loss=result.losses[-1], val_ce=result.val_loss, steps=stop, start_step=start,
                          skipped_updates=progress.skipped, checkpoint_sha256=written_from)
    if s.rank == 0:
        val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
        loss = "n/a" if result.losses[-1] is None else f"{result.losses[-1]:.4f}"
        print(f"done: step {stop}/{s.steps}, final loss {loss}, val ce {val}", flush=True)
        (run_dir / "summary.json").write_text(dumps(result.summary, indent=2))
    return result


def _summary_written(run_dir: Path, stop: int, fingerprint: str | None) -> bool:
    """Whether summary.json describes step `stop` as its checkpoint now holds it (a summary of an earlier write of
    that tag, before a rollback or a fallback, is not), decided on every rank alike (the validation is
    collective). Summaries from before fingerprints are taken at their step."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        written = summary.get("steps") == stop and summary.get("checkpoint_sha256", fingerprint) == fingerprint
    except (OSError, ValueError, AttributeError):
        written = False
    return eng.max_over_ranks([0.0 if written else 1.0])[0] == 0.0


def _last_logged_loss(run_dir: Path, stop: int) -> float | None:
    """The loss metrics.jsonl logged for step `stop` (the final step always logs), for a summary written later."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return next((r.get("loss") for r in reversed(rows) if r.get("step") == stop and "loss" in r), None)
