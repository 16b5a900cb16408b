"""Checkpoints: a run stopped and resumed continues bit-identically; `latest` only names complete ones."""

import math
import os
import re
from pathlib import Path

import pytest
from helpers import worker_json

from trainer import checkpoint


def _resume_worker(tmp: Path, *extra: str) -> tuple[dict, Path]:
    out = tmp / "result.json"
    return worker_json("resume_worker.py", [str(tmp / "runs"), str(out), *extra], out), tmp / "runs"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[dict, Path]:
    return _resume_worker(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def resumed_muon(tmp_path_factory) -> tuple[dict, Path]:
    return _resume_worker(tmp_path_factory.mktemp("resume_muon"), "muon")


@pytest.mark.distributed
@pytest.mark.parametrize("cell", ["zero3-ep2", "zero2-ep1", "zero3-ep2-muon"])
def test_resume_is_bit_identical(resumed, cell: str) -> None:
    r = resumed[0][cell]
    assert len(r["first"]) == 3 and len(r["second"]) == 3
    assert r["first"] + r["second"] == r["straight"]  # exact, not approximate
    assert r["val_split"] == r["val_straight"]
    assert r["again"] == []  # a finished run resumes to nothing


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("cell", ["zero1-ep2-muon", "zero2-ep1-muon", "zero0-ep2-muon-bf16", "zero1-ep1-muon-bf16",
                                  "zero3-ep2-muon-bf16"])
def test_muon_resume_is_bit_identical_under_every_wrapper(resumed_muon, cell: str) -> None:
    """ZeRO-1/2 (DeepSpeedZeroOptimizer), bf16 ZeRO-0 (FP16_Optimizer), bf16 ZeRO-1 (BF16_Optimizer), bf16 ZeRO-3."""
    r = resumed_muon[0][cell]
    assert r["first"] + r["second"] == r["straight"] and r["val_split"] == r["val_straight"]


@pytest.fixture(scope="module")
def resumed_offload(tmp_path_factory) -> tuple[dict, Path]:
    return _resume_worker(tmp_path_factory.mktemp("resume_offload"), "offload")


@pytest.mark.slow  # CI time (about 60 s): CI keeps offload's config and refusals (test_cli_errors)
@pytest.mark.distributed
@pytest.mark.parametrize("cell", ["zero2-ep1", "zero3-ep2"])
def test_optimizer_offload_trains_as_without_it_and_resumes(resumed_offload, cell: str) -> None:
    """ZeRO-Offload with the default AdamW was a ZeRORuntimeException traceback inside the ranks (DeepSpeed wants its
    CPU Adam, which needs compiled ops); the torch optimizer on the CPU partitions computes what it does without."""
    r = resumed_offload[0][cell]
    assert all(math.isfinite(loss) for loss in r["straight"]) and r["straight"][-1] < r["straight"][0]
    assert r["straight"] == r["not_offloaded"]
    assert r["first"] + r["second"] == r["straight"] and r["val_split"] == r["val_straight"]


@pytest.mark.distributed
def test_muon_momentum_is_in_the_checkpoint(resumed) -> None:
    """Resuming without the momentum buffers would not be bit-identical; check they are saved at all (at
    ZeRO-3 as this rank's flat partition of each group's momentum)."""
    import torch

    ckpt = resumed[1] / "zero3-ep2-muon-split" / "checkpoints" / "step00000006"
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in ckpt.rglob("*optim_states.pt")]
    buffers = [s for st in states for s in _optimizer_states(st) if "momentum_buffer" in s]
    assert buffers and all(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in buffers)


def _optimizer_states(saved: dict) -> list[dict]:
    """Per-parameter state dicts wherever DeepSpeed nests the client optimizer's state_dict."""
    found = []
    for value in saved.values() if isinstance(saved, dict) else []:
        if isinstance(value, dict) and "state" in value and "param_groups" in value:
            found += list(value["state"].values())
        elif isinstance(value, dict):
            found += _optimizer_states(value)
    return found


