"""2-rank worker for tests/test_checkpoint.py: a straight run vs the same run stopped and resumed."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import load_config  # noqa: E402
from trainer.train import train  # noqa: E402

out_dir, result_path = sys.argv[1], sys.argv[2]
MUON = ["optim.name=muon", "optim.lr=2e-2"]
# (ZeRO stage, expert-parallel size, extra overrides): Muon resumes its momentum, partitioned at ZeRO-3.
CELLS = ((3, 2, []), (2, 1, []), (3, 2, MUON))
if sys.argv[3:] == ["muon"]:  # the slow set: Muon under every other DeepSpeed optimizer wrapper
    CELLS = ((1, 2, MUON), (2, 1, MUON), (0, 2, MUON + ["run.precision=bf16"]), (1, 1, MUON + ["run.precision=bf16"]),
             (3, 2, MUON + ["run.precision=bf16"]))
# ZeRO-Offload of the optimizer (the default torch AdamW on the CPU partitions): each cell also trains without it
OFFLOAD = sys.argv[3:] == ["offload"]
if OFFLOAD:
    CELLS = ((2, 1, []), (3, 2, []))
results = {}
for zero, ep, extra in CELLS:
    ds_config = f"ds_configs/zero{zero}.json"
    if OFFLOAD:
        ds_config = f"{out_dir}/zero{zero}_offload.json"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(ds_config).write_text(json.dumps({"zero_optimization": {"stage": zero,
                                                                     "offload_optimizer": {"device": "cpu"}}}))
    base = extra + ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=4", "batch.grad_accum=2",
            "run.log_every=1000", f"parallel.ds_config={ds_config}",
            f"parallel.expert_parallel_size={ep}", "run.steps=6", f"run.out_dir={out_dir}", "run.eval_batches=1",
            "schedule.warmup_steps=2", "run.save_every=2", "run.keep_checkpoints=2"]
    name = f"zero{zero}-ep{ep}" + ("-muon" if extra else "") + ("-bf16" if "run.precision=bf16" in extra else "")
    straight = train(load_config(None, base + [f"run.name={name}-straight"]))
    first = train(load_config(None, base + [f"run.name={name}-split", "run.stop_at_step=3"]))
    second = train(load_config(None, base + [f"run.name={name}-split"]))
    again = train(load_config(None, base + [f"run.name={name}-split"]))  # already complete: no steps
    results[name] = {"straight": straight.losses, "first": first.losses, "second": second.losses,
                     "again": again.losses, "val_straight": straight.val_loss, "val_split": second.val_loss}
    if OFFLOAD:
        plain = [arg for arg in base if not arg.startswith("parallel.ds_config=")]
        plain += [f"parallel.ds_config=ds_configs/zero{zero}.json", f"run.name={name}-plain"]
        results[name]["not_offloaded"] = train(load_config(None, plain)).losses
        continue
    if zero == 3 and not extra:
        # A crash after DeepSpeed wrote step 4's shards but before `latest` moved: resume from step 3.
        from deepspeed.runtime.engine import DeepSpeedEngine

        original = DeepSpeedEngine.save_checkpoint

        def crashing(self, save_dir, tag=None, **kwargs):
            original(self, save_dir, tag=tag, **kwargs)
            if tag == "step00000004":
                raise RuntimeError("simulated crash while saving")

        crash = base + [f"run.name={name}-crash"]
        first = train(load_config(None, crash + ["run.stop_at_step=3"]))
        DeepSpeedEngine.save_checkpoint = crashing
        try:
            train(load_config(None, crash))
            crashed = False
        except RuntimeError:
            crashed = True
        finally:
            DeepSpeedEngine.save_checkpoint = original
        latest_after_crash = (Path(out_dir) / f"{name}-crash" / "checkpoints" / "latest").read_text()
        resumed = train(load_config(None, crash))
        results[name].update(crashed=crashed, latest_after_crash=latest_after_crash,
                             crash_losses=first.losses + resumed.losses)
if int(os.environ["RANK"]) == 0:
    Path(result_path).write_text(json.dumps(results))
from trainer.engine import shutdown  # noqa: E402

shutdown()
