"""Trainer configuration: every bad setting stops with one line naming the key, before any process group
starts; YAML/override parsing; the shipped YAML configs; the CLI's error exit; the LR schedules.

Pure Python apart from two `run.sh` subprocesses that stop at config validation (no DeepSpeed ranks).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset
from trainer.config import REPO_ROOT, ScheduleSection, load_config
from trainer.data import make_source
from trainer.schedule import lr_at

CONFIG_DIR = REPO_ROOT / "trainer" / "configs"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def one_line_error(fn, key: str) -> str:
    """Run `fn`, expect ValueError whose message is one line that names `key`."""
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    assert key in message, message
    assert not torch.distributed.is_initialized()  # failed before any process group
    return message


def bad_overrides(overrides: list[str], key: str) -> str:
    message = one_line_error(lambda: load_config(None, overrides), key)
    assert message.startswith(key), message  # the key comes first: "optim.lrr: unknown key ..."
    return message


# --------------------------------------------------------------------------------------------------
# bad configurations


def test_expert_parallel_must_divide_expert_count():
    message = bad_overrides(["parallel.expert_parallel_size=3"], "parallel.expert_parallel_size")
    assert "expert count 8" in message


def test_expert_parallel_must_divide_world_size():
    cfg = load_config(None, ["parallel.expert_parallel_size=4"])  # divides 8 experts
    cfg.for_world(4)
    cfg.for_world(8)
    message = one_line_error(lambda: cfg.for_world(2), "parallel.expert_parallel_size")
    assert "world size 2" in message
    default = load_config()  # EP 2
    one_line_error(lambda: default.for_world(3), "parallel.expert_parallel_size")


def test_global_batch_tokens_sets_grad_accum_from_the_world_size():
    # default: micro 8 x world 2 x seq_len 128 = 2048 tokens per micro-step
    cfg = load_config(None, ["batch.global_batch_tokens=8192"])
    assert cfg.for_world(2).batch.grad_accum == 4
    assert cfg.for_world(4).batch.grad_accum == 2
    assert cfg.batch.grad_accum == 1  # resolving returns a new value; the loaded config is unchanged
    message = one_line_error(lambda: load_config(None, ["batch.global_batch_tokens=2048"]).for_world(4),
                             "batch.global_batch_tokens")
    assert "4096" in message  # micro x world x seq_len on 4 ranks
    load_config(None, ["batch.global_batch_tokens=4096", "batch.grad_accum=2"]).for_world(2)  # agrees
    one_line_error(lambda: load_config(None, ["batch.global_batch_tokens=4096", "batch.grad_accum=3"]).for_world(2),
                   "batch.grad_accum")
    one_line_error(lambda: load_config(None, ["batch.global_batch_tokens=1000"]).for_world(2),
                   "batch.global_batch_tokens")


def test_tied_bank_learning_rate_is_scaled_by_inverse_sqrt_group_size():
    """The paper's tied-LR rule, checked on the optimizer groups (independently of the reference)."""
    import math

    from models.transformer import build_model
    from trainer.optim import param_groups

    cfg = load_config(None, ["data.source=random", "model.tie_group_size=3"])  # 8 layers: [2,3,4] + [5]
    model = build_model(cfg.model_config())
    scale_of = {id(p): g["lr_scale"] for g in param_groups(model, cfg.optim, cfg.model_config()) for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in param_groups(model, cfg.optim, cfg.model_config()) for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 1 / math.sqrt(3) if name.startswith("model.layers.2.mlp.experts.") else 1.0
        assert scale_of[id(p)] == pytest.approx(expected), name
        assert decay_of[id(p)] == (0.0 if p.ndim < 2 else cfg.optim.weight_decay), name
    fixed = load_config(None, ["data.source=random", "model.tie_group_size=3", "optim.tied_lr_scale=0.25"])
    assert {g["lr_scale"] for g in param_groups(build_model(fixed.model_config()), fixed.optim, fixed.model_config())} == {1.0, 0.25}


def _write_ds_config(tmp_path: Path, settings: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    return str(path)


def test_zero_stage_must_be_0_to_3(tmp_path):
    path = _write_ds_config(tmp_path, {"zero_optimization": {"stage": 4}})
    message = bad_overrides([f"parallel.ds_config={path}"], "parallel.ds_config")
    assert "zero_optimization.stage=4" in message
    for stage in range(4):
        path = _write_ds_config(tmp_path, {"zero_optimization": {"stage": stage}})
        load_config(None, [f"parallel.ds_config={path}"])
    path = _write_ds_config(tmp_path, {"zero_optimization": {"stage": True}})  # ran as ZeRO-1 (True == 1)
    assert "zero_optimization.stage=True" in bad_overrides([f"parallel.ds_config={path}"], "parallel.ds_config")


@pytest.mark.parametrize("key, value", [("train_batch_size", 8), ("gradient_accumulation_steps", 2),
                                        ("optimizer", {"type": "Adam"}), ("bf16", {"enabled": True})])
def test_ds_config_must_not_set_trainer_owned_keys(tmp_path, key, value):
    path = _write_ds_config(tmp_path, {"zero_optimization": {"stage": 1}, key: value})
    message = bad_overrides([f"parallel.ds_config={path}"], "parallel.ds_config")
    assert repr(key) in message


def test_missing_ds_config_file(tmp_path):
    missing = tmp_path / "nope.json"
    message = bad_overrides([f"parallel.ds_config={missing}"], "parallel.ds_config")
    assert "not found" in message
    bad_overrides(["parallel.ds_config=ds_configs/zero9.json"], "parallel.ds_config")


def test_shipped_ds_configs_load():
    for path in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        load_config(None, [f"parallel.ds_config=ds_configs/{path.name}"])


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("foo.bar=1", "foo"),
    ("run.stepz=3", "run.stepz"),
    ("model.nonexistent=1", "model.nonexistent"),
    ("model.overrides.nonexistent=1", "model.nonexistent"),
])
def test_unknown_keys_at_any_level(override, key):
    message = bad_overrides([override], key)
    assert "unknown" in message


