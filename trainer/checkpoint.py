"""Crash-safe checkpoints with exact resume.

Layout: `<run_dir>/checkpoints/<tag>/` holds DeepSpeed's model/optimizer shards plus one
`trainer_state_rank<R>.pt` per rank (step, data position, RNG states); `<run_dir>/checkpoints/latest`
names the newest COMPLETE tag. `latest` is replaced atomically (write temp, rename) only after every
rank has finished writing, so a crash mid-save leaves the previous checkpoint as latest.

Integrity: before `latest` moves, `<tag>/manifest.json` records the relative path, size and sha256 of
every file of the tag and the world size (each rank hashes a share of the files; rank 0 merges).
`verify_tag` checks a tag against it before DeepSpeed opens anything, so a truncated shard, a garbage
trainer state or a missing rank file is one line naming the file instead of an unpickling or gloo
traceback; `resume_tag` picks the newest tag that verifies. Verification reads every byte of the tag
once (sha256: 1.4 GB/s on one core of the CPU machine this was measured on), on each rank that runs it.
Tags written before manifests existed still load: their rank files are checked for presence and
readability, DeepSpeed's shards only for a zip directory that opens (a truncated shard is caught, a byte
flipped inside one is not).

Trainer states hold only tensors and plain types (RNG states included) and are read with
`torch.load(weights_only=True)`, so a crafted file cannot run code.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from models.config import ModelConfig
from trainer import engine as eng
from trainer.config import zero_stage

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tiedmoe-checkpoint-manifest/1"
_TAG = re.compile(r"step\d{8}")
_STATE_KEYS = ("step", "world_size", "data", "rng")


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain types, so `weights_only` loading restores it exactly."""
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gauss)},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:  # written before RNG states were plain types: numpy's own tuple
        np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_tags(ckpt_dir: Path) -> list[str]:
    """The tags the trainer writes (`tag_for`), oldest first: only these are resumed, pruned or rolled back
    (a user's folder such as `step_best_copy` is not ours); none when there is no `ckpt_dir` yet."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.fullmatch(p.name))


def point_latest(ckpt_dir: Path, tag: str) -> None:
    """Make `latest` name `tag` in one atomic rename: a crash leaves the old name or the new, never neither."""
    staged = ckpt_dir / f".{LATEST}.tmp"
    staged.write_text(tag)
    os.replace(staged, ckpt_dir / LATEST)


def aside_dir(run_dir: Path) -> Path:
    """A new `replaced-<time>` folder name under `run_dir` (not created) for what a restart or rollback sets aside."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = run_dir / f"replaced-{stamp}", 1
    while aside.exists():  # two within one second
        suffix += 1
        aside = run_dir / f"replaced-{stamp}-{suffix}"
    return aside


def is_plain_name(tag: str) -> bool:
    """A single folder name: no separator and not '.' or '..' (a tag names folders under the run, and
    `../x` would reach outside them)."""
    return bool(tag) and tag not in (".", "..") and "/" not in tag and os.sep not in tag


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is no `latest` (a fresh run). Names only; whether the
    tag's files are intact is `verify_tag`'s question."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {path}: unreadable ({err})") from None
    if not tag:
        raise ValueError(f"checkpoint {path}: is empty, expected a tag like {tag_for(0)}")
    if not _TAG.fullmatch(tag):
        raise ValueError(f"checkpoint {path}: names {tag[:40]!r}, expected a tag like {tag_for(0)}")
    if not (ckpt_dir / tag).is_dir():
        raise ValueError(f"checkpoint {path}: names {tag!r}, but {ckpt_dir / tag} does not exist")
    return tag


# --- integrity -------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tag_files(tag_dir: Path) -> list[Path]:
    """Every file of a tag except the manifest itself and hidden temporaries of an interrupted write."""
    return sorted(p for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def _file_entry(tag_dir: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(tag_dir).as_posix(), "size": path.stat().st_size, "sha256": _sha256(path)}


def _part_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f".{MANIFEST}.part{rank}"


def hash_share(tag_dir: Path, rank: int, world_size: int) -> None:
    """Checksum every world_size-th file of a finished tag into a hidden part file, so the ranks hash a
    large checkpoint in parallel instead of rank 0 reading every byte alone."""
    entries = [_file_entry(tag_dir, path) for path in _tag_files(tag_dir)[rank::world_size]]
    tmp = tag_dir / f".{MANIFEST}.part{rank}.tmp"
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, _part_path(tag_dir, rank))


