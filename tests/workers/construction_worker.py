"""2-rank worker for tests/test_construction.py: the ZeRO-3 partitioned build against the plain build.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/construction_worker.py OUT.json NAME:ARG,ARG ...

For each cell (overrides comma-separated) it opens a session the way the trainer does (`engine.build`:
`deepspeed.zero.Init` at ZeRO-3) and one whose model was built whole first (`models.transformer.build_model`),
and records per cell: whether the built model arrived partitioned, the largest difference between the
two engines' full initial weights, both sessions' losses over a few optimizer steps, and the logits of the
partitioned build after loading the checkpoint the plain build wrote after those steps (checkpoints from
before partitioned builds must still load).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.transformer import build_model  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.session import open_session, train_step  # noqa: E402

BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=2", "run.log_every=1000"]
STEPS = 3
partitioned_build = eng.build


def plain_build(model_cfg, cfg):
    return build_model(model_cfg, seed=cfg.run.seed)


def logits(s) -> torch.Tensor:
    """The model's logits on one fixed batch (collective at ZeRO-3)."""
    ids = torch.randint(0, s.model_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    s.engine.eval()
    with torch.no_grad():
        out = s.engine(ids.to(s.engine.device)).float().cpu()
    s.engine.train()
    return out


def run(cfg_overrides: list[str], builder, save_to: Path | None = None, load_from: Path | None = None):
    built = []

    def recording(model_cfg, cfg):
        model = builder(model_cfg, cfg)
        built.append(all(hasattr(p, "ds_id") for p in model.parameters()))
        return model

    eng.build = recording
    s = open_session(load_config(None, BASE + cfg_overrides))
    state = eng.gather_state_dict(s.engine)
    losses = [train_step(s, s.cfg.optim.lr).loss for _ in range(STEPS)]
    if save_to is not None:
        s.engine.save_checkpoint(str(save_to), tag="t")
    loaded = None
    if load_from is not None:  # the other build's checkpoint, written after the same steps
        s.engine.load_checkpoint(str(load_from), tag="t")
        loaded = logits(s)
    final = logits(s)
    s.close()
    return state, losses, built[0], final, loaded


out = Path(sys.argv[1])
eng.init_distributed()
report = {}
for cell in sys.argv[2:]:
    name, _, overrides = cell.partition(":")
    overrides = [o for o in overrides.split(",") if o]
    ckpt = out.parent / f"ckpt-{name}"
    # A plain build writes a checkpoint (as trainers before partitioned builds did); the partitioned build
    # must load it: same flat optimizer partitions, same weights.
    state_b, losses_b, _, final_b, _ = run(overrides, plain_build, save_to=ckpt)
    state_a, losses_a, partitioned, _, loaded_a = run(overrides, partitioned_build, load_from=ckpt)
    report[name] = {
        "built_partitioned": partitioned,
        "same_keys": sorted(state_a) == sorted(state_b),
        "max_weight_diff": max((state_a[k].float() - state_b[k].float()).abs().max().item() for k in state_a),
        "losses_partitioned": losses_a,
        "losses_plain": losses_b,
        "loaded_plain_checkpoint_logit_diff": (loaded_a - final_b).abs().max().item(),
    }
if eng.rank() == 0:
    out.write_text(json.dumps(report, indent=1))
eng.shutdown()
