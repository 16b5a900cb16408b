"""What a cluster does to a job, on 2 CPU ranks through `run.sh`: signals, a killed launcher, NaN, a
refused resume. Each run is a few steps of the tiny model on random tokens."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from trainer.config import REPO_ROOT

pytestmark = pytest.mark.distributed

BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=4", "run.log_every=1",
        "run.eval_batches=1", "schedule.warmup_steps=2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    env.pop("TIEDMOE_CPU_RANKS", None)
    return env


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.sh", *BASE, *args], cwd=REPO_ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def _strict_rows(path: Path) -> list[dict]:
    def refuse(token: str) -> None:
        raise ValueError(f"non-strict JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_nan_with_stop_exits_3_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    proc = _run([f"run.out_dir={tmp_path}", "run.name=nan", "run.steps=6", "run.save_every=2"],
                TIEDMOE_FAULT_NAN_AT_STEP="3")
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: step 3: non-finite loss"), errors
    assert "step00000002 is still the latest checkpoint" in errors[0], errors
    ckpt = tmp_path / "nan" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert not (ckpt / "step00000003").exists()
    _strict_rows(tmp_path / "nan" / "metrics.jsonl")


def test_a_run_stopped_during_its_final_validation_is_finished_by_the_next_start(tmp_path: Path) -> None:
    """SIGTERM during the final validation (after the last checkpoint) exits 130 saying "run the same command
    again"; that said "nothing to do" and the run never got its summary.json or final val_ce."""
    args = [f"run.out_dir={tmp_path}", "run.name=fin", "run.steps=3"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "fin"
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()  # where a stop inside the final validation leaves the run
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if "val_ce" not in line]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    again = _run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "writing them now" in again.stdout and "nothing to do" not in again.stdout, again.stdout[-2000:]
    redone = json.loads((run / "summary.json").read_text())
    assert redone["steps"] == 3 and redone["val_ce"] == summary["val_ce"], (redone, summary)
    assert redone["final_loss"] == summary["final_loss"]
    assert [r["val_ce"] for r in _strict_rows(run / "metrics.jsonl") if "val_ce" in r] == [summary["val_ce"]]
    third = _run(args)
    assert third.returncode == 0 and "nothing to do" in third.stdout, third.stdout[-2000:]


