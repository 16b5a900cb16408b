"""Bad command lines, configs and files give one `error: ...` line naming the culprit, exit 2, no traceback.

Regression tests for the README audit: each case runs a documented command as a user would (a
subprocess) with one bad input, and stops at validation (no ranks start, no model is trained).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_python

REPO_ROOT = Path(__file__).resolve().parent.parent


def _assert_one_error_line(proc: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 2, stderr exactly one `error: ...` line mentioning every one of `names`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])


# --------------------------------------------------------------------------------------------------
# ./run.sh (trainer.cli): configs, overrides, flags


def test_run_sh_help_prints_usage_and_exits_0():
    proc = run_python(["run.sh", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ./run.sh [CONFIG.yaml] [key=value ...]")


@pytest.mark.parametrize("argv, flag", [(["--steps", "5"], "--steps"), (["--steps=5"], "--steps"), (["-x"], "-x")])
def test_run_sh_unknown_flag_is_named(argv, flag):
    _assert_one_error_line(run_python(["run.sh", *argv]), f"unknown flag {flag}")


def test_run_sh_duplicate_yaml_key_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: the first section would be dropped without a word."""
    config = tmp_path / "dup.yaml"
    config.write_text("run:\n  steps: 3\nrun:\n  steps: 4\n")
    _assert_one_error_line(run_python(["run.sh", str(config)]), str(config), "duplicate key 'run'")


def test_run_sh_config_that_is_a_directory_says_so(tmp_path):
    _assert_one_error_line(run_python(["run.sh", str(tmp_path)]), str(tmp_path), "is a directory")


@pytest.mark.parametrize("text, where", [("[1, 2]", "the file"), ('{"zero_optimization": 3}', "zero_optimization")])
def test_run_sh_ds_config_that_is_no_json_object(tmp_path, text, where):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(text)
    _assert_one_error_line(run_python(["run.sh", f"parallel.ds_config={ds_config}"]), "parallel.ds_config", where)


@pytest.mark.parametrize("stage, key, value, says", [(3, "reduce_scatterr", "true", "Extra inputs"),
                                                     (1, "overlap_comm", '"maybe"', "valid boolean")])
def test_run_sh_ds_config_deepspeed_refuses_names_the_file(tmp_path, stage, key, value, says):
    """DeepSpeed's schema check ran inside the ranks (zero.Init at ZeRO-3, initialize below): its error named
    a pydantic class, not the file the user has to fix; and rank 0 leaving with it while rank 1 still connected
    its gloo group gave rank 1 a 'Connection reset by peer' traceback (CI, now and then). The launcher checks it
    before any rank starts: no run folder is made."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(f'{{"zero_optimization": {{"stage": {stage}, "{key}": {value}}}}}')
    _assert_one_error_line(run_python(["run.sh", f"parallel.ds_config={ds_config}", "run.steps=1", "data.source=random",
                                       f"run.out_dir={tmp_path}/runs"]), f"parallel.ds_config={ds_config}", key, says)
    assert not (tmp_path / "runs").exists()


def test_ranks_check_the_ds_config_before_any_process_group(tmp_path):
    """Under another launcher (`deepspeed run.sh`, torchrun) every rank refuses it alike, before a collective
    that a peer's early exit could break."""
    from trainer.launch import torchrun_command
    ds_config = tmp_path / "ds.json"
    ds_config.write_text('{"zero_optimization": {"stage": 3, "reduce_scatterr": true}}')
    cmd, env = torchrun_command(2, ["run.sh", f"parallel.ds_config={ds_config}", "data.source=random",
                                    f"run.out_dir={tmp_path}/runs"], {**os.environ, "DS_ACCELERATOR": "cpu"})
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("error: parallel.ds_config=")]
    assert refusals and "reduce_scatterr" in refusals[0], proc.stderr[-3000:]  # torchrun may stop one first
    assert "Connection reset" not in proc.stderr and "DistNetworkError" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # rank 0 makes the run folder after the process group exists


