"""Checkpoint integrity (issue 16): every tag carries a manifest of sizes and sha256; a truncated shard,
a garbage or truncated trainer state, an empty `latest` or a missing rank file is one line naming the
file; `resume_tag` falls back to the newest older tag that verifies and says what it skipped; trainer
states round-trip through `torch.load(weights_only=True)`.

One real 2-rank run (ZeRO-3, EP 2, random tokens, ~20 s) writes step 2 and step 4; each case corrupts a
copy of it. The rest is pure Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.config import REPO_ROOT

SHARD = "zero_pp_rank_1_mp_rank_00_model_states.pt"
RUN_ARGS = ["data.source=random", "run.steps=4", "run.save_every=2", "run.keep_checkpoints=0", "run.name=c",
            "data.seq_len=16", "batch.micro_batch_size=2", "run.log_every=1000", "run.eval_batches=1"]


def _run_sh(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "run.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run's directory (checkpoints step00000002 and step00000004, `latest` = step 4)."""
    out = tmp_path_factory.mktemp("integrity")
    proc = _run_sh([*RUN_ARGS, f"run.out_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out / "c"


@pytest.fixture
def ckpt(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the run's checkpoints directory to corrupt."""
    return Path(shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints"))


def one_line(fn, *names: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in names), message
    return message


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.distributed
def test_every_tag_has_a_manifest_of_its_files(trained: Path) -> None:
    ckpt = trained / "checkpoints"
    for tag in ("step00000002", "step00000004"):
        manifest = json.loads((ckpt / tag / checkpoint.MANIFEST).read_text())
        assert manifest["world_size"] == 2 and manifest["tag"] == tag
        listed = {entry["path"]: entry for entry in manifest["files"]}
        on_disk = {p.name for p in (ckpt / tag).iterdir()} - {checkpoint.MANIFEST}
        assert set(listed) == on_disk and {"trainer_state_rank0.pt", "trainer_state_rank1.pt", SHARD} <= on_disk
        entry = listed[SHARD]
        assert entry["size"] == (ckpt / tag / SHARD).stat().st_size
        assert entry["sha256"] == hashlib.sha256((ckpt / tag / SHARD).read_bytes()).hexdigest()
        checkpoint.verify_tag(ckpt, tag, 2)
    assert checkpoint.resume_tag(ckpt, 2) == ("step00000004", None)


@pytest.mark.distributed
@pytest.mark.parametrize("shard", [SHARD, "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_truncated_shard_is_named_and_the_previous_tag_is_used(ckpt: Path, shard: str) -> None:
    _truncate(ckpt / "step00000004" / shard)
    message = one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 2), str(ckpt / "step00000004" / shard),
                       "truncated")
    tag, skipped = checkpoint.resume_tag(ckpt, 2)
    assert tag == "step00000002"
    assert skipped == f"skipped step00000004: {message}; resuming from step00000002"


@pytest.mark.distributed
@pytest.mark.parametrize("damage, says", [("garbage", "sha256 differs"), ("truncate", "truncated")])
def test_damaged_trainer_state_is_named(ckpt: Path, damage: str, says: str) -> None:
    path = ckpt / "step00000004" / "trainer_state_rank0.pt"
    if damage == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        _truncate(path)
    one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 2), str(path), says)
    assert checkpoint.resume_tag(ckpt, 2).tag == "step00000002"
    # without a manifest (a checkpoint from before manifests) the file itself is found unreadable
    (ckpt / "step00000004" / checkpoint.MANIFEST).unlink()
    one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 2), str(path), "not a readable trainer state")
    one_line(lambda: checkpoint.check_identity(ckpt, "step00000004", {}), str(path), "not a readable trainer state")


@pytest.mark.distributed
def test_missing_rank_file_is_named(ckpt: Path) -> None:
    path = ckpt / "step00000004" / "trainer_state_rank1.pt"
    path.unlink()
    one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 2), str(path), "missing")
    assert checkpoint.resume_tag(ckpt, 2).tag == "step00000002"
    (ckpt / "step00000004" / checkpoint.MANIFEST).unlink()
    one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 2), str(path), "missing", "2 ranks")


@pytest.mark.distributed
def test_other_world_size_is_refused_by_name(ckpt: Path) -> None:
    one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 4), str(ckpt / "step00000004"),
             "written by 2 ranks, this run has 4")


@pytest.mark.distributed
@pytest.mark.parametrize("content, says", [("", "is empty"), ("\n", "is empty"), ("\x00\x01garbage", "names"),
                                           ("../../etc", "names"), ("step00000009", "does not exist")])
