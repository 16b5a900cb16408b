"""The ZeRO-3 settings and the per-step overhead removed in trainer.engine: the settings without starting
ranks, the coalesced post-step gather on 2 CPU ranks (tests/workers/zero3_overhead_worker.py).

The shipped ds_configs/zero3.json is tuned for speed (README "ZeRO-3 settings"); the gather counts in
trainer.parity are measured under ds_configs/zero3_strict.json, where every parameter is fetched on
use, so a test that counts all-gathers can never read 0 because a bank became persistent.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import worker_json

from trainer import engine as eng
from trainer import parity
from trainer.config import REPO_ROOT, load_config


def _zero(path: str) -> dict:
    return json.loads((REPO_ROOT / path).read_text())["zero_optimization"]


def test_gather_counts_are_measured_under_strict_settings() -> None:
    strict = _zero(parity.STRICT_ZERO3)
    assert strict["stage"] == 3
    assert strict["stage3_param_persistence_threshold"] == 0 and strict["stage3_prefetch_bucket_size"] == 0


@pytest.mark.parametrize("path", ["ds_configs/zero3.json", "ds_configs/zero3_strict.json"])
def test_trainer_keeps_the_tie_aware_reuse_distance(path: str) -> None:
    cfg = load_config(None, ["data.source=random", f"parallel.ds_config={path}"])
    settings = eng.deepspeed_config(cfg, cfg.model_config(), world_size=2)
    assert settings["zero_optimization"]["stage3_max_reuse_distance"] == eng.tie_aware_reuse_distance(cfg.model_config())


def test_local_size_comes_from_the_launcher_and_an_explicit_one_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    eng.set_cpu_local_size()
    assert os.environ["LOCAL_SIZE"] == "2"
    monkeypatch.setenv("LOCAL_SIZE", "4")
    eng.set_cpu_local_size()
    assert os.environ["LOCAL_SIZE"] == "4"


def test_cpu_accelerator_device_count_forks_nothing_with_local_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's CPU accelerator must read LOCAL_SIZE instead of running `numactl` (it did: 13 forks a step)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    def no_fork(*args, **kwargs):
        raise AssertionError(f"subprocess started: {args}")

    monkeypatch.setattr(subprocess, "check_output", no_fork)
    monkeypatch.setattr(subprocess, "Popen", no_fork)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert CPU_Accelerator().device_count() == 2


@pytest.fixture(scope="module")
def post_step_gathers(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero3_overhead") / "result.json"
    return worker_json("zero3_overhead_worker.py", [str(out)], out)


@pytest.mark.distributed
@pytest.mark.parametrize("cell", ["zero3-ep2-fp32", "zero3-ep2-bf16", "zero3-ep1-fp32"])
def test_persistent_parameters_are_regathered_in_one_collective_with_identical_results(post_step_gathers, cell):
    """`engine.gather_persistent_parameters_at_once`: DeepSpeed's post-step gather launched one all-gather per
    persistent parameter; the wrapper launches one per partition group (EP 1 adds AutoEP's expert-data-parallel
    group), and every loss is bit-identical."""
    ours, theirs = post_step_gathers[cell]["coalesced"], post_step_gathers[cell]["deepspeed"]
    assert ours["losses"] == theirs["losses"]
    assert ours["persistent"] > 10
    assert theirs["optimizer_step_all_gathers"] >= ours["persistent"] // 2  # one per parameter (not EP-local experts)
    assert ours["optimizer_step_all_gathers"] == ours["partition_groups"] == (1 if "ep2" in cell else 2)


@pytest.mark.distributed
@pytest.mark.parametrize("cell", ["zero3-ep2-fp32", "zero3-ep1-fp32"])
def test_module_hooks_stay_only_where_they_gather(post_step_gathers, cell):
    """`engine.drop_idle_module_hooks`: ZeRO-3's module hooks leave every module whose own parameters are all
    persistent or which has none (on this tiny model that is nearly all of them). What is gathered and reduced
    is unchanged; the autograd graph loses identity nodes, so gradient contributions may be summed in another
    order: the first step is bit-identical, later ones agree to rounding (the parity suite checks the
    shipped engine, hooks dropped, against the plain-PyTorch reference at 1e-5)."""
    dropped, kept = post_step_gathers[cell]["coalesced"], post_step_gathers[cell]["all_hooks"]
    assert kept["module_hooks"] > 4 * 20 and kept["hooked_modules_own_only_persistent"] > 20
    assert dropped["module_hooks"] < kept["module_hooks"] // 4
    assert dropped["hooked_modules_own_only_persistent"] == 0
    assert dropped["losses"][0] == kept["losses"][0]
    assert max(abs(a - b) for a, b in zip(dropped["losses"], kept["losses"])) <= 1e-5