def write_manifest(tag_dir: Path, step: int, world_size: int) -> None:
    """Merge the ranks' part files into manifest.json (hashing here any file no part covers, or whose
    size changed since); written atomically, after all ranks wrote. Removes the parts."""
    parts = sorted(tag_dir.glob(f".{MANIFEST}.part*[0-9]"))
    hashed = {entry["path"]: entry for part in parts for entry in json.loads(part.read_text())}
    files = []
    for path in _tag_files(tag_dir):
        entry = hashed.get(path.relative_to(tag_dir).as_posix())
        files.append(entry if entry and entry["size"] == path.stat().st_size else _file_entry(tag_dir, path))
    manifest = {"format": MANIFEST_FORMAT, "tag": tag_dir.name, "step": step, "world_size": world_size,
                "files": files}
    tmp = tag_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, tag_dir / MANIFEST)
    for part in parts:
        part.unlink()


def fingerprint(ckpt_dir: Path, tag: str) -> str | None:
    """sha256 of `<tag>/manifest.json`: it lists every file's sha256 and is rewritten by each save, so it
    tells a tag rewritten after a rollback or `run.resume=never` from the one an export or result came
    from (the tag name alone does not). None for a tag without a manifest (nothing cheap to compare)."""
    path = Path(ckpt_dir) / tag / MANIFEST
    return _sha256(path) if path.is_file() else None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path}: unreadable manifest ({type(err).__name__})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), list) or not isinstance(manifest.get("world_size"), int)):
        raise ValueError(f"checkpoint {path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def _check_listed_file(tag_dir: Path, entry: Any) -> None:
    if (not isinstance(entry, dict) or not {"path", "size", "sha256"} <= set(entry)
            or Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts):
        raise ValueError(f"checkpoint {tag_dir / MANIFEST}: malformed entry {str(entry)[:80]}")
    path = tag_dir / entry["path"]
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != entry["size"]:
        raise ValueError(f"checkpoint {path}: {size} bytes, {MANIFEST} says {entry['size']} (truncated or "
                         f"overwritten)")
    if _sha256(path) != entry["sha256"]:
        raise ValueError(f"checkpoint {path}: sha256 differs from {MANIFEST} (corrupted)")


@contextmanager
def _legacy_numpy_globals() -> Iterator[None]:
    """Allow numpy arrays (not arbitrary callables) in `weights_only` loads: trainer states written before
    RNG states were stored as tensors hold numpy's RNG tuple."""
    with torch.serialization.safe_globals([np.ndarray, np.dtype, np._core.multiarray._reconstruct,
                                           type(np.dtype(np.uint32))]):
        yield


def read_trainer_state(path: Path) -> dict[str, Any]:
    """One rank's trainer state, loaded without running code; a damaged file is one line naming it."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: missing")
    try:
        with _legacy_numpy_globals():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for damaged files
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        reason = reason if len(reason) <= 120 else reason[:120].rsplit(" ", 1)[0] + " ..."  # whole words
        raise ValueError(f"checkpoint {path}: not a readable trainer state ({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: not a trainer state (holds a {type(state).__name__}, not a dict)")
    return state


def _check_torch_archive(path: Path) -> None:
    """A file of `torch.save` whose zip directory does not open (truncated: the directory is at the end;
    overwritten) is one line naming it, not a `PytorchStreamReader` traceback on a rank. Reads the
    directory only: for tags without a manifest, which is all there is to check their DeepSpeed shards
    against; bytes damaged in the middle are the manifest's sha256 to find."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic.startswith(b"\x80"):  # torch's pre-zip (pickle) format: nothing cheap to check
            return
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
        raise ValueError(f"checkpoint {path}: not a readable torch file ({type(err).__name__}: {err}; truncated "
                         f"or overwritten?), expected the zip archive torch.save writes") from None


def verify_tag(ckpt_dir: Path, tag: str, world_size: int | None = None) -> None:
    """Raise ValueError (one line naming the file) unless the tag is complete and intact for `world_size`
    ranks (default: as many as wrote it). Reads every byte of the tag once; touches nothing."""
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise ValueError(f"checkpoint {tag_dir}: does not exist")
    if (tag_dir / MANIFEST).is_file():
        manifest = _read_manifest(tag_dir / MANIFEST)
        for entry in manifest["files"]:
            _check_listed_file(tag_dir, entry)
        written_by = manifest["world_size"]
    else:  # written before manifests: the rank files are read, the other files' zip directories opened
        written_by = read_trainer_state(tag_dir / "trainer_state_rank0.pt").get("world_size")
        if not isinstance(written_by, int) or written_by < 1:
            raise ValueError(f"checkpoint {tag_dir / 'trainer_state_rank0.pt'}: no world_size recorded")
        for path in _tag_files(tag_dir):
            if path.suffix == ".pt" and not path.name.startswith("trainer_state_rank"):
                _check_torch_archive(path)
    world = world_size or written_by
    if written_by != world:
        saved = read_trainer_state(tag_dir / "trainer_state_rank0.pt").get("identity") or {}
        raise ValueError(_other_world(tag_dir, written_by, world, saved.get("optim_name")))
    for rank in range(world):
        path = tag_dir / f"trainer_state_rank{rank}.pt"
        if not path.is_file():
            raise ValueError(f"checkpoint {path}: missing (a checkpoint of {world} ranks has one per rank)")
        missing = [key for key in _STATE_KEYS if key not in read_trainer_state(path)]
        if missing:
            raise ValueError(f"checkpoint {path}: not a complete trainer state (no {missing[0]!r})")


def _other_world(tag_dir: Path, written_by: Any, world: int, optim_name: str | None) -> str:
    return (f"checkpoint {tag_dir}: written by {written_by} ranks, this run has {world}; "
            f"{reshard_hint(tag_dir.parent, optim_name)}")


class ResumePoint(NamedTuple):
    tag: str | None  # the tag to resume from; None: start fresh (no `latest` yet)
    skipped: str | None  # one line saying which newer tag was skipped and why, when the fallback was used


def _complete_tags(ckpt_dir: Path, before: str | None) -> list[str]:
    """Tags with a manifest (so every rank finished them), newest first, older than `before` if given."""
    tags = [t for t in step_tags(ckpt_dir) if (ckpt_dir / t / MANIFEST).is_file()]
    return sorted((t for t in tags if before is None or t < before), reverse=True)


def resume_tag(ckpt_dir: Path, world_size: int) -> ResumePoint:
    """Where `run.resume=auto` continues: the tag `latest` names if it verifies, else the newest older
    complete tag that does (`skipped` says so). No `latest` is a fresh start only when no tag is complete
    (a fresh run, or a kill inside the first save, before its manifest): `save` writes a tag's manifest
    before it points `latest` at it, so a kill in between (or a deleted `latest`) leaves complete tags and
    no `latest`, and starting over would rewrite them and metrics.jsonl in place; the newest complete tag
    that verifies is taken instead, as for a garbage `latest`. A tag without a manifest is never a
    fallback: it may be a save that did not finish. Raises the latest's problem when nothing verifies,
    rather than starting over on top of a run that has checkpoints. Every rank gets the same answer."""
    if not (ckpt_dir / LATEST).is_file():
        tags = _complete_tags(ckpt_dir, None)[::-1]
        if not tags:
            return ResumePoint(None, None)  # a fresh run, or a first save that did not finish
        tag, problem = None, (f"checkpoint {ckpt_dir / LATEST}: missing, but {ckpt_dir} holds {_span(tags)} with a "
                              f"manifest (a save stopped before it named its tag, or {LATEST} was deleted)")
    else:
        try:
            tag = latest_tag(ckpt_dir)
        except ValueError as err:  # empty, garbage or dangling `latest`: any complete tag may do
            tag, problem = None, str(err)
        else:
            try:
                verify_tag(ckpt_dir, tag, world_size)
                return ResumePoint(tag, None)
            except ValueError as err:
                problem = str(err)
    newest_failure = None
    for candidate in _complete_tags(ckpt_dir, before=tag):
        try:
            verify_tag(ckpt_dir, candidate, world_size)
        except ValueError as err:
            newest_failure = newest_failure or str(err)
            continue
        return ResumePoint(candidate, f"skipped {tag or LATEST}: {problem}; resuming from {candidate}")
    if tag is None and newest_failure:  # no tag of `latest`'s to blame: say why the newest complete one failed
        problem = f"{problem}; {newest_failure}"
    which = "older complete checkpoint" if tag else f"complete checkpoint (a tag with {MANIFEST})"
    # older than the tag `latest` names (without it, a tag lacking a manifest may be the save that was cut)
    unlisted = [t for t in step_tags(ckpt_dir) if tag is not None and t < tag and not (ckpt_dir / t / MANIFEST).is_file()]
    keep = (f"; {unlisted[-1]} has no {MANIFEST} (written before manifests, or a save that did not finish), so it "
            f"is not taken on its own: `python -m trainer.rollback {ckpt_dir.parent} --tag {unlisted[-1]}` continues "
            f"from it if it is complete and of this layout" if unlisted else "")
    raise ValueError(f"{problem}; no {which} verifies either{keep} (run.resume=never or another run.name starts "
                     f"over)")


def without_latest(ckpt_dir: Path) -> str:
    """Why a tool given no tag has none to take (`latest` is missing), naming the tags there are: a run whose
    `latest` was lost still has them (the trainer resumes from the newest that verifies)."""
    tags = step_tags(ckpt_dir)
    if not tags:
        return f"no {ckpt_dir / LATEST} (no complete checkpoint yet)"
    return f"no {ckpt_dir / LATEST}, though {ckpt_dir} holds {_span(tags)}"


def _span(tags: list[str]) -> str:
    return tags[0] if len(tags) == 1 else f"{len(tags)} tags ({tags[0]} to {tags[-1]})"


def choose_resume(ckpt_dir: Path, world_size: int, ident: dict[str, Any]) -> ResumePoint:
    """Everything that can refuse a resume, decided while nothing is written yet: `resume_tag` plus
    `check_identity` of the tag it picks. Call it before the run directory is touched (config.yaml,
    ds_config.json, metrics.jsonl), so a refused resume leaves it byte-identical; then
    `load(..., verify=False)` the tag."""
    point = resume_tag(ckpt_dir, world_size)
    if point.tag is not None:
        check_identity(ckpt_dir, point.tag, ident)
    return point


def precheck_resume(ckpt_dir: Path, world_size: int, ident: dict[str, Any]) -> None:
    """For the launcher: refuse before any rank starts a resume the ranks would refuse for its world
    size, model, layout, optimizer, batch or seed (`check_identity`), judged on the tag `latest` names (without
    `latest`, the newest complete tag).

    Only a look at one small file: the ranks still verify the tag and may fall back to an older one
    (`choose_resume`, which decides). A damaged `latest` or trainer state, or a tag converted for
    another layout (`layout_free.pt`, `trainer.reshard`), is left to them."""
    try:
        tag = latest_tag(ckpt_dir)
        if tag is None:  # no `latest`: the ranks take the newest complete tag (`resume_tag`)
            tag = next(iter(_complete_tags(ckpt_dir, None)), None)
        state = read_trainer_state(ckpt_dir / tag / "trainer_state_rank0.pt") if tag else None
    except ValueError:
        return
    if state is None or (ckpt_dir / tag / LAYOUT_FREE).is_file():
        return
    if isinstance(state.get("world_size"), int) and state["world_size"] != world_size:
        raise ValueError(_other_world(ckpt_dir / tag, state["world_size"], world_size,
                                      (state.get("identity") or {}).get("optim_name")))
    check_saved_identity(ckpt_dir / tag, state.get("identity") or {}, ident)


LAYOUT_FREE = "layout_free.pt"  # a tag converted for another layout by `trainer.reshard`

# A checkpoint loads only on the layout that wrote it; this says how to continue on another one.
RESHARD_HINT = "resume with the same layout, or convert it first with `python -m trainer.reshard {run_dir}`"


def reshard_hint(ckpt_dir: Path, optim_name: str | None) -> str:
    """What to do about a checkpoint of another layout. `trainer.reshard` carries AdamW state only: to a Muon
    or SGD run the hint to convert led straight to reshard's refusal."""
    if optim_name in (None, "adamw"):  # None: written before the optimizer was recorded (AdamW only then)
        return RESHARD_HINT.format(run_dir=ckpt_dir.parent)
    return (f"resume with the same layout (it was written with optim.name={optim_name!r}; `python -m "
            f"trainer.reshard` converts AdamW checkpoints only)")


def identity(cfg: Any, world_size: int | None = None) -> dict[str, Any]:
    """What must match for a checkpoint to be resumable: the model, how it is laid out over ranks, and the
    optimizer and precision whose state DeepSpeed restores (its files and param groups differ by both).
    With `world_size` (and `cfg` resolved for it, `TrainConfig.for_world`) also the batch, which gives a
    step, the data position and the LR schedule their meaning in tokens (`check_batch`), and run.seed,
    which orders the data (a resume continues the checkpoint's order); a resume checks them, an export
    has no use for them."""
    ident = {"model": cfg.model_config().to_dict(), "expert_parallel_size": cfg.parallel.expert_parallel_size,
             "zero_stage": zero_stage(cfg), "data": {"source": cfg.data.source, "seq_len": cfg.data.seq_len},
             "optim_name": cfg.optim.name, "precision": cfg.run.precision}
    if world_size is not None:
        ident["batch"] = {"micro_batch_size": cfg.batch.micro_batch_size, "grad_accum": cfg.batch.grad_accum,
                          "world_size": world_size, "seq_len": cfg.data.seq_len, "eval_batches": cfg.run.eval_batches}
        ident["seed"] = cfg.run.seed
    return ident


_BATCH_FIELDS = (("micro_batch_size", "batch.micro_batch_size"), ("grad_accum", "batch.grad_accum"),
                 ("world_size", "world size"), ("seq_len", "data.seq_len"))


def _tokens_per_step(batch: dict[str, int]) -> int:
    return batch["micro_batch_size"] * batch["grad_accum"] * batch["world_size"] * batch["seq_len"]


def check_batch(where: Path, saved: dict[str, Any], ident: dict[str, Any]) -> str | None:
    """Refuse a resume whose optimizer step holds other tokens than the checkpoint's; returns a note for
    a change that keeps them (None: nothing changed, or the checkpoint predates batch records).

    The step count, `run.tokens` (converted to steps) and the LR schedule (a function of the step) all
    count optimizer steps; a step of other tokens would silently make step N, and the data position
    saved with it, mean something else. The same tokens in other micro-batches are a step of the same
    sequences: the loaders count their position in sequences (shards) or tokens (stream), not in
    micro-batches, and DeepSpeed averages the micro-batches' gradients, so only rounding and the
    load-balancing loss (taken per micro-batch, like every MoE trainer's) differ. Random tokens count
    micro-batches, so there the micro-batch size must stay.
    """
    was, now = saved.get("batch"), ident.get("batch")
    if not isinstance(was, dict) or now is None or not all(isinstance(was.get(k), int) for k, _ in _BATCH_FIELDS):
        return None
    changed = [f"{name} {was[key]} -> {now[key]}" for key, name in _BATCH_FIELDS if was[key] != now[key]]
    if not changed:
        return None
    old_tokens, new_tokens = _tokens_per_step(was), _tokens_per_step(now)
    start_over = "or start over with run.resume=never or another run.name"
    if old_tokens != new_tokens:
        raise ValueError(f"checkpoint {where}: written with {old_tokens:,} tokens per optimizer step, this run has "
                         f"{new_tokens:,} ({', '.join(changed)}): its step count, data position and LR schedule "
                         f"would mean other tokens; resume with the batch it was written with "
                         f"(batch.global_batch_tokens={old_tokens} keeps it when the world size changes), {start_over}")
    if ident["data"]["source"] == "random" and was["micro_batch_size"] != now["micro_batch_size"]:
        raise ValueError(f"checkpoint {where}: written with batch.micro_batch_size={was['micro_batch_size']}, this "
                         f"run has {now['micro_batch_size']}; data.source=random counts its position in "
                         f"micro-batches, so it cannot continue exactly: resume with "
                         f"batch.micro_batch_size={was['micro_batch_size']}, {start_over}")
    same = f"note: resuming with {', '.join(changed)}: the same {new_tokens:,} tokens per optimizer step"
    if was["world_size"] != now["world_size"]:  # a layout-free resume: its data position is trainer.reshard's to say
        return same
    return (f"{same}; losses agree with an unchanged run up to rounding and the load-balancing loss, which is "
            f"taken per micro-batch{_validation_note(was, now)}")


def _validation_note(was: dict[str, Any], now: dict[str, Any]) -> str:
    """Validation reads `run.eval_batches` micro-batches per rank: a new micro-batch size changes which
    sequences `val_ce` is measured on, unless eval_batches makes up for it."""
    if not isinstance(was.get("eval_batches"), int):
        return ""
    before, after = was["micro_batch_size"] * was["eval_batches"], now["micro_batch_size"] * now["eval_batches"]
    if before == after:
        return ""
    keep = (f" (run.eval_batches={before // now['micro_batch_size']} keeps them)"
            if before % now["micro_batch_size"] == 0 else "")
    return (f"; validation now reads {after} sequences per rank, not {before} (run.eval_batches x "
            f"batch.micro_batch_size), so val_ce is measured on other sequences{keep}")


def save(engine: Any, ckpt_dir: Path, step: int, data_state: dict[str, Any], keep: int,
         ident: dict[str, Any] | None = None) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    rank, world = eng.rank(), eng.world_size()
    tag = tag_for(step)
    try:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        if rank == 0:  # a tag rewritten (after a fallback) is incomplete again until its new manifest
            for stale in [ckpt_dir / tag / MANIFEST, *(ckpt_dir / tag).glob(f".{MANIFEST}.part*")]:
                stale.unlink(missing_ok=True)
        state = {"step": step, "world_size": world, "data": data_state, "rng": _rng_state(), "identity": ident}
        tmp = ckpt_dir / tag / f".trainer_state_rank{rank}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, ckpt_dir / tag / f"trainer_state_rank{rank}.pt")
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        eng.barrier()  # every rank's files are on disk
        hash_share(ckpt_dir / tag, rank, world)
        eng.barrier()  # ... and hashed, before the manifest is written and `latest` moves
        if rank == 0:
            write_manifest(ckpt_dir / tag, step, world)
            point_latest(ckpt_dir, tag)
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "inline_container" not in str(err):  # not torch.save's file writer
            raise
        raise CheckpointNotWritten(_not_written(ckpt_dir, tag, err)) from None
    if rank == 0:
        _prune(ckpt_dir, keep, current=tag)  # after `latest` moved: the save succeeded whatever pruning meets
    eng.barrier()
    return tag


class CheckpointNotWritten(ValueError):
    """A full disk or an unwritable run directory while saving: one line (exit 2), the previous tag in force."""


def _not_written(ckpt_dir: Path, tag: str, err: OSError | RuntimeError) -> str:
    """Why a save failed, in words: torch.save's writer reports a full disk as 'unexpected pos' (RuntimeError)."""
    if isinstance(err, OSError):
        why = os_error_text(err)
    else:
        free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.is_dir() else 0
        why = (f"no space left on device ({free / 2**20:.0f} MiB free)" if free < 2**30 else
               f"torch.save failed: {str(err).splitlines()[0][:200]}")
    return (f"cannot write checkpoint {ckpt_dir / tag} ({why}); {latest_note(ckpt_dir)}: free space or make run.out_dir writable, then "
            f"run the same command again to resume")


def os_error_text(err: OSError) -> str:
    """An OSError in words with the file it met ('Permission denied: /runs/x/checkpoints/latest'), for the
    one-line errors of the tools that change a checkpoint folder."""
    return f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}"