@pytest.mark.slow  # CI time: a 2-rank run or two of its own; the faults suite keeps a representative subset
def test_a_summary_of_an_earlier_write_of_the_last_tag_does_not_count_as_finished(tmp_path: Path) -> None:
    """After a rollback and a retrain, a stop during the final validation left the first run's summary.json (same
    step count): the next start took it as written and said "nothing to do" for good."""
    args = [f"run.out_dir={tmp_path}", "run.name=rb", "run.steps=4", "run.save_every=2"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "rb"
    old = (run / "summary.json").read_text()
    back = subprocess.run([sys.executable, "-m", "trainer.rollback", str(run), "--tag", "step00000002"], cwd=REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert back.returncode == 0, back.stderr
    retrained = _run(args + ["optim.lr=1e-2"])
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    new = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(old)  # as a stop inside the retrain's final validation leaves it
    again = _run(args + ["optim.lr=1e-2"])
    assert again.returncode == 0 and "writing them now" in again.stdout, again.stdout[-2000:]
    redone = json.loads((run / "summary.json").read_text())
    assert redone["val_ce"] == new["val_ce"] and redone["checkpoint_sha256"] == new["checkpoint_sha256"]
    assert redone["checkpoint_sha256"] != json.loads(old)["checkpoint_sha256"]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_latest_stays(tmp_path: Path) -> None:
    """A full disk (here a file-size limit, which root cannot bypass as it does permissions) was two tracebacks
    from torch.save inside DeepSpeed, exit 1."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))  # the optimizer shards are larger
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails (EFBIG) instead of killing

    args = [f"run.out_dir={tmp_path}", "run.name=full", "run.steps=4", "run.save_every=2"]
    first = _run(args + ["run.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    proc = subprocess.run([sys.executable, "run.sh", *BASE, *args], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: cannot write checkpoint {tmp_path / 'full' / 'checkpoints' / 'step00000004'}")
    assert "step00000002 is still the latest checkpoint" in errors[0], errors
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = _run(args)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]


@pytest.mark.slow  # CI time: a 2-rank run or two of its own; the faults suite keeps a representative subset
def test_resume_on_other_data_names_the_checkpoint_and_the_data_settings(tmp_path: Path) -> None:
    """Another data.path on resume was refused with "loader state field 'num_windows' is 38701 but this loader has
    312; cannot resume exactly": neither the checkpoint nor the setting was named."""
    from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset

    one = build_fixture_dataset(tmp_path / "one")
    other = build_fixture_dataset(tmp_path / "other", validation_fraction=0.3)
    args = ["data.source=shards", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", f"run.out_dir={tmp_path}", "run.name=d",
            "run.steps=4"]
    first = _run([*args, f"data.path={one}", "run.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _run([*args, f"data.path={other}"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = _errors(refused.stderr)
    assert len(errors) == 1, refused.stderr[-3000:]
    assert errors[0].startswith(f"error: checkpoint {tmp_path / 'd' / 'checkpoints' / 'step00000002'}: its data "
                                f"position does not fit this run's data"), errors
    assert "data.* settings" in errors[0] and "run.resume=never" in errors[0], errors


@pytest.mark.slow  # CI time: a 2-rank run or two of its own; the faults suite keeps a representative subset
def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path: Path) -> None:
    """Steps logged after the checkpoint a run resumes from are trained again: their metrics.jsonl rows
    and TensorBoard points were kept and written a second time (step 3 twice here)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [f"run.out_dir={tmp_path}", "run.name=again", "run.steps=5", "run.save_every=2"]
    stopped = _run(args, TIEDMOE_FAULT_NAN_AT_STEP="4")  # logs steps 1-3, the latest checkpoint is step 2
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    resumed = _run(args)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-3000:]
    run = tmp_path / "again"
    assert [r["step"] for r in _strict_rows(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_nonfinite_gradient_of_a_finite_loss_under_skip_says_what_skip_covers(monkeypatch, tmp_path) -> None:
    """run.on_nonfinite=skip drops updates whose loss is non-finite; a finite loss with a non-finite gradient
    norm still stops, and the error said "run.on_nonfinite=stop ... or set run.on_nonfinite=skip"."""
    from types import SimpleNamespace

    from trainer import train as train_module
    from trainer.config import load_config
    from trainer.session import StepResult

    monkeypatch.setattr(train_module, "nonfinite_layers", lambda s, out: [])  # collective in a real run
    s = SimpleNamespace(cfg=load_config(None, ["run.on_nonfinite=skip", f"run.out_dir={tmp_path}"]), rank=0)
    out = StepResult(loss=9.0, ce=9.0, lb=1.0, z=4.0, router_logits=[], engine_grad_norm=float("nan"))
    with pytest.raises(train_module.TrainingDiverged) as info:
        train_module._check_finite(s, 2, out, skips_in_a_row=0)
    message = str(info.value)
    assert message.startswith("step 3: non-finite gradient norm nan (loss 9)"), message  # the loss is finite
    assert "no checkpoint was saved yet" in message, message  # said "the last checkpoint is still the latest"
    assert "run.on_nonfinite=skip drops only updates whose loss is non-finite" in message, message
    assert "run.on_nonfinite=stop" not in message, message
    s.cfg.run.on_nonfinite = "stop"  # under stop, the hint offered skip, which drops only non-finite losses
    with pytest.raises(train_module.TrainingDiverged) as info:
        train_module._check_finite(s, 2, out, skips_in_a_row=0)
    assert str(info.value).endswith("lower optim.lr)") and "skip" not in str(info.value), str(info.value)
    nan_loss = StepResult(loss=float("nan"), ce=9.0, lb=1.0, z=4.0, router_logits=[], engine_grad_norm=float("nan"))
    with pytest.raises(train_module.TrainingDiverged) as info:
        train_module._check_finite(s, 2, nan_loss, skips_in_a_row=0)
    assert str(info.value).endswith("lower optim.lr or set run.on_nonfinite=skip)"), str(info.value)


def _tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor DeepSpeed saved under a tag (our own files, so unpickling is safe)."""
    out = {}
    for path in sorted(tag_dir.glob("*.pt")):
        if path.name.startswith("trainer_state"):
            continue
        stack = [(path.name, torch.load(path, map_location="cpu", weights_only=False))]
        while stack:
            key, value = stack.pop()
            if torch.is_tensor(value):
                out[key] = value
            elif isinstance(value, dict):
                stack += [(f"{key}/{k}", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple)):
                stack += [(f"{key}/{i}", v) for i, v in enumerate(value)]
    return out


def test_nan_with_skip_drops_exactly_that_update(tmp_path: Path) -> None:
    proc = _run([f"run.out_dir={tmp_path}", "run.name=skip", "run.steps=5", "run.save_every=1", "run.keep_checkpoints=0",
                 "run.on_nonfinite=skip"], TIEDMOE_FAULT_NAN_AT_STEP="3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss" in proc.stdout and "update skipped" in proc.stdout
    run = tmp_path / "skip"
    assert json.loads((run / "summary.json").read_text())["skipped_updates"] == 1
    ckpt = run / "checkpoints"
    before, after, next_step = (_tensors(ckpt / f"step0000000{n}") for n in (2, 3, 4))
    assert before.keys() == after.keys() and len(before) > 0
    for key in before:  # weights, fp32 partitions and Adam moments untouched by the dropped update
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(after[k], next_step[k]) for k in after)  # the next update is applied
    rows = _strict_rows(run / "metrics.jsonl")
    assert all(r["loss"] is not None for r in rows if "loss" in r and r["step"] != 3)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.sh", *BASE, *args], cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.lstrip().startswith(f"step {step:>6}/"):
            return lines
    raise AssertionError("".join(lines) + proc.stderr.read())


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "run.sh" in " ".join(p.cmdline())]


@pytest.mark.parametrize("target", [pytest.param("launcher", marks=pytest.mark.slow),  # SIGUSR1 covers it in CI
                                    "one_rank"])
def test_sigterm_saves_exits_0_and_resumes_bit_identically(tmp_path: Path, target: str) -> None:
    args = [f"run.out_dir={tmp_path}", "run.steps=12"]
    straight = _run(args + ["run.name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    job = _start(args + ["run.name=split"])
    _wait_for_step(job, 2)
    victim = job.pid if target == "launcher" else _ranks(job)[1].pid
    os.kill(victim, signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    assert "stopped at step" in out and "checkpoint saved" in out, out[-2000:]
    assert "(SIGTERM received)" in out, out[-2000:]  # one_rank: rank 0 said 'a stop signal on another rank'
    stopped_at = int((tmp_path / "split" / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 2 <= stopped_at < 12
    resumed = _run(args + ["run.name=split"])
    assert resumed.returncode == 0 and f"resumed from" in resumed.stdout, resumed.stderr[-3000:]

    def losses(name: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in _strict_rows(tmp_path / name / "metrics.jsonl") if "loss" in r}

    split, whole = losses("split"), losses("straight")
    assert set(split) == set(whole) and all(split[k] == whole[k] for k in whole), (split, whole)


def test_a_stop_during_the_last_step_leaves_the_final_validation_to_the_next_start(tmp_path: Path) -> None:
    """SIGTERM during the last step was recorded, the checkpoint saved, then dropped: the whole final validation
    ran (tens of seconds; a scheduler's grace period ends in SIGKILL) and the job said "done". It stops after the
    checkpoint, as on any other step; the next start writes the validation and summary.json."""
    args = [f"run.out_dir={tmp_path}", "run.name=last", "run.steps=3", "run.eval_batches=10"]
    job = subprocess.run([sys.executable, "run.sh", *BASE, *args], cwd=REPO_ROOT, timeout=300, capture_output=True,
                         text=True, env=_env(TIEDMOE_FAULT_SIGTERM_AT_STEP="3"))  # rank 0 gets SIGTERM inside step 3
    out, err = job.stdout, job.stderr
    assert job.returncode == 0, err[-3000:]
    assert "stopped at step 3 of 3 (SIGTERM received)" in out and "done:" not in out, out[-2000:]
    assert "run the same command again to write its final validation and summary.json" in out, out[-2000:]
    assert not (tmp_path / "last" / "summary.json").exists()
    report = json.loads((tmp_path / "last" / "memory_report.json").read_text())
    assert report["optimizer_steps_seen"] == 3  # refreshed at the stop (the next start trains nothing)
    again = _run(args)
    assert again.returncode == 0 and "writing them now" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads((tmp_path / "last" / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("sig, target", [(signal.SIGUSR1, "launcher"), (signal.SIGHUP, "group"),
                                         (signal.SIGINT, "group")])  # Ctrl-C: was named SIGTERM (the launcher's)
def test_sigusr1_and_sighup_stop_with_a_checkpoint(tmp_path: Path, sig: signal.Signals, target: str) -> None:
    """Slurm's `--signal=USR1@N` warning and a closed terminal's SIGHUP (to the whole process group) killed the job
    without a checkpoint: the launcher exited 1 ("a rank was killed by SIGUSR1") or died with every rank."""
    job = subprocess.Popen([sys.executable, "run.sh", *BASE, f"run.out_dir={tmp_path}", "run.name=s", "run.steps=400"],
                           cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True,  # heeded even when the tests run under nohup (ignored: kept so)
                           preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    _wait_for_step(job, 2)
    if target == "group":
        os.killpg(job.pid, sig)
    else:
        os.kill(job.pid, sig)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    assert f"({sig.name} received)" in out and "checkpoint saved" in out, out[-2000:]
    assert (tmp_path / "s" / "checkpoints" / "latest").is_file()


def _catches_sigterm(proc: psutil.Process) -> bool:
    caught = next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                  if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_before_the_first_step_is_one_line(tmp_path: Path) -> None:
    """While the ranks built the engine, SIGTERM killed them silently and the launcher exited 1 without a word."""
    job = _start([f"run.out_dir={tmp_path}", "run.name=early", "run.steps=400"])
    deadline = time.monotonic() + 60
    while not ((ranks := _ranks(job)) and len(ranks) == 2 and all(map(_catches_sigterm, ranks))):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-3000:]
    errors = _errors(err)
    assert len(errors) == 1 and "interrupted outside the training loop" in errors[0], err[-3000:]
    assert "step " not in out and not (tmp_path / "early" / "checkpoints").exists()


def test_killed_launcher_leaves_no_rank_behind(tmp_path: Path) -> None:
    job = _start([f"run.out_dir={tmp_path}", "run.name=orphans", "run.steps=400"])
    _wait_for_step(job, 1)
    ranks = _ranks(job)
    assert len(ranks) == 2
    job.kill()  # SIGKILL: the launcher cannot pass anything on
    job.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=90)
    assert not alive, [p.cmdline() for p in alive]
    assert (tmp_path / "orphans" / "checkpoints" / "latest").is_file()  # they saved on the way out


def test_a_second_job_on_a_training_run_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    """Two jobs on one run.name (a requeued job while the first still runs) both resumed from `latest`, then
    wrote the same tags, `latest` and metrics.jsonl over each other. Refused by the launcher, by rank 0 under
    torchrun, and by rollback; the lock dies with its job."""
    from trainer.launch import torchrun_command
    args = [f"run.out_dir={tmp_path}", "run.name=busy", "run.steps=100000", "run.save_every=1"]
    job = _start(args)
    _wait_for_step(job, 2)
    holder = str(_ranks(job)[0].pid)
    second = _run(args)
    cmd, env = torchrun_command(2, ["run.sh", *BASE, *args], _env())
    under_torchrun = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    back = subprocess.run([sys.executable, "-m", "trainer.rollback", str(tmp_path / "busy"), "--tag", "step00000001"],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert job.poll() is None  # the first job was not disturbed
    for proc in (second, back):
        errors = _errors(proc.stderr)
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert "is in use by another job" in errors[0] and f"pid {holder}" in errors[0], errors
        assert "Traceback" not in proc.stderr
    assert under_torchrun.returncode != 0  # torchrun's own ChildFailedError report surrounds the rank's line
    refusals = [line for line in under_torchrun.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1 and "is in use by another job" in refusals[0], under_torchrun.stderr[-3000:]
    assert "[rank1]: Traceback" not in under_torchrun.stderr, under_torchrun.stderr[-3000:]  # no peer left in a barrier
    assert "step " not in second.stdout + under_torchrun.stdout  # neither trained a step
    os.kill(job.pid, signal.SIGTERM)
    job.communicate(timeout=120)
    assert job.returncode == 0
    stopped_at = int((tmp_path / "busy" / "checkpoints" / "latest").read_text().removeprefix("step"))
    again = _run(args + [f"run.stop_at_step={stopped_at + 1}"])
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]


def test_sigterm_to_the_deepspeed_command_saves_and_stops_the_ranks(tmp_path: Path) -> None:
    """`deepspeed run.sh ...` on one node: the `deepspeed` command neither handles nor passes on SIGTERM, so killing
    it left its launch.py and the ranks training to the last step; README: the ranks save and exit 0."""
    from trainer.launch import _free_port
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    job = subprocess.Popen([launcher, "--num_accelerators", "2", "--master_port", str(_free_port()), "run.sh", *BASE,
                            f"run.out_dir={tmp_path}", "run.name=ds", "run.steps=400"], cwd=REPO_ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(job, 2)
    below = psutil.Process(job.pid).children(recursive=True)  # launch.py and the ranks
    assert len(below) == 3, [p.cmdline() for p in below]
    os.kill(job.pid, signal.SIGTERM)
    out, _ = job.communicate(timeout=120)  # the ranks share its stdout: this waits for them too
    gone, alive = psutil.wait_procs(below, timeout=120)
    assert not alive, [p.cmdline() for p in alive]
    assert "stopped at step" in out and "checkpoint saved" in out, out[-2000:]
    assert "(the deepspeed launcher ended)" in out, out[-2000:]
    stopped_at = int((tmp_path / "ds" / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 2 <= stopped_at < 400


def _digest(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_refused_resume_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    first = _run([f"run.out_dir={tmp_path}", "run.name=r", "run.steps=4", "run.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(tmp_path / "r")
    refused = _run([f"run.out_dir={tmp_path}", "run.name=r", "run.steps=4", "model.tie_group_size=1"])
    assert refused.returncode == 2
    errors = _errors(refused.stderr)
    assert len(errors) == 1 and "model.tie_group_size" in errors[0], refused.stderr[-3000:]
    assert _digest(tmp_path / "r") == before
    # The same command again: run.stop_at_step, not a finished run, is why nothing is left to do (the hint
    # was to start over with run.resume=never)
    again = _run([f"run.out_dir={tmp_path}", "run.name=r", "run.steps=4", "run.stop_at_step=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already at step 2 of 4 (run.stop_at_step=2: raise or remove it to continue)" in again.stdout, again.stdout


@pytest.mark.slow  # CI time: test_checkpoint sets a run aside in process
def test_resume_never_sets_the_previous_run_aside(tmp_path: Path) -> None:
    """Starting over must not leave the replaced run's `latest` for a later run.resume=auto to pick up."""
    first = _run([f"run.out_dir={tmp_path}", "run.name=again", "run.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    again = _run([f"run.out_dir={tmp_path}", "run.name=again", "run.steps=4", "run.resume=never",
                  "run.stop_at_step=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    run = tmp_path / "again"
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000002"]
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "latest").read_text() == "step00000004"
    # its metrics go with it (they were deleted while its TensorBoard events were kept), and what describes it
    assert max(r["step"] for r in _strict_rows(aside[0] / "metrics.jsonl")) == 4
    assert (aside[0] / "config.yaml").is_file() and (aside[0] / "summary.json").is_file()
    assert max(r["step"] for r in _strict_rows(run / "metrics.jsonl")) == 2
    resumed = _run([f"run.out_dir={tmp_path}", "run.name=again", "run.steps=4"])
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stdout[-2000:]


def test_rank_killed_by_a_signal_is_one_line(capsys) -> None:
    """A rank that died of a signal (OOM killer, or SIGTERM before python set a handler) made the launcher exit 1
    without a word."""
    from trainer.launch import run_local_ranks

    die = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert run_local_ranks(2, die, dict(os.environ)) == 1
    assert capsys.readouterr().err.strip() == "error: a rank was killed by SIGKILL (out of memory?)"


def test_signal_while_the_ranks_start_is_130_and_one_line() -> None:
    """SIGTERM to the launcher while its ranks were still starting python (no handler yet) killed them and the
    launcher exited 1 without a word; README: 130 and one `error:` line."""
    code = ("import os, sys; from trainer.launch import run_local_ranks; "
            "sys.exit(run_local_ranks(2, [sys.executable, '-c', 'import time; time.sleep(60)'], dict(os.environ)))")
    job = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(PYTHONPATH=str(REPO_ROOT)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(psutil.Process(job.pid).children()) < 2:
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err[-3000:]
    assert err.strip().startswith("error: interrupted while the ranks were starting") and "\n" not in err.strip(), err


SIGTERM_WHILE_A_RANK_STARTS = """
import os, signal, subprocess, sys
from trainer import launch
real = subprocess.Popen
def popen(*args, **kwargs):
    proc = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # the job is killed while its first rank starts
    return proc
launch.subprocess.Popen = popen
sys.exit(launch.run_local_ranks(2, [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ)))
"""


def test_signal_before_the_launcher_forwards_still_stops_the_ranks() -> None:
    """The launcher set up its forwarding only after every rank had started: a SIGTERM in between killed it and
    left the started ranks running on their own (CI saw the test above time out on their open pipes)."""
    job = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_A_RANK_STARTS], cwd=REPO_ROOT,
                         env=_env(PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=50)
    assert job.returncode == 130, (job.returncode, job.stderr[-3000:])
    assert job.stderr.strip().startswith("error: interrupted while the ranks were starting"), job.stderr


def test_a_signal_lost_while_the_engine_was_built_still_stops_the_loop() -> None:
    """SIGTERM while DeepSpeed built the engine raised a KeyboardInterrupt inside a finalizer, which Python prints
    and drops: the run trained to its last step as if never asked to stop. The loop now sees it."""
    from trainer import preemption

    try:
        with pytest.raises(KeyboardInterrupt):
            preemption.interrupt(signal.SIGTERM, None)
        stop = preemption.StopSignal()
        try:
            assert stop.received == "SIGTERM"
        finally:
            stop.restore()
    finally:
        preemption._pending.clear()


PEER_IN_A_COLLECTIVE = """
import os, time, torch, torch.distributed as dist
from trainer.cli import _fail
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(1)
    _fail("bad input found on rank 0 only", 2, True)
dist.all_reduce(torch.ones(1))  # rank 1 waits here for rank 0, which never comes
print("rank 1 got past the collective", flush=True)
"""


def test_a_rank_that_reports_an_error_leaves_after_its_peers_are_stopped() -> None:
    """CI, now and then: rank 0 left with its one-line error while rank 1 was inside a gloo collective with it;
    rank 1 saw the connection close and printed gloo's warning and a 'Connection reset by peer' traceback
    before the launcher stopped it. The reporting rank now waits until the launcher has stopped the others."""
    code = ("import os, sys; from trainer.launch import run_local_ranks; "
            f"sys.exit(run_local_ranks(2, [sys.executable, '-c', {PEER_IN_A_COLLECTIVE!r}], dict(os.environ)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == "error: bad input found on rank 0 only", proc.stderr[-3000:]


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The last row of each step in metrics.jsonl (a val_ce row follows its train row)."""
    rows: dict[int, dict] = {}
    for row in _strict_rows(run_dir / "metrics.jsonl"):
        rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.mark.slow  # CI time: a 2-rank run or two of its own; the faults suite keeps a representative subset
def test_resume_with_another_batch(tmp_path: Path) -> None:
    """Resuming with other tokens per optimizer step went on silently (step N, the data position saved with it
    and the LR schedule then meant other tokens): the launcher refuses it before any rank starts, naming the
    changed fields, and leaves the run untouched. The same tokens in other micro-batches continue the same
    data: losses as an uninterrupted run's, up to rounding and the per-micro-batch load-balancing loss."""
    from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset

    shards = build_fixture_dataset(tmp_path / "shards")
    data = ["data.source=shards", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}",
            f"run.out_dir={tmp_path}", "run.steps=4"]
    whole = _run([*data, "run.name=whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _run([*data, "run.name=r", "run.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(tmp_path / "r")
    refused = _run([*data, "run.name=r", "batch.grad_accum=2"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = _errors(refused.stderr)
    assert len(errors) == 1, refused.stderr[-3000:]
    assert ("written with 256 tokens per optimizer step, this run has 512 (batch.grad_accum 1 -> 2)" in errors[0]
            and "run.resume=never" in errors[0]), errors
    assert "run dir" not in refused.stdout  # the launcher refused it: no rank started
    assert _digest(tmp_path / "r") == before
    reseeded = _run([*data, "run.name=r", "run.seed=1"])  # the shard loader kept the checkpoint's seed silently
    assert reseeded.returncode == 2, reseeded.stderr[-3000:]
    assert [e for e in _errors(reseeded.stderr) if "written with run.seed=0, this run has 1" in e
            and "resume with run.seed=0" in e] == _errors(reseeded.stderr), reseeded.stderr[-3000:]
    assert "run dir" not in reseeded.stdout and _digest(tmp_path / "r") == before
    resumed = _run([*data, "run.name=r", "batch.micro_batch_size=2", "batch.grad_accum=2", "run.eval_batches=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "note: resuming with batch.micro_batch_size 4 -> 2, batch.grad_accum 1 -> 2: the same 256 tokens" in \
        resumed.stdout, resumed.stdout
    got, want = _metrics(tmp_path / "r"), _metrics(tmp_path / "whole")
    for step in (3, 4):
        assert abs(got[step]["ce"] - want[step]["ce"]) < 1e-4, (step, got[step], want[step])
        assert abs(got[step]["lr"] - want[step]["lr"]) < 1e-12
    assert abs(got[4]["val_ce"] - want[4]["val_ce"]) < 1e-4  # eval_batches 2 x 2: the same validation sequences


def test_rollback_to_an_older_checkpoint_continues_as_the_run_did(tmp_path: Path) -> None:
    """`python -m trainer.rollback RUN_DIR --tag step2` after a 6-step run: steps 3-6 trained again give the
    first run's losses (bit-identical resume), the curves hold each step once, the newer tags are kept aside."""
    args = [f"run.out_dir={tmp_path}", "run.name=r", "run.steps=6", "run.save_every=2", "run.keep_checkpoints=0"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "r"
    losses = {r["step"]: r["loss"] for r in _strict_rows(run / "metrics.jsonl") if "loss" in r}
    back = subprocess.run([sys.executable, "-m", "trainer.rollback", str(run), "--tag", "step00000002"],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert back.returncode == 0 and "-> step00000002" in back.stdout, back.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step00000002"]
    aside = next(run.glob("replaced-*"))
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step00000004", "step00000006"]
    assert (aside / "metrics.jsonl").read_text().count('"loss"') == 6
    again = _run(args)
    assert again.returncode == 0 and "at step 2" in again.stdout, again.stderr[-3000:]
    rows = [r for r in _strict_rows(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {r["step"]: r["loss"] for r in rows} == losses


@pytest.mark.parametrize("case, says", [("unknown", "no such checkpoint under"), ("damaged", "step00000002"),
                                        ("no-run", "no checkpoints/ folder"), ("no-tag", "--tag"),
                                        ("unwritable", "nothing was changed")])
def test_rollback_refuses_in_one_line_and_moves_nothing(tmp_path: Path, case: str, says: str) -> None:
    from trainer import checkpoint

    ckpt = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        (ckpt / f"step0000000{step}").mkdir(parents=True)
        (ckpt / f"step0000000{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
        checkpoint.write_manifest(ckpt / f"step0000000{step}", step, 1)
    (ckpt / "latest").write_text("step00000004")
    run_dir, tag = tmp_path / "run", "step00000002"
    if case == "unknown":
        tag = "step00000003"
    elif case == "damaged":
        (ckpt / "step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
    elif case == "no-run":
        run_dir = tmp_path / "elsewhere"
    elif case == "unwritable":  # `latest` cannot be staged (a folder in the way: permissions do not stop root)
        (ckpt / ".latest.tmp").mkdir()
        torch.save({k: 0 for k in ("step", "world_size", "data", "rng")}, ckpt / tag / "trainer_state_rank0.pt")  # a tag that verifies
        checkpoint.write_manifest(ckpt / tag, 2, 1)
        (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # copied aside first
    argv = [str(run_dir)] + ([] if case == "no-tag" else ["--tag", tag])
    proc = subprocess.run([sys.executable, "-m", "trainer.rollback", *argv], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], proc.stderr
    assert (ckpt / "latest").read_text() == "step00000004" and (ckpt / "step00000004").is_dir()
    assert not list((tmp_path / "run").glob("replaced-*"))


@pytest.mark.slow  # CI time: test_checkpoint's fallback tests keep the logic in CI
def test_missing_latest_resumes_from_the_newest_complete_tag(tmp_path: Path) -> None:
    """A run whose `checkpoints/latest` was gone (deleted, or a kill between a first tag's manifest and `latest`)
    started over from step 1: it rewrote the step tags in place and replaced metrics.jsonl, with no identity
    check. It now resumes from the newest tag that verifies, with a note, and refuses another model's."""
    args = [f"run.out_dir={tmp_path}", "run.steps=6", "run.save_every=1", "run.keep_checkpoints=0"]
    whole = _run([*args, "run.name=whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _run([*args, "run.name=nl", "run.stop_at_step=5"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "nl"
    (run / "checkpoints" / "latest").unlink()
    before = _digest(run)
    other = _run([*args, "run.name=nl", "model.tie_group_size=1"])
    assert other.returncode == 2, other.stderr[-3000:]
    errors = _errors(other.stderr)
    assert len(errors) == 1 and "step00000005" in errors[0] and "model.tie_group_size" in errors[0], errors
    assert "run dir" not in other.stdout  # refused by the launcher, before any rank started
    assert _digest(run) == before
    resumed = _run([*args, "run.name=nl"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"skipped latest: checkpoint {run / 'checkpoints' / 'latest'}: missing" in resumed.stdout
            and "; resuming from step00000005" in resumed.stdout), resumed.stdout[-3000:]
    assert "at step 5" in resumed.stdout, resumed.stdout[-3000:]
    after = _digest(run)
    assert all(after[name] == digest for name, digest in before.items() if name.startswith("checkpoints/step")), \
        "a complete tag was rewritten"
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"

    def losses(name: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in _strict_rows(tmp_path / name / "metrics.jsonl") if "loss" in r}

    assert losses("nl") == losses("whole")


def test_truncated_shard_of_a_checkpoint_without_manifest_is_one_line(tmp_path: Path) -> None:
    """Tags from before manifests had only their rank files checked: a truncated DeepSpeed shard reached
    DeepSpeed's loader (a `PytorchStreamReader failed reading zip archive` traceback on a rank, exit 1)."""
    from trainer import checkpoint

    args = [f"run.out_dir={tmp_path}", "run.name=old", "run.steps=4", "run.save_every=2", "run.keep_checkpoints=0"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "old" / "checkpoints"
    for tag in ("step00000002", "step00000004"):  # as an older version wrote them
        (ckpt / tag / checkpoint.MANIFEST).unlink()
        checkpoint.verify_tag(ckpt, tag, 2)  # intact: they still load
    shard = ckpt / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(shard, 1000)
    before = _digest(tmp_path / "old")
    again = _run([*args[:2], "run.steps=6", *args[3:]])
    assert again.returncode == 2, again.stderr[-3000:]
    errors = _errors(again.stderr)
    assert len(errors) == 1 and str(shard) in errors[0] and "not a readable torch file" in errors[0], errors
    assert "PytorchStreamReader" not in again.stderr
    assert _digest(tmp_path / "old") == before


def test_a_rank_killed_mid_training_is_one_line_without_its_peers_traceback(tmp_path: Path) -> None:
    """The OOM killer's SIGKILL on one rank broke its peer's collective, and the peer's gloo traceback came
    before the launcher's one line about the killed rank."""
    job = _start([f"run.out_dir={tmp_path}", "run.name=killed", "run.steps=200"])
    _wait_for_step(job, 2)
    _ranks(job)[1].kill()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 1
    assert _errors(stderr) == ["error: a rank was killed by SIGKILL (out of memory?)"]
