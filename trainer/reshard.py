"""Continue a run on another layout: world size, expert-parallel size or ZeRO stage.

    python -m trainer.reshard RUN_DIR [--tag stepNNNNNNNN]

A DeepSpeed checkpoint can only be loaded by the layout that wrote it. This tool starts as many CPU
ranks as wrote the checkpoint, loads it, and writes `checkpoints/<tag>/layout_free.pt`: fp32 (master)
weights, Adam moments and step count as full tensors in the model's own naming (each tied bank once),
plus the trainer state (step, every rank's data position). The next start of the run on a different
layout (`./run.sh ... parallel.expert_parallel_size=1`, another `parallel.ds_config`, other ranks)
resumes from it: each rank takes its own slice. The data position is carried exactly when the world
size is unchanged, and for random tokens always; a shard or stream loader on another world size starts
a new pass over the data (its split into ranks changed). RNG states start from the seed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, run_lock
from trainer import engine as eng
from trainer.argtypes import OneLineParser
from trainer.config import TrainConfig, load_config, zero_stage
from trainer.data import make_source
from trainer.launch import spawn_cpu_ranks
from trainer.session import Session, train_step

LAYOUT_FREE = checkpoint.LAYOUT_FREE


def layout(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    return {"world_size": world_size, "expert_parallel_size": cfg.parallel.expert_parallel_size,
            "zero_stage": zero_stage(cfg)}


def read_layout_free(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line naming it
        raise ValueError(f"checkpoint {path}: unreadable ({type(err).__name__}); run python -m trainer.reshard "
                         f"again") from None


def resume_layout_free(s: Session, ckpt_dir: Path) -> int | None:
    """When the latest checkpoint has a layout-free copy written for another layout than this run's,
    load it (every rank takes its slice) and return the step to continue from; else None."""
    try:
        tag = checkpoint.latest_tag(ckpt_dir)
    except ValueError:  # empty or garbage `latest`: `checkpoint.resume_tag` falls back to an older tag and says so
        return None
    path = ckpt_dir / tag / LAYOUT_FREE if tag else None
    if path is None or not path.is_file():
        return None
    state = read_layout_free(path)
    if state["layout"] == layout(s.cfg, s.world):
        return None  # same layout: DeepSpeed's own checkpoint is exact (RNG states included)
    ident = checkpoint.identity(s.cfg, s.world)
    for section in ("model", "data"):
        if state["identity"][section] != ident[section]:
            raise ValueError(f"checkpoint {path}: written for another {section} than this run's; use another "
                             f"run.name or run.resume=never")
    checkpoint.check_seed(path, state["identity"], ident)
    note = checkpoint.check_batch(path, state["identity"], ident)  # tokens per step: the same on the new layout
    if s.cfg.optim.name != "adamw":  # `reshard` carries AdamW's moments only (it refuses other optimizers)
        raise ValueError(f"checkpoint {path}: holds AdamW state, this run has optim.name={s.cfg.optim.name!r}; "
                         f"resume with optim.name=adamw, or use another run.name or run.resume=never")
    train_step(s, 0.0)  # creates the optimizer state to overwrite; at lr 0 the weights do not move
    eng.scatter_training_state(s.engine, state)
    old_world = state["layout"]["world_size"]
    s.source = make_source(s.cfg, "train", s.rank, s.world)  # the lr-0 step drew a batch
    if old_world == s.world:
        s.source.load_state_dict(state["data"][s.rank])
    elif s.cfg.data.source == "random":
        s.source.load_state_dict({"index": state["data"][0]["index"]})
    elif s.rank == 0:
        print(f"note: world size {old_world} -> {s.world}: the data loader starts a new pass", flush=True)
    if s.rank == 0:
        if note:
            print(note, flush=True)
        print(f"resumed from {path} at step {state['step']} (layout {state['layout']} -> "
              f"{layout(s.cfg, s.world)})", flush=True)
    return state["step"]


def worker(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    eng.init_distributed()
    world = eng.world_size()
    cfg = load_config(run_dir / "config.yaml").for_world(world)
    engine, _ = eng.initialize(eng.build(cfg.model_config(), cfg), cfg)
    ckpt_dir = run_dir / "checkpoints"
    state = checkpoint.load(engine, ckpt_dir, args.tag, verify=False)
    training = eng.gather_training_state(engine)
    if eng.rank() == 0:
        data = [checkpoint.read_trainer_state(ckpt_dir / args.tag / f"trainer_state_rank{r}.pt")["data"]
                for r in range(world)]
        out = {**training, "step": state["step"], "data": data, "layout": layout(cfg, world),
               "identity": checkpoint.identity(cfg, world)}
        tmp = Path(args.out).with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(args.out)
    eng.shutdown()


def reshard(run_dir: str | Path, tag: str | None) -> Path:
    """Write `layout_free.pt` for the run's checkpoint `tag` (default: latest); returns its path."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"run directory {run_dir}: no config.yaml (is it a run directory?)")
    with run_lock.held(run_dir):  # a job training this run would save over the tag and move `latest` meanwhile
        return _convert(run_dir, tag)