@pytest.mark.distributed
def test_crash_while_saving_leaves_previous_checkpoint_latest(resumed) -> None:
    r = resumed[0]["zero3-ep2"]
    assert r["crashed"]
    assert r["latest_after_crash"] == "step00000003"  # step 4's shards were written, `latest` never moved
    assert r["crash_losses"] == r["straight"]  # resuming from step 3 is still bit-identical


@pytest.mark.distributed
def test_checkpoint_layout_and_retention(resumed) -> None:
    ckpt = resumed[1] / "zero3-ep2-split" / "checkpoints"
    assert checkpoint.latest_tag(ckpt) == "step00000006"
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert tags == ["step00000004", "step00000006"]  # keep_checkpoints=2
    assert sorted(p.name for p in (ckpt / "step00000006").glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt", "trainer_state_rank1.pt"]
    assert not list(ckpt.glob(".*tmp"))


def test_latest_naming_a_missing_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("step00000009")
    with pytest.raises(ValueError, match=r"latest: names 'step00000009'.*does not exist"):
        checkpoint.latest_tag(tmp_path)


def test_no_latest_means_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "step00000002").mkdir()  # a half-written save never became latest
    assert checkpoint.latest_tag(tmp_path) is None


def test_resuming_another_models_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch

    from trainer.config import load_config

    saved = load_config(None, ["data.source=random", "model.tie_group_size=2"])
    other = load_config(None, ["data.source=random", "model.tie_group_size=1"])
    (tmp_path / "step00000002").mkdir()
    torch.save({"identity": checkpoint.identity(saved)}, tmp_path / "step00000002" / "trainer_state_rank0.pt")
    checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(saved))
    with pytest.raises(ValueError, match=r"model.tie_group_size=2, this run has 1"):
        checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(other))


@pytest.mark.parametrize("override, says", [("optim.name=sgd", "optim.name='adamw', this run has 'sgd'"),
                                             ("run.precision=bf16", "run.precision='fp32', this run has 'bf16'")])
def test_resuming_with_another_optimizer_or_precision_is_refused(tmp_path: Path, override: str, says: str) -> None:
    """DeepSpeed loaded AdamW's state into SGD (KeyError 'momentum' at the first step) and looked for
    bf16_* shards in an fp32 checkpoint (FileNotFoundError): tracebacks, after config.yaml was rewritten."""
    import torch

    from trainer.config import load_config

    saved = load_config(None, ["data.source=random"])
    (tmp_path / "step00000002").mkdir()
    torch.save({"identity": checkpoint.identity(saved)}, tmp_path / "step00000002" / "trainer_state_rank0.pt")
    with pytest.raises(ValueError, match=re.escape(says)):
        checkpoint.check_identity(tmp_path, "step00000002",
                                  checkpoint.identity(load_config(None, ["data.source=random", override])))
    old = {key: value for key, value in checkpoint.identity(saved).items() if key not in ("optim_name", "precision")}
    torch.save({"identity": old}, tmp_path / "step00000002" / "trainer_state_rank0.pt")  # written before they were
    checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(saved))


def test_resuming_with_another_seed_is_refused(tmp_path: Path) -> None:
    """run.seed orders the data: the shard loader kept the checkpoint's seed silently, the stream loader
    refused it in the ranks, random tokens took the new one. Now one refusal, from the identity."""
    import torch

    from trainer.config import load_config

    saved = load_config(None, ["data.source=random"])
    reseeded = load_config(None, ["data.source=random", "run.seed=7"])
    (tmp_path / "step00000002").mkdir()
    state = tmp_path / "step00000002" / "trainer_state_rank0.pt"
    torch.save({"identity": checkpoint.identity(saved, 2)}, state)
    checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(saved, 2))
    with pytest.raises(ValueError, match=r"run.seed=0, this run has 7; .*resume with run.seed=0"):
        checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(reseeded, 2))
    checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(reseeded))  # export: no seed compared
    old = {key: value for key, value in checkpoint.identity(saved, 2).items() if key != "seed"}
    torch.save({"identity": old}, state)  # written before the seed was recorded
    checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(reseeded, 2))


