"""End to end, as a user runs it: `python run.sh key=value ...` with no launcher, so trainer.cli starts
2 CPU ranks itself; ZeRO-3 + expert parallel 2 on the tiny tied model (g=2), real tokens from the fixture
corpus shards. About 20-40 s on 2 shared cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset
from models.accounting import account
from trainer.config import REPO_ROOT, load_config

STEPS = 40
PEAK_FLOPS = 1e12


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    env.pop("TIEDMOE_CPU_RANKS", None)  # the default: 2 CPU ranks
    return env


@pytest.mark.distributed
def test_two_rank_zero3_ep2_tied_run_on_real_tokens(tmp_path):
    shards = build_fixture_dataset(tmp_path / "shards")
    out = tmp_path / "runs"
    # log_every=1: the first logged loss is step 1 (about ln(vocab)); with log_every=10 the first logged
    # value already comes after the fast initial drop and the rest of 40 steps gains only ~0.2.
    args = [f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", f"run.steps={STEPS}",
            f"run.out_dir={out}", "run.name=e2e", "data.seq_len=64", "batch.micro_batch_size=4", "run.log_every=1",
            "optim.lr=1e-2", "schedule.warmup_steps=5", "run.eval_every=20", f"run.peak_flops={PEAK_FLOPS}"]
    proc = subprocess.run([sys.executable, "run.sh", *args], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run_dir = out / "e2e"
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name

    # the resolved config is a loadable config and says what we asked for
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.data.path == str(shards) and resolved.run.steps == STEPS
    assert resolved.model_config().vocab_size == FIXTURE_VOCAB_SIZE
    assert resolved.model_config().tie_group_size == 2

    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["expert_parallel"]["enabled"] and ds["expert_parallel"]["autoep_size"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8

    # the loss falls clearly: from chance level (ln 512 = 6.24) by ~1 nat in 40 steps (~5.2 at the end)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in rows if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["step"] for m in rows if "val_ce" in m] == [20, STEPS]  # a validation curve, then the final one
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(FIXTURE_VOCAB_SIZE)) < 0.3, losses[:3]
    tail = sum(losses[-5:]) / 5
    assert tail < losses[0] - 0.7, (losses[0], tail)
    assert max(losses[-10:]) < losses[0] - 0.5, losses
    assert metrics[0]["lr"] == pytest.approx(1e-2 / 5)  # warmup step 1 of 5
    assert all(m["tokens_per_s"] > 0 and m["step_time_s"] > 0 for m in metrics)
    assert all(m["grad_norm"] > 0 and math.isfinite(m["grad_norm"]) for m in metrics)
    for m in metrics:  # the split covers the whole norm
        parts = m["grad_norm_parts"]
        assert sum(v * v for v in parts.values()) == pytest.approx(m["grad_norm"] ** 2, rel=1e-9)
        assert parts["tied_experts"] > 0 and parts["untied_experts"] > 0 and parts["other"] > 0
    # MFU from the tying-aware FLOPs of models.accounting (tied layers at every use), per rank
    flops = account(resolved.model_config(), resolved.data.seq_len).train_flops_per_token
    for m in metrics:
        assert m["mfu"] == pytest.approx(flops * m["tokens_per_s"] / 2 / PEAK_FLOPS, rel=1e-9)
        assert m["memory"]["peak_rss_gib"] >= m["memory"]["rss_gib"] > 0
        assert 0 <= m["routing"]["layer02/unused_share"] <= 1
    _check_tensorboard(run_dir / "tb")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2 and summary["expert_parallel_size"] == 2
    assert summary["steps"] == STEPS
    # the end-of-run memory report counted every optimizer step (it counted only the two it measured)
    assert json.loads((run_dir / "memory_report.json").read_text())["optimizer_steps_seen"] == STEPS
    measured = summary["expert_elements_per_rank_measured"]
    assert len(measured) == 2 and measured[0] == measured[1] > 0
    # tied banks are stored once: per rank, banks/layers of what the untied model would hold
    assert summary["expert_banks"] < summary["moe_layers"]
    untied = summary["expert_elements_per_rank_if_untied"]
    assert measured[0] * summary["moe_layers"] == untied * summary["expert_banks"]
    assert summary["unique_params"] < summary["untied_params"]
    assert summary["val_ce"] < math.log(FIXTURE_VOCAB_SIZE) - 0.7
    assert summary["final_loss"] == pytest.approx(losses[-1])

    progress = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("step") and "tok/s" in line]
    assert len(progress) == STEPS
    assert "tok/s" in progress[-1] and "eta" in progress[-1], progress[-1]
    assert "ZeRO 3" in proc.stdout and "EP 2" in proc.stdout


def _check_tensorboard(tb_dir) -> None:
    """Every scalar a researcher reads first, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {f"train/{k}" for k in ("loss", "ce", "lb", "z", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu")}
    expected |= {f"grad_norm/{k}" for k in ("tied_experts", "untied_experts", "other")}
    expected |= {"memory/rss_gib", "memory/peak_rss_gib", "val/ce", "val/ppl", "routing/mean/tie_agreement",
                 "routing/layer02/max_load", "routing/layer02/unused_share", "routing/layer02/entropy"}
    assert expected <= tags, sorted(expected - tags)
    assert [e.step for e in events.Scalars("val/ce")] == [20, STEPS]
    assert len(events.Scalars("train/grad_norm")) == STEPS


@pytest.mark.distributed
def test_stop_at_step_on_an_eval_step_validates_once(tmp_path) -> None:
    """run.stop_at_step on a run.eval_every step: the loop's validation and the end-of-session one were
    both logged, two `val_ce` rows (and TensorBoard points) for step 4."""
    args = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=2", "run.eval_batches=1",
            "run.steps=6", "run.eval_every=2", "run.stop_at_step=4", "run.log_every=2", f"run.out_dir={tmp_path}",
            "run.name=stop"]
    proc = subprocess.run([sys.executable, "run.sh", *args], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_ce" in r] == [2, 4]


@pytest.mark.distributed
def test_settings_without_effect_are_noted_at_start(tmp_path) -> None:
    """model.tie_group_size=100 trained one group of 4 without a word (only models.summary said so), and
    optimizer fields the chosen optimizer does not read were dropped silently."""
    args = ["data.source=random", "data.seq_len=16", "batch.micro_batch_size=2", "run.eval_batches=1", "run.steps=1",
            "model.tie_group_size=100", "optim.name=sgd", "optim.betas=[0.8,0.9]", f"run.out_dir={tmp_path}",
            "run.name=notes"]
    proc = subprocess.run([sys.executable, "run.sh", *args], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "note: model: last tie group [2, 3, 4, 5] has 4 layers, fewer than tie_group_size=100" in proc.stdout
    assert "note: optim.betas=(0.8, 0.9) is not used by optim.name=sgd" in proc.stdout


def test_missing_data_path_is_one_error_line(tmp_path):
    missing = tmp_path / "no_such_corpus"
    proc = subprocess.run([sys.executable, "run.sh", f"data.path={missing}"], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data.path="), proc.stderr[-3000:]
    assert "manifest" in errors[0]
    assert not missing.exists()  # nothing was built for a non-default path
    assert "torch.distributed" not in proc.stderr  # no ranks were started


@pytest.mark.distributed
def test_deepspeed_launcher_runs_run_sh(tmp_path) -> None:
    """`deepspeed run.sh CONFIG key=value` (the cluster path): the launcher runs run.sh as Python."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    proc = subprocess.run([launcher, "--num_accelerators", "2", "--master_port", "29693", "run.sh",
                           "trainer/configs/default.yaml", "data.source=random", "run.steps=2", "run.log_every=1",
                           f"run.out_dir={tmp_path}", "run.name=ds"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step      2/2" in proc.stdout
    assert (tmp_path / "ds" / "checkpoints" / "latest").read_text() == "step00000002"


@pytest.mark.distributed
def test_streamed_corpus_trains_without_packing(tmp_path) -> None:
    """data.source=stream: jsonl read and tokenized on the fly, rank-sharded, through run.sh."""
    shards = build_fixture_dataset(tmp_path / "shards")  # only for its tokenizer.json
    fixture = REPO_ROOT / "tests" / "fixtures" / "data"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "run.sh", "data.source=stream",
                           f"data.stream_train={fixture / 'kjv_sample.jsonl'}",
                           f"data.stream_validation={fixture / 'sonnets.txt'}",
                           f"data.tokenizer={shards / 'tokenizer.json'}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}",
                           "run.steps=6", "run.log_every=3", "data.seq_len=32", "batch.micro_batch_size=4",
                           f"run.out_dir={tmp_path}", "run.name=stream", "run.eval_batches=2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step      6/6" in proc.stdout and "val ce" in proc.stdout
    summary = json.loads((tmp_path / "stream" / "summary.json").read_text())
    assert summary["val_ce"] is not None and summary["val_ce"] < math.log(FIXTURE_VOCAB_SIZE)


def test_stream_without_tokenizer_is_one_error_line() -> None:
    proc = subprocess.run([sys.executable, "run.sh", "data.source=stream", "data.stream_train=x.jsonl"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: data.tokenizer: required when data.source=stream"]


@pytest.mark.parametrize("key", ["data.stream_train", "data.stream_validation"])
def test_stream_files_missing_are_named_by_their_key(key: str, tmp_path) -> None:
    """It said only "input '<path>': no such file"; the user edits the config key, so the error names it."""
    shards = build_fixture_dataset(tmp_path / "shards")  # only for its tokenizer.json
    fixture = REPO_ROOT / "tests" / "fixtures" / "data"
    files = {"data.stream_train": str(fixture / "kjv_sample.jsonl"), key: str(tmp_path / "missing" / "*.jsonl")}
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "run.sh", "data.source=stream", f"data.tokenizer={shards / 'tokenizer.json'}",
                           f"model.vocab_size={FIXTURE_VOCAB_SIZE}", *(f"{k}={v}" for k, v in files.items()),
                           f"run.out_dir={tmp_path}", "run.steps=1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}=") and "no such file" in lines[0], proc.stderr


@pytest.mark.distributed
def test_bad_stream_validation_file_fails_before_training(tmp_path) -> None:
    """Streamed files are read lazily: a validation file without the text field surfaced only at the final
    validation, after every step was trained and saved (and a rerun then had nothing to do)."""
    shards = build_fixture_dataset(tmp_path / "shards")  # only for its tokenizer.json
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field here"}\n')
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "run.sh", "data.source=stream", f"data.tokenizer={shards / 'tokenizer.json'}",
                           f"model.vocab_size={FIXTURE_VOCAB_SIZE}",
                           f"data.stream_train={REPO_ROOT / 'tests' / 'fixtures' / 'data' / 'kjv_sample.jsonl'}",
                           f"data.stream_validation={bad}", f"run.out_dir={tmp_path}", "run.name=bad", "run.steps=1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "'text'" in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()  # nothing trained, no run directory
    # the ranks check it too, for launchers that check nothing first (torchrun, `deepspeed run.sh`)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "run.sh",
                            *proc.args[2:]], cwd=REPO_ROOT, env={**_env(), **env}, capture_output=True, text=True,
                           timeout=300)
    assert ranks.returncode != 0 and f"error: {bad}:1" in ranks.stderr, ranks.stderr[-3000:]
    assert "step " not in ranks.stdout and not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_four_ranks_zero3_ep2_split_experts_over_the_expert_data_parallel_group(tmp_path) -> None:
    """EP 2 on 4 ranks: each bank's EP shard is ZeRO-3-partitioned over the 2 ranks of its
    expert-data-parallel group, tied banks once; losses equal the plain-PyTorch reference of 4 ranks."""
    from trainer.reference import reference_run

    args = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=2", "run.steps=4", "run.log_every=1",
            "run.eval_batches=1", "schedule.warmup_steps=1", f"run.out_dir={tmp_path}", "run.name=four"]
    proc = subprocess.run([sys.executable, "run.sh", *args], cwd=REPO_ROOT, env={**_env(), "TIEDMOE_CPU_RANKS": "4"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "four" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["followers_share_leader_bank"]
    measured, untied = summary["expert_elements_per_rank_measured"], summary["expert_elements_per_rank_if_untied"]
    bank_shard = 8 // 2 * 3 * 32 * 64 // 2  # 4 local experts x (w1, w2, w3) x F x D, halved by ZeRO-3 over 2 ranks
    assert measured == [6 * bank_shard] * 4 and untied == 8 * bank_shard
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "four" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    reference = reference_run(load_config(None, args), 4).losses
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5, (losses, reference)


def test_paused_time_is_left_out_of_the_step_time() -> None:
    """Validation and checkpoint saves ran inside the next log interval, so its step_time_s, tokens_per_s
    and MFU counted them as training time (860 ms a step against 375 ms, one log interval after a save)."""
    import time

    from trainer.metrics import Progress

    progress = Progress.__new__(Progress)  # only the interval clock: no session needed
    progress.interval_start = start = time.perf_counter()
    with progress.paused():
        time.sleep(0.05)
    assert progress.interval_start - start >= 0.05
    with pytest.raises(RuntimeError), progress.paused():  # a failing validation still shifts the clock
        raise RuntimeError("validation failed")
    assert progress.interval_start - start >= 0.05
