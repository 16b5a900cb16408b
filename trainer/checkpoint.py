"""Crash-safe checkpoints with exact resume.

Layout: `<run_dir>/checkpoints/<tag>/` holds DeepSpeed's model/optimizer shards plus one
`trainer_state_rank<R>.pt` per rank (step, data position, RNG states); `<run_dir>/checkpoints/latest`
names the newest COMPLETE tag. `latest` is replaced atomically (write temp, rename) only after every
rank has finished writing, so a crash mid-save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import ModelConfig

LATEST = "latest"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise ValueError(f"checkpoint {path}: names {tag!r}, but {ckpt_dir / tag} does not exist")
    return tag


def identity(cfg: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be resumable: the model and how it is laid out over ranks."""
    return {"model": cfg.model_config().to_dict(), "expert_parallel_size": cfg.parallel.expert_parallel_size,
            "data": {"source": cfg.data.source, "seq_len": cfg.data.seq_len}}


def save(engine: Any, ckpt_dir: Path, step: int, data_state: dict[str, Any], keep: int,
         ident: dict[str, Any] | None = None) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    state = {"step": step, "world_size": world, "data": data_state, "rng": _rng_state(), "identity": ident}
    tmp = ckpt_dir / tag / f".trainer_state_rank{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / tag / f"trainer_state_rank{rank}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()  # every rank's files are on disk before `latest` moves
    if rank == 0:
        tmp_latest = ckpt_dir / f".{LATEST}.tmp"
        tmp_latest.write_text(tag)
        os.replace(tmp_latest, ckpt_dir / LATEST)
        _prune(ckpt_dir, keep, current=tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep]:
        if old != current:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _saved_value(saved: dict[str, Any], section: str, key: str) -> Any:
    """A model field added after the checkpoint was written (e.g. `init`, `narrow_factor`) is absent from
    it; that run had the field's default behaviour, so the default is what it was written with."""
    values = saved.get(section, {})
    if section == "model" and key not in values:
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        return defaults.get(key)
    return values.get(key)


def check_identity(ckpt_dir: Path, tag: str, ident: dict[str, Any]) -> None:
    """Refuse, in one line, to resume a checkpoint written for another model or layout (before DeepSpeed
    would fail deep inside its loader)."""
    path = ckpt_dir / tag / "trainer_state_rank0.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint {ckpt_dir / tag}: missing {path.name}")
    saved = torch.load(path, weights_only=False).get("identity") or {}
    for section in ("model", "data"):
        for key, value in ident[section].items():
            was = _saved_value(saved, section, key)
            if was != value:
                raise ValueError(f"checkpoint {ckpt_dir / tag}: written with {section}.{key}={was!r}, this run "
                                 f"has {value!r}; use another run.name or run.resume=never")
    if saved.get("expert_parallel_size") != ident["expert_parallel_size"]:
        raise ValueError(f"checkpoint {ckpt_dir / tag}: written with parallel.expert_parallel_size="
                         f"{saved.get('expert_parallel_size')}, this run has {ident['expert_parallel_size']}")


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Collective. Restores model + optimizer (DeepSpeed) and this rank's RNG; returns its trainer state."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    state_path = ckpt_dir / tag / f"trainer_state_rank{rank}.pt"
    if not state_path.is_file():
        raise ValueError(f"checkpoint {ckpt_dir / tag}: missing {state_path.name} (was it written by "
                         f"{world} ranks?)")
    state = torch.load(state_path, weights_only=False)
    if state.get("world_size") != world:
        raise ValueError(f"checkpoint {state_path}: written by {state.get('world_size')} ranks, resuming with "
                         f"{world}; resume with the same world size")
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag}: DeepSpeed found no model states to load")
    _set_rng_state(state["rng"])
    return state