def test_checkpoint_from_before_a_model_field_existed_resumes_with_its_default(tmp_path: Path) -> None:
    """Runs saved before `model.init` / `model.narrow_factor` existed had their default behaviour."""
    import torch

    from trainer.config import load_config

    cfg = load_config(None, ["data.source=random"])
    old = checkpoint.identity(cfg)
    for field in ("init", "narrow_factor"):
        del old["model"][field]
    (tmp_path / "step00000002").mkdir()
    torch.save({"identity": old}, tmp_path / "step00000002" / "trainer_state_rank0.pt")
    checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(cfg))
    paper = load_config(None, ["data.source=random", "model.init=paper"])
    with pytest.raises(ValueError, match=r"model.init='normal', this run has 'paper'"):
        checkpoint.check_identity(tmp_path, "step00000002", checkpoint.identity(paper))


def test_prune_deletes_only_the_trainers_tags(tmp_path: Path) -> None:
    """Old checkpoints were deleted by name prefix: a user's `step_best` folder went with them."""
    for name in ("step00000001", "step00000002", "step00000003", "step_best"):
        (tmp_path / name).mkdir()
    checkpoint._prune(tmp_path, keep=1, current="step00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000003", "step_best"]


def test_resume_never_twice_in_one_second_keeps_both(tmp_path: Path, monkeypatch) -> None:
    """replaced-<time>/ is named to the second: a second restart within it was a FileExistsError."""
    from trainer import train

    monkeypatch.setattr(checkpoint.time, "strftime", lambda _fmt: "20261202-101010")  # names replaced-<time>
    for marker in ("first", "second"):
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / marker).touch()
        train._set_aside_previous(tmp_path)
    assert (tmp_path / "replaced-20261202-101010" / "checkpoints" / "first").exists()
    assert (tmp_path / "replaced-20261202-101010-2" / "checkpoints" / "second").exists()


def _batch_identity(world: int, *overrides: str, source: str = "shards") -> dict:
    from trainer.config import load_config

    return checkpoint.identity(load_config(None, [f"data.source={source}", *overrides]).for_world(world), world)


def _write_identity(ckpt_dir: Path, ident: dict, world: int = 2) -> Path:
    import torch

    tag = ckpt_dir / "step00000002"
    tag.mkdir(parents=True)
    torch.save({"identity": ident, "world_size": world}, tag / "trainer_state_rank0.pt")
    (ckpt_dir / "latest").write_text("step00000002")
    return tag


@pytest.mark.parametrize("overrides, world, says", [
    (["batch.grad_accum=2"], 2, "this run has 4,096 (batch.grad_accum 1 -> 2)"),
    (["batch.micro_batch_size=4"], 2, "this run has 1,024 (batch.micro_batch_size 8 -> 4)"),
    (["batch.global_batch_tokens=4096"], 2, "this run has 4,096 (batch.grad_accum 1 -> 2)"),
    ([], 4, "this run has 4,096 (world size 2 -> 4)"),
])
def test_resuming_with_other_tokens_per_step_is_refused(tmp_path: Path, overrides, world, says) -> None:
    """A resume with another batch went on silently: step N, the data position saved with it and the LR
    schedule then meant other tokens. Refused, naming the changed fields with old and new values."""
    tag = _write_identity(tmp_path, _batch_identity(2))
    with pytest.raises(ValueError) as info:
        checkpoint.check_identity(tmp_path, tag.name, _batch_identity(world, *overrides))
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {tag}: written with 2,048 tokens per optimizer step, {says}" in message, message
    assert "batch.global_batch_tokens=2048" in message and "run.resume=never or another run.name" in message