def test_empty_or_garbage_latest_falls_back_to_the_newest_complete_tag(ckpt: Path, content: str, says: str) -> None:
    (ckpt / checkpoint.LATEST).write_text(content)
    message = one_line(lambda: checkpoint.latest_tag(ckpt), str(ckpt / checkpoint.LATEST), says)
    assert checkpoint.resume_tag(ckpt, 2) == ("step00000004", f"skipped latest: {message}; resuming from step00000004")


@pytest.mark.distributed
def test_garbage_manifest_is_named(ckpt: Path) -> None:
    (ckpt / "step00000004" / checkpoint.MANIFEST).write_text("{not json")
    one_line(lambda: checkpoint.verify_tag(ckpt, "step00000004", 2), str(ckpt / "step00000004" / checkpoint.MANIFEST))
    assert checkpoint.resume_tag(ckpt, 2).tag == "step00000002"


@pytest.mark.distributed
def test_nothing_valid_is_one_line_naming_the_latest_problem(ckpt: Path) -> None:
    for tag in ("step00000002", "step00000004"):
        _truncate(ckpt / tag / SHARD)
    one_line(lambda: checkpoint.resume_tag(ckpt, 2), str(ckpt / "step00000004" / SHARD),
             "no older complete checkpoint verifies")


@pytest.mark.distributed
def test_a_tag_without_manifest_is_not_a_fallback(ckpt: Path) -> None:
    """Tags newer than `latest` or unfinished (no manifest) are never resumed by the fallback."""
    _truncate(ckpt / "step00000004" / SHARD)
    (ckpt / "step00000002" / checkpoint.MANIFEST).unlink()
    one_line(lambda: checkpoint.resume_tag(ckpt, 2), str(ckpt / "step00000004" / SHARD),
             # the refusal offered only starting over, though step 2 may be whole (a run from before manifests)
             f"python -m trainer.rollback {ckpt.parent} --tag step00000002` continues from it if it is complete")


@pytest.fixture(scope="module")
def refused(trained: Path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, dict, Path]:
    """Run again asking for 6 steps while both checkpoints are damaged: the resume must be refused."""
    out = tmp_path_factory.mktemp("refused")
    run_dir = Path(shutil.copytree(trained, out / "c"))
    for tag in ("step00000002", "step00000004"):
        _truncate(run_dir / "checkpoints" / tag / SHARD)
    before = _snapshot(run_dir)
    proc = _run_sh([*RUN_ARGS, "run.steps=6", f"run.out_dir={out}"])
    return proc, before, _snapshot(run_dir), run_dir


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_resume_from_a_damaged_checkpoint_stops_before_deepspeed_reads_it(refused) -> None:
    proc, _, _, run_dir = refused
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(str(run_dir / "checkpoints" / "step00000004" / SHARD) in line for line in errors), \
        proc.stderr[-3000:]
    assert "UnpicklingError" not in proc.stderr and "PytorchStreamReader" not in proc.stderr


@pytest.mark.distributed
def test_refused_resume_leaves_the_run_directory_byte_identical(refused) -> None:
    _, before, after, _ = refused
    assert after == before


# --------------------------------------------------------------------------------------------------
# trainer state: plain types, exact RNG round trip, safe loading