@pytest.mark.parametrize("overrides, key", [
    (["run.steps.x=3", "run.steps=1"], "run.steps"),
    (["optim.lr.x=1", "optim.lr=1e-3"], "optim.lr"),
    (["run.name=x", "run.name.sub=3"], "run.name.sub"),
])
def test_a_key_given_as_value_and_as_section_is_refused(overrides, key):
    """The later value replaced the section, so the bad sub-key was never checked (and silently dropped)."""
    bad_overrides(overrides, key)


@pytest.mark.parametrize("overrides", [["model.overrides={tie_group_size: 4}", "model.overrides.top_k=1"],
                                       ["model.overrides.top_k=1", "model.overrides={tie_group_size: 4}"],
                                       ["model.top_k=1", "model.overrides={tie_group_size: 4}"]])
def test_a_mapping_value_and_sub_keys_are_joined_in_either_order(overrides):
    cfg = load_config(None, overrides).model_config()
    assert (cfg.tie_group_size, cfg.top_k) == (4, 1)


@pytest.mark.parametrize("override, says", [
    ("run.downstream_tasks=", "run.downstream_tasks has no value: expected a string"),
    ("optim.lr=", "optim.lr has no value: expected a number"),
])
def test_an_empty_value_is_named_as_none_given(override, says):
    """`key=` is null: the error said "run.downstream_tasks=None", a value nobody typed."""
    assert bad_overrides([override], override[:-1]) == says


@pytest.mark.parametrize("section, key", [("run", "name"), ("data", "path"), ("parallel", "ds_config")])
def test_a_nul_byte_in_a_string_is_named_by_its_key(tmp_path, section, key):
    """YAML's "\\0": the run failed with os's bare "embedded null byte", naming no key."""
    path = tmp_path / "nul.yaml"
    path.write_text(f'{section}:\n  {key}: "a\\0b"\n')
    with pytest.raises(ValueError, match=rf"^{section}.{key}='a\\x00b': contains a NUL byte"):
        load_config(path)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\nschedule:\n  warmup: 5\n")
    one_line_error(lambda: load_config(path), "schedule.warmup")