def test_same_tokens_in_other_micro_batches_resume_with_a_note(tmp_path: Path) -> None:
    """The loaders count their position in sequences (shards) or tokens (stream), so the same tokens per
    step in other micro-batches continue the same data; the note says what changed (tests/test_faults.py
    checks the losses). Random tokens count micro-batches: there it is refused."""
    tag = _write_identity(tmp_path, _batch_identity(2))
    same = _batch_identity(2, "batch.micro_batch_size=4", "batch.grad_accum=2", "run.eval_batches=8")
    note = checkpoint.check_identity(tmp_path, tag.name, same)
    assert note.startswith("note: resuming with batch.micro_batch_size 8 -> 4, batch.grad_accum 1 -> 2: the same "
                           "2,048 tokens per optimizer step"), note
    assert "validation" not in note  # 4 x 8 = 8 x 4 validation sequences: the same ones
    note = checkpoint.check_identity(tmp_path, tag.name, _batch_identity(2, "batch.global_batch_tokens=2048",
                                                                         "batch.micro_batch_size=2"))
    assert "validation now reads 8 sequences per rank, not 32" in note and "run.eval_batches=16 keeps them" in note
    assert checkpoint.check_identity(tmp_path, tag.name, _batch_identity(2)) is None
    random = _write_identity(tmp_path / "random", _batch_identity(2, source="random"))
    with pytest.raises(ValueError, match=r"batch.micro_batch_size=8, this run has 4; data.source=random counts"):
        checkpoint.check_identity(tmp_path / "random", random.name,
                                  _batch_identity(2, "batch.micro_batch_size=4", "batch.grad_accum=2", source="random"))


def test_batch_is_not_checked_without_a_record(tmp_path: Path) -> None:
    """Checkpoints written before the batch was recorded resume as before; an export (no world size) does not
    compare batches."""
    old = _batch_identity(2)
    del old["batch"]
    tag = _write_identity(tmp_path, old)
    assert checkpoint.check_identity(tmp_path, tag.name, _batch_identity(2, "batch.grad_accum=2")) is None
    tag = _write_identity(tmp_path / "new", _batch_identity(2))
    export_ident = {k: v for k, v in _batch_identity(2, "batch.grad_accum=2").items() if k != "batch"}
    assert checkpoint.check_identity(tmp_path / "new", tag.name, export_ident) is None


def test_launcher_precheck_refuses_before_ranks_start(tmp_path: Path) -> None:
    """`trainer.launch` looks at the trainer state `latest` names: a resume the ranks would refuse (batch,
    model, world size) is refused before they start; what it cannot judge is left to the ranks."""
    tag = _write_identity(tmp_path, _batch_identity(2))
    checkpoint.precheck_resume(tmp_path, 2, _batch_identity(2))
    with pytest.raises(ValueError, match=r"\(batch.grad_accum 1 -> 2\)"):
        checkpoint.precheck_resume(tmp_path, 2, _batch_identity(2, "batch.grad_accum=2"))
    with pytest.raises(ValueError, match=r"model.tie_group_size=2, this run has 1"):
        checkpoint.precheck_resume(tmp_path, 2, _batch_identity(2, "model.tie_group_size=1"))
    with pytest.raises(ValueError, match=r"written by 2 ranks, this run has 4; .*trainer.reshard"):
        checkpoint.precheck_resume(tmp_path, 4, _batch_identity(4, "batch.micro_batch_size=4"))
    (tag / "layout_free.pt").touch()  # converted for another layout: trainer.reshard's rules, in the ranks
    checkpoint.precheck_resume(tmp_path, 4, _batch_identity(4))
    (tag / "layout_free.pt").unlink()
    (tag / "trainer_state_rank0.pt").write_bytes(b"garbage")  # damaged: the ranks fall back and say so
    checkpoint.precheck_resume(tmp_path, 2, _batch_identity(2, "batch.grad_accum=2"))
    checkpoint.precheck_resume(tmp_path / "fresh", 2, _batch_identity(2, "batch.grad_accum=2"))  # no checkpoint


