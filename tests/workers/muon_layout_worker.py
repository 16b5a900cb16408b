"""2-rank worker for tests/test_muon.py: Muon's view of DeepSpeed's flat partitions, under every wrapper.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/muon_layout_worker.py OUT.json

For each cell: open a session, take two Muon steps, then `engine.check_muon_layouts` (whole tensors
rebuilt from the flat fp32 partitions must equal the module's parameters; every element held once).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer import engine as eng  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.session import open_session, train_step  # noqa: E402

BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=2", "run.log_every=1000",
        "optim.name=muon", "optim.lr=2e-2", "model.tie_group_size=2"]
# (name, overrides): each DeepSpeed optimizer wrapper around MuonWithAdamW once (fp32 ZeRO-1/2 and ZeRO-3 in
# bf16 are the same classes, and the fp32 parity cells check those to 1e-5).
CELLS = {
    "zero3-ep2-fp32": ["parallel.ds_config=ds_configs/zero3.json", "parallel.expert_parallel_size=2"],  # ZeRO-3
    "zero0-ep2-bf16": ["parallel.ds_config=ds_configs/zero0.json", "parallel.expert_parallel_size=2",
                       "run.precision=bf16"],  # FP16_UnfusedOptimizer (whole fp32 copies)
    "zero1-ep1-bf16": ["parallel.ds_config=ds_configs/zero1.json", "parallel.expert_parallel_size=1",
                       "run.precision=bf16"],  # BF16_Optimizer
    "zero2-ep2-bf16": ["parallel.ds_config=ds_configs/zero2.json", "parallel.expert_parallel_size=2",
                       "run.precision=bf16"],  # ZeRO-2 in bf16
}

eng.init_distributed()
results = {}
for name, overrides in CELLS.items():
    s = open_session(load_config(None, BASE + [f"run.name={name}"] + overrides))
    for _ in range(2):
        train_step(s, s.cfg.optim.lr)
    results[name] = {**eng.check_muon_layouts(s.engine), "wrapper": type(s.engine.optimizer).__name__}
    s.close()
if eng.rank() == 0:
    Path(sys.argv[1]).write_text(json.dumps(results))
eng.shutdown()