def latest_note(ckpt_dir: Path) -> str:
    """What a restart would resume from, for messages of a run that stopped without saving."""
    try:
        tag = latest_tag(ckpt_dir)
    except ValueError:
        tag = None
    return f"{tag} is still the latest checkpoint" if tag else "no checkpoint was saved yet"


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Delete the trainer's tags older than the newest `keep`, except one a reader holds (`reading`): an export
    or evaluation of it in another shell would lose its files half-read. A kept tag goes at a later save."""
    if keep <= 0:
        return
    tags = step_tags(ckpt_dir)  # only the trainer's own tags
    for old in tags[:-keep]:
        if old == current:
            continue
        try:
            fd = os.open(ckpt_dir / old, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"note: checkpoint {ckpt_dir / old} is being read (trainer.export / trainer.evaluate): "
                      f"kept until a later save", flush=True)
                continue
            except OSError:
                pass  # a filesystem without flock on directories: prune as before
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def reading(ckpt_dir: Path, tag: str) -> Iterator[None]:
    """Keep a running job's `_prune` off `ckpt_dir/tag` while a tool reads it (a shared flock on the folder;
    the kernel drops it when the reader ends, however it ends). A tag already gone is left to the caller's
    checks; a filesystem without flock on directories reads unprotected, as before."""
    try:
        fd = os.open(ckpt_dir / tag, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _saved_value(saved: dict[str, Any], section: str, key: str) -> Any:
    """A model field added after the checkpoint was written (e.g. `init`, `narrow_factor`) is absent from
    it; that run had the field's default behaviour, so the default is what it was written with."""
    values = saved.get(section, {})
    if section == "model" and key not in values:
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        return defaults.get(key)
    return values.get(key)