def _complete_tag(ckpt_dir: Path, step: int, manifest: bool = True) -> Path:
    """A tag as save() leaves it, without DeepSpeed: two rank states, one torch 'shard', the manifest."""
    import torch

    tag = ckpt_dir / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    for rank in range(2):
        torch.save({"step": step, "world_size": 2, "data": {}, "rng": checkpoint._rng_state()},
                   tag / f"trainer_state_rank{rank}.pt")
    torch.save({"weights": torch.ones(64)}, tag / "mp_rank_00_model_states.pt")
    if manifest:
        checkpoint.write_manifest(tag, step, 2)
    return tag


def test_missing_latest_falls_back_to_the_newest_complete_tag(tmp_path: Path) -> None:
    """No `latest` was a fresh start even with tags there: the run rewrote them in place. Only a run with no complete
    tag starts fresh now (a kill inside the first save leaves one without a manifest); otherwise the newest tag with a manifest that verifies is taken, with a note (a tag
    without one may be a save that did not finish: never taken), and none is one line."""
    assert checkpoint.resume_tag(tmp_path / "absent", 2) == (None, None)
    (tmp_path / "step_best").mkdir()  # a user's folder, not a tag of ours
    assert checkpoint.resume_tag(tmp_path, 2) == (None, None)
    for step in (2, 4):
        _complete_tag(tmp_path, step)
    _complete_tag(tmp_path, 6, manifest=False)  # unfinished
    tag, note = checkpoint.resume_tag(tmp_path, 2)
    assert tag == "step00000004", note
    assert note == (f"skipped latest: checkpoint {tmp_path / 'latest'}: missing, but {tmp_path} holds 2 tags "
                    f"(step00000002 to step00000004) with a manifest (a save stopped before it named its tag, or "
                    f"latest was deleted); "
                    f"resuming from step00000004")
    os.truncate(tmp_path / "step00000004" / "mp_rank_00_model_states.pt", 100)
    assert checkpoint.resume_tag(tmp_path, 2).tag == "step00000002"
    os.truncate(tmp_path / "step00000002" / "mp_rank_00_model_states.pt", 100)
    with pytest.raises(ValueError) as info:
        checkpoint.resume_tag(tmp_path, 2)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {tmp_path / 'latest'}: missing"), message
    assert str(tmp_path / "step00000004" / "mp_rank_00_model_states.pt") in message, message  # why not the newest
    assert message.endswith("no complete checkpoint (a tag with manifest.json) verifies either (run.resume=never "
                            "or another run.name starts over)"), message


def test_torch_files_of_a_tag_without_manifest_must_open(tmp_path: Path) -> None:
    """Tags from before manifests: a truncated DeepSpeed shard is found in its zip directory, before DeepSpeed's
    loader fails on it with a traceback; an intact one, or one in torch's pre-zip format, passes."""
    import torch

    tag = _complete_tag(tmp_path, 2, manifest=False)
    checkpoint.verify_tag(tmp_path, tag.name, 2)
    torch.save({"old": torch.ones(3)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
               _use_new_zipfile_serialization=False)
    checkpoint.verify_tag(tmp_path, tag.name, 2)
    shard = tag / "mp_rank_00_model_states.pt"
    for damage in (b"truncated", b"garbage", b""):
        if damage == b"truncated":
            os.truncate(shard, 100)
        else:
            shard.write_bytes(damage)
        with pytest.raises(ValueError) as info:
            checkpoint.verify_tag(tmp_path, tag.name, 2)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"checkpoint {shard}: not a readable torch file"), message


def test_tools_without_latest_name_the_tags_there_are(tmp_path: Path) -> None:
    """export and reshard said 'no complete checkpoint yet' for a run whose `latest` was lost, tags and all."""
    from trainer import export

    assert checkpoint.without_latest(tmp_path) == f"no {tmp_path / 'latest'} (no complete checkpoint yet)"
    for step in (2, 4):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
    assert checkpoint.without_latest(tmp_path) == (f"no {tmp_path / 'latest'}, though {tmp_path} holds 2 tags "
                                                   f"(step00000002 to step00000004)")
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  source: random\n")
    with pytest.raises(ValueError, match=r"holds step00000002; name one: trainer.export --tag TAG"):
        export.resolve(run, None)
