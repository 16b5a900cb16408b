"""Continuing a run on another layout: 2 ranks ZeRO-3 EP2 -> 2 ranks ZeRO-1 EP1, and -> 1 rank, through
`python -m trainer.reshard`; the continued losses equal the plain-PyTorch reference continued from the
same weights and optimizer state."""

from __future__ import annotations

import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import REPO_ROOT, load_config
from trainer.reference import reference_run

pytestmark = pytest.mark.distributed

BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=4", "run.log_every=1", "run.eval_batches=1",
        "schedule.warmup_steps=1", "model.vocab_size=512", "run.steps=6", "run.name=r"]


def _run(args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TIEDMOE_CPU_RANKS=str(ranks))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reshard")
    first = _run(["run.sh", *BASE, f"run.out_dir={out}", "run.stop_at_step=3",
                  "parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _run(["run.sh", *BASE, f"run.out_dir={out}", "parallel.ds_config=ds_configs/zero1.json",
                    "parallel.expert_parallel_size=1"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "python -m trainer.reshard" in errors[0], refused.stderr[-3000:]
    proc = _run(["-m", "trainer.reshard", str(out / "r")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "r" / "checkpoints" / "step00000003" / "layout_free.pt").is_file()
    return out


@pytest.mark.parametrize("ranks, zero", [(2, 1), pytest.param(1, 1, marks=pytest.mark.slow)])
def test_continue_on_another_layout_matches_the_reference(converted: Path, tmp_path: Path, ranks: int,
                                                          zero: int) -> None:
    out = Path(shutil.copytree(converted, tmp_path / "copy"))
    # 4 sequences of 32 tokens on each of 2 ranks: on 1 rank grad_accum 2 keeps a step's 256 tokens (another
    # count is refused: the step count, data position and schedule would mean other tokens)
    same_tokens = "batch.global_batch_tokens=256"
    proc = _run(["run.sh", *BASE, same_tokens, f"run.out_dir={out}", f"parallel.ds_config=ds_configs/zero{zero}.json",
                 "parallel.expert_parallel_size=1"], ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout_free.pt at step 3" in proc.stdout, proc.stdout[-2000:]
    got = _losses(out / "r")
    state = torch.load(out / "r" / "checkpoints" / "step00000003" / "layout_free.pt", weights_only=True)
    cfg = load_config(None, [*BASE, same_tokens, "parallel.expert_parallel_size=1"])  # as the continued run
    expected = reference_run(cfg, ranks, start=state).losses
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl goes on across the switch
    assert max(abs(got[s] - e) for s, e in zip((4, 5, 6), expected)) <= 1e-5, (got, expected)
    if ranks == 2:
        # A tag from before the switch exports on the layout that wrote it (config.yaml now says ZeRO-1 EP1: it
        # was refused with "written with parallel.expert_parallel_size=2 ... resume with the same layout")
        old = _run(["-m", "trainer.export", str(out / "r"), "--tag", "step00000003"])
        assert old.returncode == 0 and "PASS" in old.stdout, old.stdout[-2000:] + old.stderr[-3000:]
        source = json.loads((out / "r" / "export" / "step00000003" / "config.json").read_text())["source"]
        assert (source["zero_stage"], source["expert_parallel_size"]) == (3, 2), source
        export_weights = load_file(str(out / "r" / "export" / "step00000003" / "model.safetensors"))
        assert export_weights.keys() == state["weights"].keys()
        assert all(torch.equal(export_weights[k], v) for k, v in state["weights"].items()), "not the tag's weights"


@pytest.mark.parametrize("optim", ["sgd", "muon"])
def test_layout_free_state_refuses_another_optimizer(tmp_path: Path, optim: str) -> None:
    """layout_free.pt holds AdamW moments: resuming it with SGD failed inside DeepSpeed at ZeRO 1-3
    ("exp_avg not found in optimizer state fragment", naming no setting) and at ZeRO-0 set Adam moments
    on SGD's state without a word."""
    from types import SimpleNamespace

    from trainer import checkpoint
    from trainer.reshard import LAYOUT_FREE, layout, resume_layout_free

    written = load_config(None, BASE)
    cfg = load_config(None, [*BASE, f"optim.name={optim}", "parallel.expert_parallel_size=1"])
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step00000003").mkdir(parents=True)
    (ckpt_dir / checkpoint.LATEST).write_text("step00000003")
    torch.save({"layout": layout(written, 2), "identity": checkpoint.identity(written)},
               ckpt_dir / "step00000003" / LAYOUT_FREE)
    with pytest.raises(ValueError, match=f"holds AdamW state, this run has optim.name='{optim}'"):
        resume_layout_free(SimpleNamespace(cfg=cfg, world=2, rank=0), ckpt_dir)


@pytest.mark.parametrize("content", ["", "garbage", "step00000009"])
def test_garbage_latest_is_left_to_the_resume_fallback(tmp_path: Path, content: str) -> None:
    """An empty, garbage or dangling `latest` used to stop the run here (exit 2) before
    `checkpoint.resume_tag` could fall back to the newest older tag that verifies, as the README says."""
    from types import SimpleNamespace

    from trainer import checkpoint
    from trainer.reshard import resume_layout_free

    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step00000002").mkdir(parents=True)
    (ckpt_dir / checkpoint.LATEST).write_text(content)
    cfg = load_config(None, BASE)
    assert resume_layout_free(SimpleNamespace(cfg=cfg, world=2, rank=0), ckpt_dir) is None


def test_another_layout_of_a_muon_run_is_not_sent_to_reshard(tmp_path: Path) -> None:
    """A Muon checkpoint resumed on another layout (EP size, world size) was told to convert it with
    `python -m trainer.reshard`, which then refused it (AdamW state only)."""
    muon = [*BASE, f"run.out_dir={tmp_path}", "optim.name=muon", "parallel.ds_config=ds_configs/zero0.json"]
    first = _run(["run.sh", *muon, "run.stop_at_step=2", "parallel.expert_parallel_size=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    for args, ranks, says in ((["parallel.expert_parallel_size=1"], 2, "expert_parallel_size=2"),
                              (["parallel.expert_parallel_size=1"], 1, "written by 2 ranks")):
        refused = _run(["run.sh", *muon, *args], ranks)
        assert refused.returncode == 2, refused.stderr[-3000:]
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and says in errors[0], refused.stderr[-3000:]
        assert "convert it first" not in errors[0] and "optim.name='muon'" in errors[0], errors[0]


def test_reshard_of_an_older_tag_says_the_run_resumes_from_latest(tmp_path: Path) -> None:
    """`--tag` of a tag older than `latest` wrote a layout_free.pt that no resume reads, without a word: the next
    start on the new layout was refused with 'convert it first', which the user had just done."""
    first = _run(["run.sh", *BASE, f"run.out_dir={tmp_path}", "run.stop_at_step=4", "run.save_every=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _run(["-m", "trainer.reshard", str(tmp_path / "r"), "--tag", "step00000002"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "r" / "checkpoints" / "step00000002" / "layout_free.pt").is_file()
    assert "names step00000004: the run resumes from that tag, not from step00000002" in proc.stdout, proc.stdout


def test_reshard_of_a_zero2_run_continues_as_the_straight_run(tmp_path: Path) -> None:
    """Reshard read the Adam moments right after loading a ZeRO-1/2 (or bf16) checkpoint, before DeepSpeed had
    linked its optimizer-state fragments (it does so after a step): a TypeError inside DeepSpeed, exit 1. The
    moments must be the real ones: the continuation on another layout follows the straight run."""
    zero2 = [*BASE, f"run.out_dir={tmp_path}", "parallel.ds_config=ds_configs/zero2.json",
             "parallel.expert_parallel_size=2"]
    straight = _run(["run.sh", *zero2, "run.name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _run(["run.sh", *zero2, "run.stop_at_step=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _run(["-m", "trainer.reshard", str(tmp_path / "r")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = _run(["run.sh", *BASE, f"run.out_dir={tmp_path}", "parallel.ds_config=ds_configs/zero1.json",
                  "parallel.expert_parallel_size=1"])
    assert moved.returncode == 0 and "layout_free.pt at step 3" in moved.stdout, moved.stderr[-3000:]
    got, want = _losses(tmp_path / "r"), _losses(tmp_path / "straight")
    assert max(abs(got[s] - want[s]) for s in (4, 5, 6)) <= 1e-5, (got, want)


def test_failed_reshard_ranks_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's exception sat above torchrun's 30-line summary, out of the printed tail: the one line said only
    'reshard ranks failed (exit 1)'."""
    from trainer import checkpoint, reshard

    (tmp_path / "config.yaml").write_text("data:\n  source: random\n")
    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("step00000002")
    monkeypatch.setattr(checkpoint, "verify_tag", lambda *a: None)
    monkeypatch.setattr(checkpoint, "read_trainer_state", lambda path: {"world_size": 2})
    log = "[rank0]: Traceback (most recent call last):\n[rank0]: TypeError: boom\n" + "torchrun summary\n" * 40
    monkeypatch.setattr(reshard, "spawn_cpu_ranks",
                        lambda *a, **k: subprocess.CompletedProcess([], 1, stdout="", stderr=log))
    with pytest.raises(RuntimeError, match=r"^reshard ranks failed \(exit 1\): TypeError: boom$"):
        reshard.reshard(tmp_path, None)


def test_an_unwritable_tag_is_refused_before_the_ranks_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks gathered everything, then torch.save failed: torchrun's report ending in 'open file failed',
    without the file's name, exit 1."""
    from trainer import checkpoint, reshard

    (tmp_path / "config.yaml").write_text("data:\n  source: random\n")
    tag_dir = tmp_path / "checkpoints" / "step00000002"
    tag_dir.mkdir(parents=True)
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("step00000002")
    (tag_dir / f".{reshard.LAYOUT_FREE}.probe").mkdir()  # unwritable where it counts (permissions do not stop root)
    monkeypatch.setattr(checkpoint, "verify_tag", lambda *a: None)
    monkeypatch.setattr(checkpoint, "read_trainer_state", lambda path: {"world_size": 2})
    monkeypatch.setattr(reshard, "spawn_cpu_ranks", lambda *a, **k: pytest.fail("ranks started"))
    with pytest.raises(ValueError, match=rf"^cannot write {tag_dir / reshard.LAYOUT_FREE} \("):
        reshard.reshard(tmp_path, None)