def _convert(run_dir: Path, tag: str | None) -> Path:
    cfg = load_config(run_dir / "config.yaml")
    if cfg.optim.name != "adamw":
        raise ValueError(f"optim.name={cfg.optim.name!r}: resharding carries AdamW state only (Muon's "
                         f"momentum is not carried): resume the run on the layout that wrote it")
    ckpt_dir = run_dir / "checkpoints"
    if tag is not None and (not checkpoint.is_plain_name(tag) or not (ckpt_dir / tag).is_dir()):
        # '../x' would write layout_free.pt into another folder of the run
        raise ValueError(f"--tag {tag!r}: expected the name of a checkpoint folder under {ckpt_dir}, like "
                         f"{checkpoint.tag_for(0)}")
    try:
        latest = checkpoint.latest_tag(ckpt_dir)
    except ValueError:  # a damaged `latest` does not stop an explicit --tag
        if tag is None:
            raise
        latest = None
    tag = tag or latest
    if tag is None:
        raise ValueError(f"run directory {run_dir}: {checkpoint.without_latest(ckpt_dir)}; name one with --tag")
    checkpoint.verify_tag(ckpt_dir, tag)
    world = checkpoint.read_trainer_state(ckpt_dir / tag / "trainer_state_rank0.pt")["world_size"]
    out = ckpt_dir / tag / LAYOUT_FREE
    _check_writable(out)
    proc = spawn_cpu_ranks(["trainer.reshard", "--worker", str(run_dir), "--tag", tag, "--out", str(out)], world,
                           capture=True)
    if proc.returncode != 0 or not out.is_file():
        # the ranks' exception, as export names it: torchrun's 30-line summary alone hid it
        errors = re.findall(r"^\[rank\d+\]: (\w*(?:Error|Exception)\b.*)$", proc.stderr, re.M)
        sys.stderr.write("\n".join(proc.stderr.splitlines()[-30:]) + "\n")
        raise RuntimeError(f"reshard ranks failed (exit {proc.returncode}): "
                           f"{errors[0] if errors else 'see the log above'}")
    if latest is not None and tag != latest:  # a run resumes from `latest` only: an older tag's copy is never read
        print(f"note: {ckpt_dir / checkpoint.LATEST} names {latest}: the run resumes from that tag, not from {tag}; "
              f"to continue on another layout, convert {latest} (python -m trainer.reshard {run_dir})")
    return out


def _check_writable(out: Path) -> None:
    """The ranks' torch.save into an unwritable tag failed after they had gathered everything, as torchrun's
    30-line report ending in 'open file failed' without the file's name."""
    probe = out.with_name(f".{out.name}.probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write {out} ({err.strerror or err}): make {out.parent} writable") from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m trainer.reshard", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (runs/<name>)")
    parser.add_argument("--tag", help="checkpoint tag (default: the one `latest` names)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    try:
        out = reshard(args.run_dir, args.tag)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: start the run again on the new layout (same run.name) to continue from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