def check_seed(where: Path, saved: dict[str, Any], ident: dict[str, Any]) -> None:
    """Refuse another run.seed than the checkpoint's (absent on either side: nothing to compare). Why: the
    shard loader took the checkpoint's seed silently, the stream loader refused it inside the ranks and
    random tokens followed the new one, so a seed change on resume had three meanings."""
    if "seed" in saved and "seed" in ident and saved["seed"] != ident["seed"]:
        raise ValueError(f"checkpoint {where}: written with run.seed={saved['seed']}, this run has {ident['seed']}; "
                         f"a resumed run continues the checkpoint's data order, so resume with "
                         f"run.seed={saved['seed']}, or use another run.name or run.resume=never")


def check_identity(ckpt_dir: Path, tag: str, ident: dict[str, Any],
                   hint: str = "use another run.name or run.resume=never") -> str | None:
    """Refuse, in one line, to resume a checkpoint written for another model, layout or batch (before
    DeepSpeed would fail deep inside its loader, or the run went on with steps of other tokens). `hint`
    ends a model / data mismatch: what the caller can do. Returns `check_batch`'s note, if any."""
    saved = read_trainer_state(ckpt_dir / tag / "trainer_state_rank0.pt").get("identity") or {}
    return check_saved_identity(ckpt_dir / tag, saved, ident, hint)