def test_rng_state_round_trips_exactly_through_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # numpy caches the second gaussian: has_gauss=1 must survive
    random.gauss(0, 1)
    torch.save({"rng": checkpoint._rng_state()}, tmp_path / "s.pt")
    want = (torch.rand(3), np.random.standard_normal(3), np.random.rand(), [random.random() for _ in range(3)],
            random.gauss(0, 1))
    checkpoint._set_rng_state(checkpoint.read_trainer_state(tmp_path / "s.pt")["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), np.random.rand(), [random.random() for _ in range(3)],
           random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


def test_legacy_trainer_state_with_numpy_rng_tuple_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before this change pickled numpy's RNG tuple; they load (arrays only)."""
    np.random.seed(7)
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"step": 2, "world_size": 1, "data": {}, "rng": legacy}, tmp_path / "s.pt")
    want = np.random.rand(2)
    np.random.seed(0)
    checkpoint._set_rng_state(checkpoint.read_trainer_state(tmp_path / "s.pt")["rng"])
    assert np.array_equal(np.random.rand(2), want)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_crafted_trainer_state_does_not_run_code(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state_rank0.pt"
    torch.save({"step": 1, "evil": _Payload()}, path)
    one_line(lambda: checkpoint.read_trainer_state(path), str(path), "not a readable trainer state")


@pytest.mark.parametrize("content", [b"", b"garbage bytes", b"PK\x03\x04broken zip"])
def test_unreadable_trainer_state_is_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "trainer_state_rank0.pt"
    path.write_bytes(content)
    one_line(lambda: checkpoint.read_trainer_state(path), str(path), "not a readable trainer state")


def _fake_tag(ckpt: Path, tag: str, world: int = 2) -> Path:
    """A tag as save() leaves it, without DeepSpeed: rank states, one 'shard', the manifest."""
    tag_dir = ckpt / tag
    tag_dir.mkdir(parents=True)
    for rank in range(world):
        torch.save({"step": 2, "world_size": world, "data": {"index": 2}, "rng": checkpoint._rng_state()},
                   tag_dir / f"trainer_state_rank{rank}.pt")
    (tag_dir / SHARD).write_bytes(os.urandom(1000))
    checkpoint.write_manifest(tag_dir, step=2, world_size=world)
    return tag_dir


def test_manifest_round_trip_without_deepspeed(tmp_path: Path) -> None:
    tag_dir = _fake_tag(tmp_path, "step00000002")
    checkpoint.verify_tag(tmp_path, "step00000002", 2)
    checkpoint.verify_tag(tmp_path, "step00000002")  # world size taken from the manifest
    data = bytearray((tag_dir / SHARD).read_bytes())
    data[500] ^= 0xFF  # same size, one flipped byte
    (tag_dir / SHARD).write_bytes(bytes(data))
    one_line(lambda: checkpoint.verify_tag(tmp_path, "step00000002", 2), str(tag_dir / SHARD), "sha256 differs")


def test_manifest_paths_outside_the_tag_are_refused(tmp_path: Path) -> None:
    tag_dir = _fake_tag(tmp_path, "step00000002")
    manifest = json.loads((tag_dir / checkpoint.MANIFEST).read_text())
    manifest["files"][0]["path"] = "../../etc/passwd"
    (tag_dir / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    one_line(lambda: checkpoint.verify_tag(tmp_path, "step00000002", 2), str(tag_dir / checkpoint.MANIFEST),
             "malformed entry")


def test_no_latest_is_a_fresh_start_only_without_a_complete_tag(tmp_path: Path) -> None:
    """A kill inside the first save (no manifest yet) starts over; a complete tag without `latest` (a kill
    between its manifest and `latest`, or a deleted `latest`) is resumed, as it used to be overwritten."""
    unfinished = tmp_path / "first" / "step00000001"
    unfinished.mkdir(parents=True)
    torch.save({"step": 1, "world_size": 2}, unfinished / "trainer_state_rank0.pt")
    assert checkpoint.resume_tag(tmp_path / "first", 2) == (None, None)
    assert checkpoint.resume_tag(tmp_path / "missing", 2) == (None, None)
    _fake_tag(tmp_path / "done", "step00000002")
    point = checkpoint.resume_tag(tmp_path / "done", 2)
    assert point.tag == "step00000002" and "latest: missing" in point.skipped


def test_choose_resume_refuses_another_models_checkpoint_before_anything_is_written(tmp_path: Path) -> None:
    from trainer.config import load_config

    saved = checkpoint.identity(load_config(None, ["data.source=random", "model.tie_group_size=2"]))
    other = checkpoint.identity(load_config(None, ["data.source=random", "model.tie_group_size=1"]))
    tag_dir = tmp_path / "step00000002"
    tag_dir.mkdir()
    for rank in range(2):
        torch.save({"step": 2, "world_size": 2, "data": {}, "rng": checkpoint._rng_state(), "identity": saved},
                   tag_dir / f"trainer_state_rank{rank}.pt")
    checkpoint.write_manifest(tag_dir, step=2, world_size=2)
    (tmp_path / checkpoint.LATEST).write_text("step00000002")
    assert checkpoint.choose_resume(tmp_path, 2, saved) == ("step00000002", None)
    one_line(lambda: checkpoint.choose_resume(tmp_path, 2, other), "model.tie_group_size=2, this run has 1")
    one_line(lambda: checkpoint.choose_resume(tmp_path, 4, saved), "written by 2 ranks, this run has 4")


def test_ranks_hash_shares_that_rank_0_merges(tmp_path: Path) -> None:
    """save(): each rank checksums every world-th file; the merged manifest equals one rank hashing all."""
    tag_dir = _fake_tag(tmp_path / "a", "step00000002")
    alone = json.loads((tag_dir / checkpoint.MANIFEST).read_text())
    (tag_dir / checkpoint.MANIFEST).unlink()
    for rank in range(2):
        checkpoint.hash_share(tag_dir, rank, 2)
    assert len(list(tag_dir.glob(".manifest.json.part*"))) == 2
    checkpoint.write_manifest(tag_dir, step=2, world_size=2)
    assert json.loads((tag_dir / checkpoint.MANIFEST).read_text()) == alone
    assert not list(tag_dir.glob(".*"))  # parts removed