@pytest.mark.parametrize("settings, names, args", [
    ('"zero_optimization": {"stage": 1}, "steps_per_print": "x"', ["steps_per_print='x'", "a positive integer"], []),
    ('"zero_optimization": {"stage": 1}, "steps_per_print": 0', ["steps_per_print=0", "a positive integer"], []),
    ('"zero_optimisation": {"stage": 3}', ["'zero_optimisation'", "did you mean 'zero_optimization'"], []),
    ('"zero_optimization": {"stage": 1}, "wall_clock_breakdwn": true', ["'wall_clock_breakdwn'",
                                                                        "did you mean 'wall_clock_breakdown'"], []),
    ('"wall_clock_breakdown": "yes"', ["wall_clock_breakdown='yes'", "true or false"], []),
    ('"flops_profiler": 1', ["flops_profiler=1", "a JSON object"], []),
    ('"elasticity": {"enabled": true}', ["elasticity", "removed"], []),  # DeepSpeed's own refusal, named
    ('"bfloat16": {"enabled": true}', ["'bfloat16'", "set by the trainer"], []),  # bf16's old name
    # DeepSpeed's own value check: its ValueError named no file
    ('"zero_optimization": {"stage": 1}, "gradient_allreduce_op": "max"', ["Invalid gradient_allreduce_op"], []),
    ('"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}',
     ["data_types.grad_accum_dtype='bf16'"], ["run.precision=bf16"]),  # the trainer's fp32 replaced it
    # blocks DeepSpeed reads without a schema: a TypeError traceback from the launcher, or an error naming no key
    ('"zero_optimization": {"stage": 3}, "flops_profiler": {"enabled": "maybe"}',
     ["flops_profiler.enabled='maybe'", "true or false"], []),
    ('"zero_optimization": {"stage": 3}, "aio": {"block_size": "big"}', ["aio.block_size='big'", "an integer"], []),
    ('"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "bogus"}',
     ["data_types.grad_accum_dtype='bogus'", "fp32"], []),
    ('"zero_optimization": {"stage": 3}, "checkpoint": {"tag_validation": 5}',
     ["DeepSpeed refuses it", "AttributeError"], []),
    # offload with DeepSpeed's CPU Adam forced: the trainer steps a torch optimizer (ZeRORuntimeException in the ranks)
    ('"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": true',
     ["zero_force_ds_cpu_optimizer=true", "remove it"], []),
])
def test_run_sh_ds_config_top_level_key_or_type_is_refused(tmp_path, settings, names, args):
    """DeepSpeed ignores a top-level key it does not read (`zero_optimisation` trained at ZeRO 0), and stores top-level
    scalars as given: "steps_per_print": "x" was a TypeError traceback inside the ranks (exit 1), after the run
    folder was made. Now one line from the launcher, before any rank starts."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(f"{{{settings}}}")
    proc = run_python(["run.sh", f"parallel.ds_config={ds_config}", "run.steps=1", "data.source=random",
                       f"run.out_dir={tmp_path}/runs", *args])
    _assert_one_error_line(proc, "parallel.ds_config", str(ds_config), *names)
    assert not (tmp_path / "runs").exists()


def test_ds_config_keys_deepspeed_reads_all_pass(tmp_path):
    """The check refuses only what DeepSpeed would drop or choke on: every shipped ds_config and YAML config, and
    top-level keys of each kind (null where DeepSpeed's default is null, an integer where it wants a number)."""
    from trainer.config import load_config
    from trainer.engine.ds_config import check_deepspeed_config
    for path in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        for precision in ("fp32", "bf16"):
            check_deepspeed_config(load_config(None, [f"parallel.ds_config={path}", f"run.precision={precision}"])
                                   .for_world(2))
    for path in sorted((REPO_ROOT / "trainer" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        check_deepspeed_config(cfg.for_world(8 if cfg.batch.global_batch_tokens else cfg.parallel.expert_parallel_size))
    ds_config = tmp_path / "ds.json"
    ds_config.write_text('{"zero_optimization": {"stage": 2}, "steps_per_print": null, "gradient_predivide_factor": 2, '
                         '"communication_data_type": "fp32", "flops_profiler": {"enabled": false}, '
                         '"dump_state": false, "data_types": {"grad_accum_dtype": "fp32"}}')
    check_deepspeed_config(load_config(None, [f"parallel.ds_config={ds_config}", "run.precision=bf16"]).for_world(2))


@pytest.mark.parametrize("zero", ['"offload_optimizer": {"device": "cpu"}', '"cpu_offload": true'])
def test_optimizer_offload_lets_deepspeed_take_the_torch_optimizer(tmp_path, zero):
    """DeepSpeed refused the trainer's torch AdamW on offloaded partitions (a ZeRORuntimeException traceback inside
    the ranks) unless `zero_force_ds_cpu_optimizer` is false; the trainer sets it where the optimizer is offloaded."""
    from trainer.config import load_config
    from trainer.engine.ds_config import deepspeed_config
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(f'{{"zero_optimization": {{"stage": 2, {zero}}}}}')
    cfg = load_config(None, [f"parallel.ds_config={ds_config}", "data.source=random"])
    assert deepspeed_config(cfg, cfg.model_config(), 2)["zero_force_ds_cpu_optimizer"] is False
    plain = load_config(None, ["parallel.ds_config=ds_configs/zero2.json", "data.source=random"])
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(plain, plain.model_config(), 2)


@pytest.mark.parametrize("block", ['"cpu"', '["cpu"]'])
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_offload_block_of_the_wrong_type_is_one_line_under_every_optimizer(tmp_path, block, optim):
    """Muon's offload check read the block with `.get`: a string or list was an AttributeError traceback (exit 1),
    where AdamW had DeepSpeed's schema refuse it in one line."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(f'{{"zero_optimization": {{"stage": 2, "offload_optimizer": {block}}}}}')
    proc = run_python(["run.sh", f"parallel.ds_config={ds_config}", "run.steps=1", "data.source=random",
                       f"optim.name={optim}", f"run.out_dir={tmp_path}/runs"])
    _assert_one_error_line(proc, f"parallel.ds_config={ds_config}", "offload_optimizer", "DeepSpeed refuses it")


def test_muon_refuses_deprecated_cpu_offload_too(tmp_path):
    """DeepSpeed still reads `cpu_offload: true` as optimizer offload, which Muon's check let through."""
    from trainer.config import load_config
    ds_config = tmp_path / "ds.json"
    ds_config.write_text('{"zero_optimization": {"stage": 2, "cpu_offload": true}}')
    with pytest.raises(ValueError, match=r"optim.name='muon': .*zero_optimization.cpu_offload; Muon is tested"):
        load_config(None, ["optim.name=muon", f"parallel.ds_config={ds_config}"])


def test_nvme_offload_without_async_io_is_refused(tmp_path):
    """NVMe offload needs DeepSpeed's async_io op; where it cannot load (a CPU install: no libaio, ops not built) the
    ranks failed with a RuntimeError traceback from its JIT load."""
    from trainer.engine.ds_config import _async_io_loads
    if _async_io_loads():
        pytest.skip("this DeepSpeed install loads async_io")
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(f'{{"zero_optimization": {{"stage": 3, "offload_optimizer": {{"device": "nvme", '
                         f'"nvme_path": "{tmp_path}"}}}}}}')
    proc = run_python(["run.sh", f"parallel.ds_config={ds_config}", "run.steps=1", "data.source=random",
                       f"run.out_dir={tmp_path}/runs"])
    _assert_one_error_line(proc, f"parallel.ds_config={ds_config}", "offload_optimizer.device='nvme'", "async_io")
    assert not (tmp_path / "runs").exists()


def test_ds_config_top_level_types_cover_what_deepspeed_reads():
    """The hand list of top-level scalar types names only keys the installed DeepSpeed reads (found by letting its
    parser run), and every other key it reads takes a JSON object (a section)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from trainer.config import TRAINER_OWNED_DS_KEYS
    from trainer.engine.ds_config import _SCALAR_TYPES, _removed_keys, deepspeed_reads
    reads = deepspeed_reads()
    assert {"zero_optimization", "steps_per_print", "wall_clock_breakdown", "flops_profiler"} <= reads
    assert set(_SCALAR_TYPES) <= reads and TRAINER_OWNED_DS_KEYS <= reads
    assert "zero_optimisation" not in reads and _removed_keys()
    batch = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    for section in sorted(reads - set(_SCALAR_TYPES) - _removed_keys() - TRAINER_OWNED_DS_KEYS):
        DeepSpeedConfig({**batch, section: {}})  # an empty object is each section's defaults


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_bad_command_line_under_another_launcher_is_one_line(tmp_path, launcher):
    """Under torchrun or `deepspeed run.sh` every rank printed the same refusal: one `error:` line per rank (8 on
    an 8-GPU node; 4 CPU ranks here). Local rank 0 prints it; the launcher's own report around it is the launcher's."""
    from trainer.launch import _free_port, torchrun_command
    args = ["run.sh", "run.stepz=3", f"run.out_dir={tmp_path}/runs"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if launcher == "torchrun":
        cmd, env = torchrun_command(4, args, env)
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "4", "--master_port",
               str(_free_port()), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == (2 if launcher == "deepspeed" else 1), proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: run.stepz: unknown key"), proc.stderr[-3000:]


def test_a_world_size_error_under_the_deepspeed_command_is_one_line(tmp_path):
    """Errors that depend on the world size (known only inside the ranks under `deepspeed run.sh`) were printed
    by every rank: they are alike on every rank, so local rank 0 prints them."""
    from trainer.launch import _free_port
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
           str(_free_port()), "run.sh", "data.source=random", "parallel.expert_parallel_size=4",
           f"run.out_dir={tmp_path}/runs"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "parallel.expert_parallel_size=4" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_a_stop_before_training_under_another_launcher_is_said_by_local_rank_0(local_rank, monkeypatch, capsys):
    """`deepspeed run.sh` stops every rank when one fails: a rank still starting up (slower, on a loaded machine)
    printed 'interrupted ...' beside its peer's one-line error (the world-size test above, flaky under load)."""
    from trainer import cli

    def stopped(*_args):
        raise KeyboardInterrupt

    def exits(code):
        raise SystemExit(code)

    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "2" if key == "WORLD_SIZE" else local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.delenv(cli.ERROR_DIR_ENV, raising=False)
    monkeypatch.setattr(cli, "_run", stopped)
    monkeypatch.setattr(cli.os, "_exit", exits)
    monkeypatch.setattr(cli.signal, "signal", lambda *_a: None)  # this test process keeps its own handlers
    with pytest.raises(SystemExit) as stop:
        cli.main(["data.source=random"])
    err = capsys.readouterr().err
    assert stop.value.code == 130
    assert err.strip() == ("" if local_rank == "1" else f"error: {cli.INTERRUPTED}"), err


def test_a_rank_failing_after_a_peer_reported_is_quiet(tmp_path, monkeypatch):
    """The launcher prints the first rank's one-line error; a peer whose collective broke because that rank
    left would add a traceback that hides it."""
    from trainer import cli
    monkeypatch.setenv(cli.ERROR_DIR_ENV, str(tmp_path))
    assert not cli._peer_reported()
    (tmp_path / "rank00000.txt").write_text("error: x\n")
    assert cli._peer_reported()


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "''", ".."])
def test_run_sh_run_name_must_be_a_plain_folder_name(name):
    _assert_one_error_line(run_python(["run.sh", f"run.name={name}"]), "run.name=")


# --------------------------------------------------------------------------------------------------
# trainer.export / trainer.reshard / trainer.evaluate


def _run_dir_with_bad_config(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: [1, 2\n")  # YAML's own message spans several lines
    return run_dir


@pytest.mark.parametrize("tol", ["-1", "0", "nan"])
def test_export_tol_must_be_positive(tmp_path, tol):
    """A tolerance no logit difference can meet used to export, fail parity and exit 1."""
    _assert_one_error_line(run_python(["-m", "trainer.export", str(tmp_path), "--tol", tol]), "--tol=")


def test_reshard_bad_config_yaml_is_one_line(tmp_path):
    run_dir = _run_dir_with_bad_config(tmp_path)
    _assert_one_error_line(run_python(["-m", "trainer.reshard", str(run_dir)]), str(run_dir / "config.yaml"),
                           "invalid YAML")


@pytest.mark.parametrize("tag", ["../checkpoints", "step00000099", ""])
def test_reshard_tag_must_name_a_checkpoint_folder(tmp_path, tag):
    """'--tag ../x' would have written layout_free.pt into another folder of the run."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step00000002").mkdir(parents=True)
    (run_dir / "config.yaml").write_text((REPO_ROOT / "trainer" / "configs" / "default.yaml").read_text())
    _assert_one_error_line(run_python(["-m", "trainer.reshard", str(run_dir), "--tag", tag]), f"--tag {tag!r}",
                           "checkpoint folder")


def test_reshard_bad_flag_is_one_line():
    _assert_one_error_line(run_python(["-m", "trainer.reshard", "runs/x", "--tga", "step1"]), "--tga")


def test_evaluate_run_without_checkpoint_names_what_to_pass(tmp_path):
    """trainer.evaluate has no --tag: the hint names the checkpoint directory it takes instead."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((REPO_ROOT / "trainer" / "configs" / "default.yaml").read_text())
    proc = run_python(["-m", "trainer.evaluate", str(run_dir), "--tasks", "none"])
    _assert_one_error_line(proc, "no complete checkpoint", f"trainer.evaluate {run_dir / 'checkpoints'}/TAG")


@pytest.mark.parametrize("text", ['{"validation": 1}', '{"validation": {"ce": 1.0}, "tag": "s"}', "[1, 2]"])
def test_evaluate_compare_foreign_json_is_named(tmp_path, text):
    result = tmp_path / "result.json"
    result.write_text(text)
    _assert_one_error_line(run_python(["-m", "trainer.evaluate", "compare", str(result)]), str(result),
                           "not a trainer.evaluate result")


# --------------------------------------------------------------------------------------------------
# trainer.memory (compare / plan / measure) and models.summary


def test_memory_compare_report_that_is_no_object(tmp_path):
    (tmp_path / "memory_report.json").write_text("[]")
    _assert_one_error_line(run_python(["-m", "trainer.memory", "compare", str(tmp_path)]),
                           str(tmp_path / "memory_report.json"), "not a memory report")


def test_memory_plan_takes_key_value_after_the_flags():
    """The README writes `plan PRESET --gpus N --gpu-mem-gib M ... [key=value ...]`: overrides come last."""
    plan = ["-m", "trainer.memory", "plan", "olmoe_tiny", "--gpus", "2", "--gpu-mem-gib", "8"]
    proc = run_python([*plan, "tie_group_size=2"])
    assert proc.returncode == 0, proc.stderr
    proc = run_python([*plan, "bogus=1"])
    _assert_one_error_line(proc, "model.bogus")


@pytest.mark.parametrize("flags, names", [
    (["--gpu-mem-gib", "inf"], "--gpu-mem-gib=inf"),
    (["--gpu-mem-gib", "8", "--reserve-gib", "nan"], "--reserve-gib=nan"),
    (["--gpu-mem-gib", "8", "--reduce-bucket", "0"], "--reduce-bucket=0"),
])
def test_memory_plan_non_finite_or_zero_sizes(flags, names):
    _assert_one_error_line(run_python(["-m", "trainer.memory", "plan", "olmoe_tiny", "--gpus", "2", *flags]), names)


def test_memory_plan_bad_config_yaml_is_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: [1, 2\n")
    proc = run_python(["-m", "trainer.memory", "plan", str(config), "--gpus", "2", "--gpu-mem-gib", "8"])
    _assert_one_error_line(proc, str(config), "invalid YAML")


def test_memory_plan_missing_target_is_the_only_complaint():
    proc = run_python(["-m", "trainer.memory", "plan", "--gpus", "2", "--gpu-mem-gib", "8"])
    _assert_one_error_line(proc, "required: PRESET_OR_CONFIG")
    assert "overrides" not in proc.stderr


def test_memory_measure_bad_override_after_json_is_named(tmp_path):
    proc = run_python(["-m", "trainer.memory", "measure", "run.stepz=1", "--json", str(tmp_path / "m.json")])
    _assert_one_error_line(proc, "run.stepz")


def test_memory_measure_layout_the_two_ranks_cannot_hold_is_refused_first(tmp_path):
    """EP 4 on the 2 CPU ranks was an error printed by every rank, then torchrun's ChildFailedError dump, exit 1."""
    proc = run_python(["-m", "trainer.memory", "measure", "parallel.expert_parallel_size=4", "--json",
                       str(tmp_path / "m.json")])
    _assert_one_error_line(proc, "parallel.expert_parallel_size=4")


@pytest.mark.parametrize("command", [["measure"], ["plan", "olmoe_tiny", "--gpus", "2", "--gpu-mem-gib", "8"]])
def test_memory_json_that_is_a_directory_is_refused_first(tmp_path, command):
    """It was an IsADirectoryError traceback (exit 1) once the result was there: after the ranks measured."""
    proc = run_python(["-m", "trainer.memory", *command, "--json", str(tmp_path)])
    _assert_one_error_line(proc, f"argument --json: '{tmp_path}' is a folder")


def test_summary_without_arguments_is_one_line_on_stderr():
    proc = run_python(["-m", "models.summary"])
    _assert_one_error_line(proc, "required: preset")
    assert proc.stdout == ""


def test_summary_takes_key_value_after_the_flags():
    proc = run_python(["-m", "models.summary", "olmoe", "--world", "64", "tie_group_size=4", "--ep", "8"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "olmoe tie_group_size=4"


# --------------------------------------------------------------------------------------------------
# trainer.parity, data_prep.build, benchmarks/*.py: all checked before any rank starts
# (the timing benchmarks and trainer.bench: tests/test_benchmarks_cli.py)


@pytest.mark.parametrize("argv, names", [(["--steps", "0"], ["--steps=0"]), (["--tol", "nan"], ["--tol=nan"]),
                                         (["--cells", "gpu1", "--world", "0"], ["--world=0"])])
def test_parity_refuses_counts_below_one_and_bad_tolerance(argv, names):
    _assert_one_error_line(run_python(["-m", "trainer.parity", *argv]), *names)


@pytest.mark.parametrize("argv, world", [(["--cells", "gpu1"], 1), (["--cells", "gpu1", "--world", "2"], 2),
                                         (["--cells", "quick"], 2), ([], 2)])
def test_parity_world_follows_the_cells(monkeypatch, argv, world):
    """`--cells gpu1` without `--world 1` ran the one-rank cells on 2 ranks (and reported them as such)."""
    import trainer.parity as parity

    started = []
    monkeypatch.setattr(parity, "collect_json", lambda args, nproc, gpu, out: started.append(nproc) or 7)
    assert parity.main(argv) == 7  # the ranks' exit code: stops before any comparison
    assert started == [world]


def test_parity_only_matching_no_cell_is_refused():
    """The ranks started, trained nothing and died with a DeepSpeed AssertionError traceback, exit 1."""
    _assert_one_error_line(run_python(["-m", "trainer.parity", "--cells", "muon", "--only", "nomatch"]),
                           "--only=nomatch", "zero3-ep2-tied-muon")


@pytest.mark.parametrize("argv, names", [
    (["-m", "trainer.export", "runs/x", "--out", ""], ("argument --out: '' is empty; expected a directory",)),
    (["-m", "trainer.memory", "compare", "a", "b", "--out", ""], ("argument --out: '' is empty; expected a directory",)),
    (["-m", "trainer.parity", "--cells", "muon", "--only", ""], ("argument --only: '' is empty; expected part of",)),
    (["-m", "models.summary", "olmoe", "tie_group_size="], ("'tie_group_size=': no value after '='",)),
])
def test_empty_values_are_refused(argv, names):
    """`export --out ''` exported over the default export, `memory compare --out ''` wrote into the cwd, `--only ''`
    matched every cell and `tie_group_size=` was refused as `model.tie_group_size=None`, which nobody typed."""
    _assert_one_error_line(run_python(argv), *names)


@pytest.mark.parametrize("argv, names", [(["-m", "trainer.parity", "--cells", "most"], "argument --cells"),
                                         (["-m", "trainer.parity", "--bogus"], "--bogus"),
                                         (["-m", "trainer.export", "runs/x", "--tol", "small"], "argument --tol"),
                                         (["-m", "trainer.evaluate", "runs/x", "--limit", "ten"], "argument --limit"),
                                         (["-m", "trainer.evaluate"], "required: target")])
def test_argparse_refusals_are_one_error_line(argv, names):
    """These three printed argparse's usage block and a `PROG: error:` line; every other tool says `error: ...`."""
    _assert_one_error_line(run_python(argv), names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_parity_gpu_without_a_gpu_is_refused():
    """It ran every cell on CPU under torchrun and labelled the report device 'gpu'."""
    _assert_one_error_line(run_python(["-m", "trainer.parity", "--cells", "quick", "--gpu"]), "--gpu")


def test_data_build_bad_input_exits_2(tmp_path):
    """Bad input is exit 2 everywhere in tiedmoe; the corpus builder said 1."""
    missing = tmp_path / "missing.jsonl"
    proc = run_python(["-m", "data_prep.build", "--input", str(missing), "--out", str(tmp_path / "out"),
                       "--no-progress"])
    _assert_one_error_line(proc, str(missing))


def test_run_sh_data_without_validation_split_fails_before_ranks_start(tmp_path):
    """A data set built with --val-fraction 0 trained every step, then failed at the final validation."""
    from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset

    shards = build_fixture_dataset(tmp_path / "shards", validation_fraction=0.0)
    proc = run_python(["run.sh", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.steps=1",
                       f"run.out_dir={tmp_path / 'runs'}"])
    _assert_one_error_line(proc, str(shards / "manifest.json"), "'validation'")
    assert not (tmp_path / "runs").exists()  # no rank started


@pytest.mark.parametrize("argv, names", [(["--variants", "g0"], "model.tie_group_size=0"),
                                         (["--variants", "foo"], "--variants"),
                                         (["--micro-batch", "0"], "--micro-batch=0"),
                                         (["--budget-gib", "-1"], "--budget-gib=-1"),
                                         (["run.stepz=1"], "run.stepz"),
                                         (["model.tie_group_size=4"], "--variants"),  # replaced by each gN
                                         # a ValueError traceback in every rank, exit 1
                                         (["--world", "1"], "parallel.expert_parallel_size=2")])
def test_equal_memory_checks_before_ranks_start(argv, names):
    _assert_one_error_line(run_python(["benchmarks/equal_memory.py", *argv]), names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_equal_memory_gpu_without_a_gpu_is_refused():
    _assert_one_error_line(run_python(["benchmarks/equal_memory.py", "--gpu", "--world", "2"]), "--gpu")


def test_bench_data_missing_data_dir(tmp_path):
    _assert_one_error_line(run_python(["benchmarks/bench_data.py", "--data-dir", str(tmp_path)]), "--data-dir",
                           "manifest.json")


def test_bench_data_damaged_data_dir(tmp_path):
    """A truncated shard was a DataError traceback, exit 1."""
    from data_prep.testing import build_fixture_dataset

    shards = build_fixture_dataset(tmp_path / "shards")
    shard = shards / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    _assert_one_error_line(run_python(["benchmarks/bench_data.py", "--data-dir", str(shards)]), "--data-dir",
                           str(shard), "truncated")


@pytest.mark.parametrize("argv, names", [(["--steps", "0"], "run.steps=0"), (["run.stepz=1"], "run.stepz"),
                                         # all three variants trained into one run directory
                                         (["run.name=mine"], "run.name=mine"),
                                         # every variant, untied included, trained and labelled g=2
                                         (["model.overrides.tie_group_size=2"], "model.tie_group_size")])
def test_tying_quality_checks_every_variant_first(argv, names):
    _assert_one_error_line(run_python(["benchmarks/tying_quality.py", *argv]), names)


@pytest.mark.parametrize("argv, names", [(["--steps", "0"], "run.steps=0"), (["--seeds", "-1"], "run.seed=-1"),
                                         # each run counted twice: mean +- 0 as if there were no seed noise
                                         (["--seeds", "0", "0"], "--seeds 0 0")])
def test_reproduce_dry_run_refuses_bad_steps_and_seeds(argv, names):
    """--steps 0 was dropped as if not given (the dry run then showed 300-step runs)."""
    _assert_one_error_line(run_python(["benchmarks/reproduce.py", "--dry-run", *argv]), names)


def test_reproduce_dry_run_into_a_closed_pipe_is_quiet():
    """`reproduce.py --dry-run | head -1` ended in a BrokenPipeError traceback, exit 1."""
    proc = subprocess.run(f"{sys.executable} benchmarks/reproduce.py --dry-run | head -1", shell=True, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert proc.stdout.startswith("== untied seed 0") and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("argv", [["-m", "models.summary", "-h"], ["-m", "models.summary", "olmoe"],
                                  ["-m", "models.summary", "olmoe", "--world", "64", "--ep", "8"],
                                  ["-m", "trainer.memory", "plan", "olmoe", "--gpus", "8", "--gpu-mem-gib", "80"],
                                  ["-m", "trainer.evaluate", "compare", "--help"], ["run.sh", "--help"]],
                         ids=" ".join)
def test_output_into_a_closed_pipe_is_quiet(argv):
    """`python -m models.summary -h | head -1` (and `memory plan`'s table) ended in a BrokenPipeError traceback,
    exit 1, when the reader had left before the command printed. Here the reader leaves before Python starts."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and stderr == "", stderr[-3000:]


def test_memory_misspelt_command_is_named():
    """`trainer.memory plna ...` said "override 'plna': expected key=value"."""
    _assert_one_error_line(run_python(["-m", "trainer.memory", "plna", "olmoe"]), "'plna': unknown command",
                           "measure, compare, plan, docs")


def test_evaluate_compare_help():
    """`compare --help` looked for a result file named '--help'."""
    proc = run_python(["-m", "trainer.evaluate", "compare", "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m trainer.evaluate compare"), proc.stderr


def test_evaluate_help_lines_fit_120_columns():
    """`--val-tokens`'s help was one 143-character line, however wide the terminal (argparse wraps at its width)."""
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "1000", "DS_ACCELERATOR": "cpu"})
    options = proc.stdout.split("\noptions:\n", 1)[1].splitlines()
    assert proc.returncode == 0 and [line for line in options if len(line) > 120] == []
    assert any("--val-tokens N" in line for line in options), proc.stdout  # as README spells it


@pytest.mark.parametrize("value", ["0", "-1", "abc", ""])
def test_run_sh_bad_cpu_rank_count_is_named(value):
    """TIEDMOE_CPU_RANKS=0 started no rank and exited 0 (nothing trained); abc gave int()'s message."""
    from trainer.launch import cpu_ranks

    with pytest.raises(ValueError, match=f"TIEDMOE_CPU_RANKS={value!r}: expected a positive integer"):
        cpu_ranks(value)
    assert cpu_ranks("3") == 3


def test_run_sh_relative_config_is_the_callers(tmp_path, monkeypatch):
    """run.sh changes to the repo root before Python starts: `../run.sh my.yaml` from another folder said
    'config file my.yaml: not found'. Paths relative to the repo root keep working."""
    from trainer.cli import CALLER_CWD_ENV, split_args

    (tmp_path / "my.yaml").write_text("run:\n  steps: 3\n")
    monkeypatch.setenv(CALLER_CWD_ENV, str(tmp_path))
    assert split_args(["my.yaml", "run.steps=2"]) == (str(tmp_path / "my.yaml"), ["run.steps=2"])
    assert split_args(["trainer/configs/tiny_qwen3.yaml"]) == ("trainer/configs/tiny_qwen3.yaml", [])


def test_run_sh_shipped_config_from_another_folder_under_a_launcher(tmp_path):
    """A launcher started outside the repo (`deepspeed /repo/run.sh trainer/configs/x.yaml`, torchrun alike) runs
    run.sh as Python in the caller's folder: the README's repo-relative config said 'config file ...: not found'
    on every rank. Here the command line is read (and refused for its bad key) before any rank starts."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TIEDMOE_CALLER_CWD")}
    env.update(DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run.sh"), "trainer/configs/tiny_untied.yaml", "run.stepz=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    _assert_one_error_line(proc, "run.stepz: unknown key")


def test_a_refusal_by_deepspeed_in_the_launcher_prints_nothing_else(tmp_path):
    """The launcher's checks import DeepSpeed, which printed its 'Setting accelerator to CPU' warning on stdout
    beside the one error line (the launcher set DS_ACCELERATOR only for its ranks)."""
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3, "bogus_knob": 1}}')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    proc = subprocess.run([sys.executable, "run.sh", f"parallel.ds_config={bad}", f"run.out_dir={tmp_path}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    _assert_one_error_line(proc, "parallel.ds_config", "bogus_knob")
    assert proc.stdout == ""


def test_run_sh_config_with_integer_and_string_unknown_keys_is_named(tmp_path):
    """`run: {1: 2, foo: 3}` was a TypeError traceback (sorting keys of mixed types), in run.sh and trainer.memory."""
    config = tmp_path / "mixed.yaml"
    config.write_text("run: {1: 2, foo: 3}\n")
    _assert_one_error_line(run_python(["run.sh", str(config)]), "run.1: unknown key")
    plan = ["-m", "trainer.memory", "plan", str(config), "--gpus", "8", "--gpu-mem-gib", "80"]
    _assert_one_error_line(run_python(plan), "run.1: unknown key")


def test_run_sh_run_name_longer_than_255_bytes_is_refused():
    """The launcher's look for a checkpoint under runs/<name> was an OSError 'File name too long' traceback."""
    _assert_one_error_line(run_python(["run.sh", "run.name=" + "a" * 300, "run.steps=3"]), "run.name=", "255 bytes")