def check_saved_identity(where: Path, saved: dict[str, Any], ident: dict[str, Any],
                         hint: str = "use another run.name or run.resume=never") -> str | None:
    """`check_identity` of an identity already read from `where` (a tag folder)."""
    for section in ("model", "data"):
        for key, value in ident[section].items():
            was = _saved_value(saved, section, key)
            if was != value:
                raise ValueError(f"checkpoint {where}: written with {section}.{key}={was!r}, this run "
                                 f"has {value!r}; {hint}")
    for key, field in (("expert_parallel_size", "parallel.expert_parallel_size"), ("zero_stage", "the ZeRO stage")):
        if key in saved and saved[key] != ident[key]:
            raise ValueError(f"checkpoint {where}: written with {field}={saved[key]}, this run has "
                             f"{ident[key]}; {reshard_hint(where.parent, saved.get('optim_name'))}")
    check_seed(where, saved, ident)
    for key, field in (("optim_name", "optim.name"), ("precision", "run.precision")):  # absent: written before
        if key in saved and saved[key] != ident[key]:
            raise ValueError(f"checkpoint {where}: written with {field}={saved[key]!r}, this run has "
                             f"{ident[key]!r}; resume with {field}={saved[key]}, or use another run.name or "
                             f"run.resume=never")
    return check_batch(where, saved, ident)


def load(engine: Any, ckpt_dir: Path, tag: str, verify: bool = True) -> dict[str, Any]:
    """Collective. Restores model + optimizer (DeepSpeed) and this rank's RNG; returns its trainer state.

    `verify` checks the tag first (`verify_tag`, every rank reads it all); pass False when `resume_tag`
    already verified it in this process.
    """
    rank, world = eng.rank(), eng.world_size()
    if verify:
        verify_tag(ckpt_dir, tag, world)
    state_path = ckpt_dir / tag / f"trainer_state_rank{rank}.pt"
    if not state_path.is_file():
        raise ValueError(f"checkpoint {ckpt_dir / tag}: missing {state_path.name} (was it written by "
                         f"{world} ranks?)")
    state = read_trainer_state(state_path)
    if state.get("world_size") != world:
        raise ValueError(f"checkpoint {state_path}: written by {state.get('world_size')} ranks, resuming with "
                         f"{world}; resume with the same world size")
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag}: DeepSpeed found no model states to load")
    _set_rng_state(state["rng"])
    return state
