"""2-rank worker for tests/test_zero3_settings.py: the coalesced post-step gather of ZeRO-3's persistent parameters.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/zero3_overhead_worker.py OUT.json

Per cell (default cell ZeRO-3 + EP 2, fp32 and bf16, and ZeRO-3 + EP 1): two sessions of the same config,
one as `engine.initialize` builds it (with `gather_persistent_parameters_at_once`) and one with that
wrapper removed (DeepSpeed's own per-parameter gather). Both train the same batches; the worker records
each step's loss and the all-gather collectives one optimizer step launches after its backward. For the
fp32 cells also a third session with every ZeRO-3 module hook kept (`engine.drop_idle_module_hooks` off),
and for each session the module hooks left and how many hooked modules hold only persistent parameters.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as tdist  # noqa: E402

from trainer import engine as eng  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.session import open_session, train_step  # noqa: E402

BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=2", "run.log_every=1000",
        "model.tie_group_size=2", "parallel.ds_config=ds_configs/zero3.json"]
CELLS = {
    "zero3-ep2-fp32": ["parallel.expert_parallel_size=2"],
    "zero3-ep2-bf16": ["parallel.expert_parallel_size=2", "run.precision=bf16"],
    "zero3-ep1-fp32": ["parallel.expert_parallel_size=1"],
}
STEPS = 4

all_gathers = [0]
_all_gather_into_tensor = tdist.all_gather_into_tensor


def counting_all_gather(*args, **kwargs):
    all_gathers[0] += 1
    return _all_gather_into_tensor(*args, **kwargs)


tdist.all_gather_into_tensor = counting_all_gather


def run(overrides: list[str], coalesced: bool, drop_hooks: bool = True) -> dict:
    drop = eng.drop_idle_module_hooks
    if not drop_hooks:
        eng.drop_idle_module_hooks = lambda engine: 0  # what initialize calls: DeepSpeed's hooks all stay
    try:
        s = open_session(load_config(None, BASE + overrides))
    finally:
        eng.drop_idle_module_hooks = drop
    offload = s.engine.optimizer.parameter_offload
    hooked = {id(h.hooks_dict_ref()) for h in offload.forward_hooks + offload.backward_hooks if h.hooks_dict_ref() is not None}
    modules = [m for m in s.engine.module.modules() if id(m._forward_pre_hooks) in hooked or id(m._forward_hooks) in hooked]
    hooks = {"module_hooks": len(offload.forward_hooks) + len(offload.backward_hooks),
             "hooked_modules_own_only_persistent": sum(
                 m is not s.engine.module and all(getattr(p, "ds_persist", False) for p in m.parameters(recurse=False))
                 for m in modules)}
    if not coalesced:
        del s.engine.optimizer._post_step  # the instance wrapper: back to DeepSpeed's own method
    losses, step_gathers = [], []
    for _ in range(STEPS):
        losses.append(train_step(s, s.cfg.optim.lr).loss)
    optimizer_step = s.engine.optimizer.step

    def counted_step(*args, **kwargs):
        before = all_gathers[0]
        out = optimizer_step(*args, **kwargs)
        step_gathers.append(all_gathers[0] - before)
        return out

    s.engine.optimizer.step = counted_step
    losses.append(train_step(s, s.cfg.optim.lr).loss)
    s.close()
    persistent = s.engine.optimizer.persistent_parameters
    groups = {id(p.ds_process_group) for p in persistent if tdist.get_world_size(p.ds_process_group) > 1}
    return {"losses": losses, "optimizer_step_all_gathers": step_gathers[0], "persistent": len(persistent),
            "partition_groups": len(groups), **hooks}


eng.init_distributed()
results = {name: {"coalesced": run(overrides, True), "deepspeed": run(overrides, False)}
           for name, overrides in CELLS.items()}
for name in ("zero3-ep2-fp32", "zero3-ep1-fp32"):
    results[name]["all_hooks"] = run(CELLS[name], True, drop_hooks=False)
if eng.rank() == 0:
    Path(sys.argv[1]).write_text(json.dumps(results))
eng.shutdown()