@pytest.mark.parametrize("override, key", [
    ("run.steps=abc", "run.steps"),
    ("run.steps=1.5", "run.steps"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.lr=fast", "optim.lr"),
    ("data.build_if_missing=maybe", "data.build_if_missing"),
    ("model.n_experts=abc", "model.n_experts"),
    ("model.tie_router=1", "model.tie_router"),
    ("model.init_std=big", "model.init_std"),
])
def test_wrong_types(override, key):
    bad_overrides([override], key)


@pytest.mark.parametrize("override, key", [
    ("schedule.kind=linear", "schedule.kind"),
    ("optim.name=lion", "optim.name"),
    ("data.source=web", "data.source"),
    ("run.precision=fp16", "run.precision"),
    ("optim.tied_lr_scale=sqrt_g", "optim.tied_lr_scale"),
    ("model.preset=gpt2", "model.preset"),
])
def test_bad_literals(override, key):
    bad_overrides([override], key)


@pytest.mark.parametrize("override, key", [
    ("run.steps=0", "run.steps"),
    ("optim.lr=0", "optim.lr"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio"),
    ("optim.tied_lr_scale=-1", "optim.tied_lr_scale"),
    ("model.tie_group_size=0", "model.tie_group_size"),
])
def test_bad_values(override, key):
    bad_overrides([override], key)


@pytest.mark.parametrize("override, allowed", [
    ("run.eval_batches=0", "a positive integer"),
    ("run.eval_batches=-1", "a positive integer"),
    ("run.stop_at_step=0", "a positive integer or null"),
    ("run.tokens=-5", "a positive integer or null"),
    ("run.eval_every=-1", "a non-negative integer"),
    ("run.save_every=-2", "a non-negative integer"),
    ("run.log_every=0", "a positive integer"),
    ("run.keep_checkpoints=-1", "a non-negative integer"),
    ("run.seed=-1", "an integer in [0, 2**31)"),
    ("optim.betas=[1.5,2]", "each in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "each in [0, 1)"),
    ("optim.eps=-1", "a positive number"),
    ("optim.eps=0", "a positive number"),
    ("optim.lr=-1e-3", "a positive number"),
    ("optim.lr=.inf", "a finite number"),
    ("optim.lr=.nan", "a finite number"),
    ("optim.weight_decay=-0.1", "a non-negative number"),
    ("optim.grad_clip=-1", "a non-negative number"),
    ("optim.momentum=1.0", "a number in [0, 1)"),
    ("schedule.warmup_steps=-1", "a non-negative integer"),
    ("schedule.decay_fraction=0", "a number in (0, 1]"),
    ("batch.micro_batch_size=0", "a positive integer"),
    ("batch.grad_accum=0", "a positive integer"),
    ("batch.global_batch_tokens=0", "a positive integer or null"),
    ("loss.load_balance_coef=-0.01", "a non-negative number"),
    ("loss.z_loss_coef=-1", "a non-negative number"),
    ("data.seq_len=1", "an integer >= 2"),
    ("parallel.expert_parallel_size=0", "a positive integer"),
    ("model.init_std=-0.02", "a non-negative number"),
    ("model.rope_theta=.inf", "a finite number"),
])
def test_every_number_is_range_checked(override, allowed):
    """Each refusal names the dotted key, the bad value and what is allowed (issue 16)."""
    key, _, value = override.partition("=")
    message = bad_overrides([override], key)
    assert allowed in message, message


@pytest.mark.parametrize("override", ["run.stop_at_step=null", "run.tokens=null", "run.tokens=1", "run.stop_at_step=1",
                                      "optim.betas=[0.0,0.999]", "run.eval_every=0", "run.save_every=0",
                                      "optim.grad_clip=0", "batch.global_batch_tokens=null"])
def test_range_edges_and_nulls_are_accepted(override):
    load_config(None, [override])


def test_stop_at_step_past_the_run_is_refused():
    """run.stop_at_step > the run's length stopped nothing (the run trained to its end): refused at load, and
    with run.tokens (its length known per world size) by for_world, which the launcher runs first."""
    message = bad_overrides(["run.steps=4", "run.stop_at_step=5"], "run.stop_at_step")
    assert "run.stop_at_step=5: expected at most the run's length, run.steps=4" in message, message
    load_config(None, ["run.steps=4", "run.stop_at_step=4"])
    # default: 8 x 128 tokens per rank and step; 2 ranks -> 2048 tokens a step, so 6144 tokens are 3 steps
    cfg = load_config(None, ["run.tokens=6144", "run.stop_at_step=4", "parallel.expert_parallel_size=1"])
    cfg.for_world(1)  # 6 steps on one rank
    message = one_line_error(lambda: cfg.for_world(2), "run.stop_at_step")
    assert "3 steps (run.tokens=6144 on 2 ranks)" in message, message
    cfg = load_config(None, ["run.tokens=6144", "run.stop_at_step=4", "batch.global_batch_tokens=2048"])
    one_line_error(lambda: cfg.for_world(2), "run.stop_at_step")


def test_on_nonfinite_policy():
    assert load_config().run.on_nonfinite == "stop"
    assert load_config(None, ["run.on_nonfinite=skip"]).run.on_nonfinite == "skip"
    assert "['stop', 'skip']" in bad_overrides(["run.on_nonfinite=ignore"], "run.on_nonfinite")


@pytest.mark.parametrize("text, what", [("", "is empty"), ("# only a comment\n", "is empty"), ("{}\n", "is empty"),
                                        ("- a\n- b\n", "holds a list"), ("just words\n", "holds a str")])
def test_empty_or_non_mapping_yaml_file_is_refused(tmp_path, text, what):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    message = one_line_error(lambda: load_config(path), str(path))
    assert message.startswith(f"config file {path}: {what}"), message


def test_seq_len_larger_than_model_max():
    message = bad_overrides(["data.seq_len=1024"], "data.seq_len")  # tiny presets: max_seq_len 512
    assert "max_seq_len=512" in message
    load_config(None, ["data.seq_len=512"])
    load_config(None, ["data.seq_len=1024", "model.max_seq_len=1024"])


@pytest.fixture(scope="module")
def fixture_shards(tmp_path_factory) -> Path:
    return build_fixture_dataset(tmp_path_factory.mktemp("shards"))


def test_data_vocab_larger_than_model_vocab(fixture_shards):
    cfg = load_config(None, [f"data.path={fixture_shards}", "model.vocab_size=256"])
    # named by the key to edit (it named the shards' manifest.json only)
    with pytest.raises(ValueError, match=rf"^model.vocab_size=256: .*data.path='{fixture_shards}' "
                                         rf"\({FIXTURE_VOCAB_SIZE}\); expected at least {FIXTURE_VOCAB_SIZE}") as info:
        make_source(cfg, "train", 0, 1)
    assert "\n" not in str(info.value)
    # A model vocab at least the tokenizer's (padding is fine) reads batches of in-range ids.
    for vocab in (FIXTURE_VOCAB_SIZE, 1024):
        cfg = load_config(None, [f"data.path={fixture_shards}", f"model.vocab_size={vocab}", "data.seq_len=32",
                                 "batch.micro_batch_size=2"])
        batch = make_source(cfg, "train", 0, 1).next_batch()
        assert batch["input_ids"].shape == (2, 32) and batch["labels"].shape == (2, 32)
        assert int(batch["input_ids"].max()) < FIXTURE_VOCAB_SIZE


@pytest.mark.parametrize("tokenizer, what", [("missing.json", "no such file"), ("bad.json", "not a tokenizers JSON")])
def test_stream_tokenizer_error_names_the_config_key(tmp_path, tokenizer, what):
    # The loader's message named the path only ("tokenizer /x.json: no such file"); the user edits data.tokenizer.
    (tmp_path / "train.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "bad.json").write_text("not json")
    cfg = load_config(None, ["data.source=stream", f"data.stream_train={tmp_path / 'train.jsonl'}",
                             f"data.tokenizer={tmp_path / tokenizer}"])
    with pytest.raises(ValueError) as info:
        make_source(cfg, "train", 0, 1)
    assert str(info.value).startswith(f"data.tokenizer='{tmp_path / tokenizer}': ") and what in str(info.value)


# --------------------------------------------------------------------------------------------------
# parsing


def test_exponent_floats_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads `3e-4` (no dot) as a string; the config types it as a float, also in model overrides.
    path.write_text("optim:\n  lr: 3e-4\n  eps: 1e-6\nloss:\n  z_loss_coef: 1e-5\n"
                    "model:\n  preset: olmoe_tiny\n  overrides:\n    init_std: 2e-2\n    rope_theta: 1e4\n")
    cfg = load_config(path)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4
    assert isinstance(cfg.optim.eps, float) and cfg.optim.eps == 1e-6
    assert isinstance(cfg.loss.z_loss_coef, float) and cfg.loss.z_loss_coef == 1e-5
    model = cfg.model_config()
    assert isinstance(model.init_std, float) and model.init_std == 0.02
    assert isinstance(model.rope_theta, float) and model.rope_theta == 1e4

    cfg = load_config(None, ["optim.lr=1e-3", "schedule.min_lr_ratio=5e-2", "optim.betas=[0.9, 0.99]",
                             "model.init_std=1e-2"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-3
    assert cfg.schedule.min_lr_ratio == 0.05
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model_config().init_std == 0.01
    integer_lr = load_config(None, ["optim.lr=1"]).optim.lr
    assert isinstance(integer_lr, float) and integer_lr == 1.0
    assert load_config(None, ["optim.tied_lr_scale=0.5"]).optim.tied_lr_scale == 0.5
    assert load_config(None, ["optim.tied_lr_scale=none"]).optim.tied_lr_scale == "none"


def test_model_shorthand_overrides():
    cfg = load_config(None, ["model.tie_group_size=4", "model.n_experts=16"])
    assert cfg.model.overrides["tie_group_size"] == 4
    assert cfg.model.overrides["n_experts"] == 16
    assert cfg.model_config().tie_group_size == 4
    # the long form is the same thing
    long = load_config(None, ["model.overrides.tie_group_size=4", "model.overrides.n_experts=16"])
    assert long.model_config() == cfg.model_config()
    # model.preset is not a shorthand
    assert load_config(None, ["model.preset=qwen3_moe_tiny"]).model.preset == "qwen3_moe_tiny"
    # later overrides win over the YAML (default.yaml has tie_group_size 2)
    assert load_config().model_config().tie_group_size == 2
    assert load_config(None, ["model.tie_group_size=1"]).model_config().tie_group_size == 1


def test_default_config_matches_defaults_doc():
    cfg = load_config()
    assert cfg.model.preset == "olmoe_tiny" and cfg.model_config().tie_group_size == 2
    assert cfg.parallel.expert_parallel_size == 2 and cfg.parallel.ds_config.endswith("zero3.json")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    model = cfg.model_config()
    assert model.n_experts % cfg.parallel.expert_parallel_size == 0
    assert cfg.data.seq_len <= model.max_seq_len


def test_shipped_yaml_contents():
    cfgs = {p.stem: load_config(p) for p in CONFIG_DIR.glob("*.yaml")}
    assert {"default", "tiny_qwen3", "tiny_deepseek", "tiny_untied", "olmoe", "qwen3_moe",
            "deepseek_moe"} <= set(cfgs)
    assert cfgs["tiny_qwen3"].model.preset == "qwen3_moe_tiny"
    assert cfgs["tiny_deepseek"].model.preset == "deepseek_moe_tiny"
    assert cfgs["tiny_untied"].model_config().tie_group_size == 1
    for name in ("tiny_qwen3", "tiny_deepseek"):
        assert cfgs[name].model_config().tie_group_size == 2
        assert cfgs[name].parallel.expert_parallel_size == 2
    for name in ("tiny_qwen3", "tiny_deepseek", "tiny_untied"):
        assert cfgs[name].parallel.ds_config.endswith("zero3.json")
    for name, ep in (("olmoe", 8), ("qwen3_moe", 4), ("deepseek_moe", 8)):  # Qwen3: 60 experts, so EP 4
        cfg = cfgs[name]
        assert cfg.model.preset == name
        assert cfg.model_config().tie_group_size == 4
        assert cfg.parallel.expert_parallel_size == ep
        assert cfg.parallel.activation_checkpointing and cfg.parallel.ds_config.endswith("zero3_gpu.json")
        assert cfg.run.precision == "bf16" and cfg.run.steps == 30000
        assert (cfg.data.seq_len, cfg.batch.micro_batch_size, cfg.batch.grad_accum) == (2048, 4, 8)
        assert (cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.kind) == (4e-4, 2000, "cosine")
        assert cfg.optim.tied_lr_scale == "inv_sqrt_g"
        cfg.for_world(8)  # a single 8-GPU node


# --------------------------------------------------------------------------------------------------
# the CLI: `run.sh` as Python (what a launcher runs) and as bash (what a user types)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    return env


def _run_sh(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO_ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)


def _python() -> str:
    return str(VENV_PYTHON) if VENV_PYTHON.is_file() else sys.executable


def test_cli_python_bad_key_exits_2_with_one_error_line():
    proc = _run_sh([_python(), "run.sh", "foo.bar=1"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: foo"), proc.stderr
    assert proc.stdout == ""


def test_cli_bash_bad_key_exits_2_with_one_error_line():
    want = subprocess.run(f"sha256sum < {REPO_ROOT / 'requirements.txt'} | cut -c1-16", shell=True,
                          capture_output=True, text=True, check=True).stdout.strip()
    stamp = REPO_ROOT / ".venv" / ".tiedmoe-installed"
    if not VENV_PYTHON.is_file() or not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.skip("the .venv is not set up for this requirements.txt; `bash run.sh` would install it")
    proc = _run_sh(["bash", "run.sh", "foo.bar=1"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: foo"), proc.stderr  # no "setting up" line either


@pytest.mark.parametrize("case", ["empty_yaml", "range"])
def test_cli_empty_config_file_and_out_of_range_number_exit_2_with_one_line(tmp_path, case):
    if case == "empty_yaml":
        (tmp_path / "empty.yaml").write_text("")
        args, names = [str(tmp_path / "empty.yaml")], f"error: config file {tmp_path / 'empty.yaml'}: is empty"
    else:
        args, names = ["run.eval_batches=0"], "error: run.eval_batches=0: expected a positive integer"
    proc = _run_sh([_python(), "run.sh", *args])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(names), proc.stderr


def test_cli_multiline_parser_error_is_one_line():
    proc = _run_sh([_python(), "run.sh", "optim.betas=[0.9"])  # YAML's own message spans several lines
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: override optim.betas"), proc.stderr


def test_cli_vocab_too_small_fails_before_ranks_start(fixture_shards):
    proc = _run_sh([_python(), "run.sh", f"data.path={fixture_shards}", "model.vocab_size=256"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: model.vocab_size=256: "), proc.stderr[-2000:]
    assert "torch.distributed" not in proc.stderr and "step" not in proc.stdout


# --------------------------------------------------------------------------------------------------
# learning-rate schedules


BASE, TOTAL, WARMUP, FLOOR_RATIO = 2.0, 100, 10, 0.1
FLOOR = BASE * FLOOR_RATIO


def _sched(kind: str, warmup: int = WARMUP, decay_fraction: float = 0.2) -> ScheduleSection:
    return ScheduleSection(kind=kind, warmup_steps=warmup, min_lr_ratio=FLOOR_RATIO, decay_fraction=decay_fraction)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_linear_warmup(kind):
    sched = _sched(kind)
    for step in (0, 4, 9):  # first step is lr/W, the last warmup step reaches the base lr
        assert lr_at(step, TOTAL, BASE, sched) == pytest.approx(BASE * (step + 1) / WARMUP)
    assert lr_at(0, TOTAL, BASE, sched) == pytest.approx(BASE / WARMUP)
    assert lr_at(WARMUP - 1, TOTAL, BASE, sched) == pytest.approx(BASE)
    # increasing through warmup
    values = [lr_at(s, TOTAL, BASE, sched) for s in range(WARMUP)]
    assert values == sorted(values)


def test_cosine():
    sched = _sched("cosine")

    def formula(step):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        return FLOOR + (BASE - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    assert lr_at(WARMUP, TOTAL, BASE, sched) == pytest.approx(BASE)  # decay starts at the base lr
    mid = WARMUP + (TOTAL - WARMUP) // 2  # progress 0.5: halfway between base and floor
    assert lr_at(mid, TOTAL, BASE, sched) == pytest.approx((BASE + FLOOR) / 2)
    assert lr_at(TOTAL, TOTAL, BASE, sched) == pytest.approx(FLOOR)  # ends at the floor
    for step in (WARMUP, 20, 37, mid, 80, TOTAL - 1):
        assert lr_at(step, TOTAL, BASE, sched) == pytest.approx(formula(step))
    assert FLOOR < lr_at(TOTAL - 1, TOTAL, BASE, sched) < FLOOR + 0.01 * BASE
    # never below the floor, even past the end
    assert lr_at(TOTAL + 50, TOTAL, BASE, sched) == pytest.approx(FLOOR)
    # no warmup: step 0 is the base lr
    assert lr_at(0, TOTAL, BASE, _sched("cosine", warmup=0)) == pytest.approx(BASE)


def test_wsd():
    sched = _sched("wsd", decay_fraction=0.2)
    decay_steps = 20  # round(100 * 0.2)
    decay_start = TOTAL - decay_steps

    def formula(step):
        if step < decay_start:
            return BASE
        return BASE + (FLOOR - BASE) * min(1.0, (step - decay_start + 1) / decay_steps)

    for step in (WARMUP, 50, decay_start - 1):  # stable phase
        assert lr_at(step, TOTAL, BASE, sched) == pytest.approx(BASE)
    assert lr_at(decay_start, TOTAL, BASE, sched) == pytest.approx(BASE - (BASE - FLOOR) / decay_steps)
    midpoint = decay_start + decay_steps // 2 - 1  # half of the decay done
    assert lr_at(midpoint, TOTAL, BASE, sched) == pytest.approx((BASE + FLOOR) / 2)
    assert lr_at(TOTAL - 1, TOTAL, BASE, sched) == pytest.approx(FLOOR)  # last step reaches the floor
    for step in range(WARMUP, TOTAL):
        assert lr_at(step, TOTAL, BASE, sched) == pytest.approx(formula(step))


def test_constant():
    sched = _sched("constant")
    for step in (WARMUP, 50, TOTAL - 1, TOTAL):
        assert lr_at(step, TOTAL, BASE, sched) == BASE
    assert lr_at(0, TOTAL, BASE, _sched("constant", warmup=0)) == BASE


def test_run_sh_is_valid_bash_and_valid_python():
    """`./run.sh` is read by bash, `deepspeed run.sh` hands it to python: both must parse all of it."""
    import ast

    run_sh = REPO_ROOT / "run.sh"
    assert subprocess.run(["bash", "-n", str(run_sh)], capture_output=True).returncode == 0
    ast.parse(run_sh.read_text())


def test_expert_parallel_size_must_divide_every_layers_expert_count():
    """Narrowed (and widened) layers have their own expert counts; each must split over the EP ranks."""
    with pytest.raises(ValueError, match=r"parallel.expert_parallel_size=2: expected a divisor of the expert count 3"):
        load_config(None, ["data.source=random", "model.n_experts=12", "model.narrow_factor=4", "model.tie_group_size=1"])
    load_config(None, ["data.source=random", "model.n_experts=12", "model.narrow_factor=4", "model.tie_group_size=1",
                       "parallel.expert_parallel_size=1"])


def test_paper_recipe_configs():
    """tiny_paper: the paper's Muon recipe and init with g=2; tiny_paper_narrow: its equal-parameter untied twin."""
    from models.config import layer_plan

    tied, narrow = load_config(CONFIG_DIR / "tiny_paper.yaml"), load_config(CONFIG_DIR / "tiny_paper_narrow.yaml")
    for cfg in (tied, narrow):
        o = cfg.optim
        assert (o.name, o.lr, o.betas, o.grad_clip, o.tied_lr_scale) == ("muon", 2e-2, (0.9, 0.95), 1.0, "inv_sqrt_g")
        assert (o.muon_momentum, o.muon_nesterov, o.muon_weight_decay, o.muon_ns_steps) == (0.95, True, 0.1, 5)
        assert (o.adam_lr_ratio, o.adam_weight_decay) == (0.1, 0.01)
        assert (cfg.schedule.kind, cfg.schedule.min_lr_ratio) == ("cosine", 0.1)
        assert (cfg.loss.load_balance_coef, cfg.loss.z_loss_coef) == (0.01, 1e-4)
        assert cfg.model_config().init == "paper" and cfg.parallel.ds_config.endswith("zero0.json")
        cfg.for_world(2)
    assert tied.model_config().tie_group_size == 2
    assert [p.n_experts for p in layer_plan(narrow.model_config())] == [8, 8, 4, 4, 4, 4, 8, 8]


@pytest.mark.parametrize("override", ["optim.muon_ns_steps=0", "optim.adam_lr_ratio=-1", "optim.muon_momentum=5"])
def test_muon_numbers_are_range_checked_under_any_optimizer(override):
    """Under optim.name=adamw these were accepted and only failed once optim.name=muon joined them."""
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"^{key}="):
        load_config(None, [override])


def test_a_key_given_twice_takes_the_last_value():
    """Documented (README Configuration, ./run.sh --help): tests and tools append overrides to a base list."""
    assert load_config(None, ["run.steps=4", "run.steps=6"]).run.steps == 6
    assert load_config(None, ["model.tie_group_size=4", "model.overrides.tie_group_size=1"]).model.overrides == {
        "tie_group_size": 1}


def test_run_out_dir_that_is_a_file_is_named(tmp_path):
    """It was a NotADirectoryError traceback from rank 0 (exit 1)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, [f"run.out_dir={blocker}"])
    with pytest.raises(ValueError, match=f"^run.out_dir='{blocker}': cannot create the run directory"):
        cfg.make_run_dir()
    assert load_config(None, [f"run.out_dir={tmp_path}", "run.name=r"]).make_run_dir() == tmp_path / "r"


def test_binary_config_or_ds_config_is_named(tmp_path):
    """Both said only "'utf-8' codec can't decode byte 0xff ...", naming neither the file nor the setting."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=f"^config file {blob}: unreadable, expected a UTF-8 YAML file"):
        load_config(blob)
    with pytest.raises(ValueError, match=f"^parallel.ds_config {blob}: unreadable, expected a UTF-8 JSON file"):
        load_config(None, [f"parallel.ds_config={blob}"])


def test_run_tokens_rounds_to_whole_steps_and_says_so():
    # default: 8 x 2 ranks x 128 = 2048 tokens per step; 5000 tokens is 2 steps = 4096 tokens, printed at start
    cfg = load_config(None, ["run.tokens=5000", "run.steps=50"])
    assert cfg.total_steps(2) == 2
    note = cfg.tokens_note(2)
    assert "2 steps of 2,048 tokens = 4,096 tokens, not 5,000" in note and "run.steps=50 is not used" in note
    assert "not 4,096" not in load_config(None, ["run.tokens=4096"]).tokens_note(2)
    assert load_config(None, ["run.tokens=10"]).total_steps(2) == 1  # at least one step
    assert load_config(None, []).tokens_note(2) is None


def test_reference_run_resolves_global_batch_tokens():
    """The plain-PyTorch reference read batch.grad_accum as given: with batch.global_batch_tokens (grad_accum
    derived per world size) it trained one micro-batch per step where the trainer trains two."""
    from trainer.reference import reference_run

    common = ["data.source=random", "data.seq_len=16", "batch.micro_batch_size=2", "model.vocab_size=256",
              "run.steps=2"]
    by_accum = reference_run(load_config(None, common + ["batch.grad_accum=2"]), 2).losses
    by_tokens = reference_run(load_config(None, common + ["batch.global_batch_tokens=128"]), 2).losses
    assert by_tokens == by_accum


def test_a_downstream_task_given_twice_is_refused():
    """It was scored twice and counted twice in the downstream average, as `evaluate --tasks` refuses."""
    with pytest.raises(ValueError, match=r"run.downstream_tasks='arc_easy,piqa, arc_easy': arc_easy is given twice"):
        load_config(None, ["run.downstream_tasks=arc_easy,piqa, arc_easy"])
    load_config(None, ["run.downstream_tasks=arc_easy,piqa"])


@pytest.mark.parametrize("tasks, entry", [("arc_easy,", 2), ("arc_easy,,piqa", 2), ("piqa, ,arc_easy", 2)])
def test_an_empty_downstream_task_entry_is_refused(tasks, entry):
    """`arc_easy,` scored arc_easy only, without a word, where `evaluate --tasks arc_easy,` refuses it."""
    with pytest.raises(ValueError, match=rf"^run.downstream_tasks='{tasks}': entry {entry} is empty"):
        load_config(None, ["run.downstream_every=2", f"run.downstream_tasks={tasks}"])
    load_config(None, ["run.downstream_every=2", "run.downstream_tasks=arc_easy, piqa"])


def test_optimizer_fields_the_optimizer_does_not_read_are_noted():
    """Muon has its own decays: optim.weight_decay under it was dropped without a word."""
    notes = load_config(None, ["optim.name=muon", "optim.weight_decay=0.5", "optim.momentum=0.5",
                               "optim.muon_ns_steps=3"]).unused_optim_notes()
    assert notes == ["note: optim.weight_decay=0.5 is not used by optim.name=muon",
                     "note: optim.momentum=0.5 is not used by optim.name=muon"]
    assert load_config(None, ["optim.name=adamw", "optim.muon_ns_steps=3"]).unused_optim_notes() == [
        "note: optim.muon_ns_steps=3 is not used by optim.name=adamw"]
    for path in sorted((REPO_ROOT / "trainer" / "configs").glob("*.yaml")):  # shipped configs set nothing unused
        assert load_config(path).unused_optim_notes() == [], path.name


@pytest.mark.parametrize("text, key", [
    ("run: {1: 2, foo: 3}\n", "run.1"),  # mixed key types: sorting them was a TypeError traceback
    ("run: {steps: 3}\n1: x\n", "1: unknown key"),
    ("run: {null: 2, true: 3, name: x}\n", "run.None"),
    ("model: {overrides: {1: 2}}\n", "model.overrides.1"),  # from_preset(**{1: 2}): "keywords must be strings"
    ("? [1, 2]\n: 3\n", "found unhashable key"),  # a TypeError from the duplicate-key check
])
def test_non_string_yaml_keys_are_named(tmp_path, text, key):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    one_line_error(lambda: load_config(path), key)


def test_yaml_merge_keys_are_read_as_safe_load_reads_them(tmp_path):
    """`<<: {...}` was refused as 'could not determine a constructor for the tag ...merge'."""
    path = tmp_path / "merge.yaml"
    path.write_text("run: {steps: 3, name: anc}\nschedule:\n  <<: {warmup_steps: 1}\n"
                    "optim:\n  <<: [{lr: 1.0e-3, eps: 1.0e-7}, {lr: 2.0e-3}]\n  lr: 5.0e-4\n")
    cfg = load_config(path)
    assert cfg.schedule.warmup_steps == 1 and cfg.run.steps == 3
    assert cfg.optim.lr == 5e-4 and cfg.optim.eps == 1e-7  # an explicit key overrides a merged one: no repeat


@pytest.mark.parametrize("text, key", [
    ("run:\n  <<: {steps: 3}\n  name: x\n  name: y\n", "duplicate key 'name'"),  # written twice beside a merge
    ("run:\n  <<: {steps: 3, steps: 4}\n", "duplicate key 'steps'"),  # written twice inside the merged mapping
])
def test_a_key_written_twice_is_refused_beside_merges(tmp_path, text, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    one_line_error(lambda: load_config(path), key)


def test_a_chain_of_merges_reads_as_safe_load_reads_it():
    """A mapping that overrides a key it merged, merged again elsewhere, was refused as a duplicate: the loader
    flattens it in place, so checking it a second time saw the key twice."""
    import yaml

    from trainer.config import _UniqueKeyLoader

    text = "b: &b {k: 0}\nx: &x {<<: *b, k: 1}\nd: {<<: *x}\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == yaml.safe_load(text) == {"b": {"k": 0}, "x": {"k": 1},
                                                                                   "d": {"k": 1}}


def test_run_name_longer_than_a_file_name_is_refused():
    """The launcher's look for a checkpoint under runs/<name> ended in OSError 'File name too long' (exit 1)."""
    message = bad_overrides(["run.name=" + "a" * 300], "run.name")
    assert "300 bytes" in message and "at most 255 bytes" in message
    bad_overrides(["run.name=" + "é" * 128], "run.name")  # 256 bytes in UTF-8, 128 characters
    assert load_config(None, ["run.name=" + "a" * 255]).run.name == "a" * 255


@pytest.mark.parametrize("text, key", [
    ('{"zero_optimization": {"stage": 3}, "zero_optimization": {"stage": 1}}', "'zero_optimization'"),
    ('{"zero_optimization": {"stage": 3, "stage": 1}}', "'stage'"),
])
def test_ds_config_key_written_twice_is_refused(tmp_path, text, key):
    """json keeps the last: the first run trained at ZeRO-1 with rc 0."""
    path = tmp_path / "dup.json"
    path.write_text(text)
    message = bad_overrides([f"parallel.ds_config={path}"], "parallel.ds_config")
    assert f"duplicate key {key}" in message and str(path) in message


def test_ds_config_that_is_a_directory_says_so(tmp_path):
    message = bad_overrides([f"parallel.ds_config={tmp_path}"], "parallel.ds_config")
    assert f"{tmp_path} is a directory, expected a JSON file" in message and "not found" not in message


def test_eval_batches_past_the_validation_split_gets_a_note(tmp_path: Path) -> None:
    """run.eval_batches larger than the packed validation split re-read its windows (a new epoch of the loader)
    without a word; the note's counts are the loader's own."""
    from data_prep.loader import TokenWindowLoader
    from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset
    from trainer.data import validation_reuse_note

    shards = build_fixture_dataset(tmp_path / "shards")
    base = ["data.source=shards", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "data.seq_len=32",
            "batch.micro_batch_size=4"]
    per_rank = TokenWindowLoader(shards, "validation", 32, 4, rank=0, world_size=2).windows_per_rank
    fits = per_rank // 4
    assert validation_reuse_note(load_config(None, [*base, f"run.eval_batches={fits}"]), 2) is None
    note = validation_reuse_note(load_config(None, [*base, f"run.eval_batches={fits + 1}"]), 2)
    assert note is not None and note.startswith(f"note: run.eval_batches={fits + 1} x batch.micro_batch_size=4 "
                                                f"reads {4 * (fits + 1)} validation windows per rank; the split has "
                                                f"{per_rank} per rank"), note
    assert note.endswith(f"run.eval_batches={fits} reads each at most once"), note
    assert validation_reuse_note(load_config(None, ["data.source=random", "run.eval_batches=1000"]), 2) is None
