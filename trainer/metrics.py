"""What a run reports while it trains: interval means, gradient norm, speed, MFU and memory.

Each log step writes one progress line (rank 0), one line of metrics.jsonl (strict JSON: non-finite
values become null) and TensorBoard scalars. Losses are means over the log interval, tokens/s and
step time are measured over the interval (not since start). MFU counts tied layers at every use
(`models.accounting`), against `run.peak_flops` or a known peak for the device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from trainer import engine as eng
from trainer.config import TrainConfig
from trainer.session import Session, StepResult

GIB = 1024 ** 3

# Dense peak FLOP/s per device (vendor data sheets, without sparsity): bf16 tensor cores, and plain fp32
# (torch does not use TF32 for fp32 matmuls by default).
GPU_PEAK_FLOPS = {"H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
                  "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp32": 91.6e12}}


def peak_flops(cfg: TrainConfig) -> tuple[float, str]:
    """Per-device peak FLOP/s and where it came from. Collective on CPU (the probe is averaged over ranks)."""
    if cfg.run.peak_flops is not None:
        return cfg.run.peak_flops, "run.peak_flops"
    precision = cfg.run.precision
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name:
                return peaks[precision], f"{name} {precision} data sheet"
        return float("nan"), f"{name}: unknown peak, set run.peak_flops"
    rate = eng.mean_over_ranks([_cpu_matmul_rate(torch.bfloat16 if precision == "bf16" else torch.float32)])[0]
    return rate, f"CPU {precision} matmul probe"


def _cpu_matmul_rate(dtype: torch.dtype, n: int = 512, trials: int = 5, seconds: float = 0.05) -> float:
    """Measured dense matmul FLOP/s of this process (the CPU's practical peak at its thread count): the
    best of a few short trials, so a moment of load from other processes does not lower the peak."""
    g = torch.Generator().manual_seed(0)  # not the global RNG: resumed runs must draw what straight runs draw
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            calls += 1
        best = max(best, 2 * n ** 3 * calls / (time.perf_counter() - start))
    return best


def memory_gib() -> dict[str, float]:
    """This process's memory now. GPU: allocator bytes; CPU: resident set and its peak (VmHWM)."""
    if torch.cuda.is_available():
        return {"allocated_gib": torch.cuda.memory_allocated() / GIB,
                "reserved_gib": torch.cuda.memory_reserved() / GIB,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}
    rss = psutil.Process().memory_info().rss
    return {"rss_gib": rss / GIB, "peak_rss_gib": max(rss, _peak_rss()) / GIB}


def _peak_rss() -> int:
    """VmHWM (the kernel's resident-set high-water mark) in bytes; ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def strict(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (json.dumps would write bare NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(strict(value), allow_nan=False, **kwargs)


class Progress:
    """Interval bookkeeping on every rank (memory is a collective); writing on rank 0 only."""

    def __init__(self, run_dir: Path, s: Session, start_step: int) -> None:
        self.s, self.enabled = s, s.rank == 0
        self.peak, self.peak_source = peak_flops(s.cfg)
        self.flops_per_token = s.accounting.train_flops_per_token
        self.metrics = _metrics_from(run_dir / "metrics.jsonl", start_step) if self.enabled else None
        self.writer = _tensorboard(run_dir / "tb", start_step) if self.enabled else None
        self.run_start, self.run_start_step = time.perf_counter(), start_step
        self.skipped = 0  # updates dropped for a non-finite loss (run.on_nonfinite=skip), this session
        self._reset()

    def _reset(self) -> None:
        self.sums = dict.fromkeys(("loss", "ce", "lb", "z"), 0.0)
        self.count = 0  # steps whose losses enter the means (not the skipped ones)
        self.steps = 0  # all steps of the interval, for timing
        self.interval_start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training (validation, downstream scoring, checkpoint saves, the memory
        report): left out of the interval's step time, tokens/s and MFU, as Megatron's interval timer does."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.interval_start += time.perf_counter() - start

    def record(self, result: StepResult) -> None:
        self.steps += 1
        if result.skipped:
            self.skipped += 1
            return
        for key in self.sums:
            self.sums[key] += getattr(result, key)
        self.count += 1

    def log(self, step: int, lr: float, result: StepResult, routing: dict[str, float]) -> None:
        """Report the interval that ends with `step` (0-based). Collective: every rank calls it."""
        seconds = time.perf_counter() - self.interval_start
        mine = memory_gib()
        memory = dict(zip(mine, eng.max_over_ranks(list(mine.values()))))
        values = {k: v / self.count if self.count else float("nan") for k, v in self.sums.items()}
        step_time = seconds / max(self.steps, 1)
        tok_s = self.s.tokens_per_step / step_time
        values.update(lr=lr, grad_norm=result.grad_norm, step_time_s=step_time, tokens_per_s=tok_s,
                      mfu=self.flops_per_token * tok_s / self.s.world / self.peak, skipped_updates=self.skipped)
        self._reset()
        if not self.enabled:
            return
        done = step + 1 - self.run_start_step
        eta = (self.s.steps - step - 1) * (time.perf_counter() - self.run_start) / done
        self._print(step, values, memory, routing, eta)
        record = {"step": step + 1, **values, "grad_norm_parts": result.grad_norm_parts, "memory": memory,
                  "routing": routing}
        self.metrics.write(dumps(record) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in values.items():
                self._scalar(f"train/{key}", value, step)
            for key, value in (result.grad_norm_parts or {}).items():
                self._scalar(f"grad_norm/{key}", value, step)
            for key, value in memory.items():
                self._scalar(f"memory/{key}", value, step)
            for key, value in routing.items():
                self._scalar(f"routing/{key}", value, step)

    def _print(self, step: int, v: dict[str, Any], memory: dict[str, float], routing: dict[str, float],
               eta: float) -> None:
        agree = f"  tie-agree {routing['mean/tie_agreement']:.2f}" if "mean/tie_agreement" in routing else ""
        gnorm = f"  gnorm {v['grad_norm']:.3f}" if v["grad_norm"] is not None else ""
        mem = memory.get("peak_allocated_gib", memory.get("peak_rss_gib", 0.0))
        mfu = f"  mfu {100 * v['mfu']:.1f}%" if math.isfinite(v["mfu"]) else ""
        print(f"step {step + 1:>6}/{self.s.steps}  loss {v['loss']:.4f}  ce {v['ce']:.4f}  lb {v['lb']:.3f}  "
              f"z {v['z']:.2f}  lr {v['lr']:.2e}{gnorm}{agree}  {v['tokens_per_s']:,.0f} tok/s  "
              f"{1000 * v['step_time_s']:,.0f} ms/step{mfu}  peak mem {mem:.2f} GiB  eta {eta:,.0f}s", flush=True)

    def log_eval(self, step: int, val_ce: float | None) -> None:
        if not self.enabled or val_ce is None:
            return
        ppl = math.exp(val_ce) if val_ce < 700 else float("inf")
        print(f"step {step + 1:>6}/{self.s.steps}  val ce {val_ce:.4f}  ppl {ppl:,.2f}", flush=True)
        self.metrics.write(dumps({"step": step + 1, "val_ce": val_ce, "val_ppl": ppl}) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            self._scalar("val/ce", val_ce, step)
            self._scalar("val/ppl", ppl, step)

    def log_downstream(self, step: int, scores: dict[str, float] | None) -> None:
        if not self.enabled or scores is None:
            return
        text = "  ".join(f"{task} {score:.3f}" for task, score in scores.items())
        print(f"step {step + 1:>6}/{self.s.steps}  downstream (validation split, "
              f"{self.s.cfg.run.downstream_limit} docs/task): {text}", flush=True)
        self.metrics.write(dumps({"step": step + 1, "downstream": scores}) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for task, score in scores.items():
                self._scalar(f"downstream/{task}", score, step)

    def _scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step + 1)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def _metrics_from(path: Path, start_step: int) -> Any:
    """metrics.jsonl opened for appending, without its rows of steps after `start_step`: a run resumed
    from an older checkpoint (after a crash or a non-finite stop) trains those steps again and would
    log them twice. A line torn by a crash mid-write is dropped too."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if (step := _step_of(line)) is not None and step <= start_step]
        staged = path.with_name(path.name + ".tmp")  # replaced in one step: a crash here loses no row
        staged.write_text("".join(kept))
        os.replace(staged, path)
    return open(path, "a")


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None


def _tensorboard(path: Path, start_step: int) -> Any:
    """purge_step: TensorBoard hides events of steps after `start_step` written before (see `_metrics_from`)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(path), purge_step=start_step + 1)
