"""2-rank worker for tests/test_memory_report.py: open a session, take one step, write the run's memory report.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/memory_report_worker.py OUT_DIR NAME:ARG,ARG ...

Each NAME:overrides cell (overrides comma-separated) becomes OUT_DIR/NAME/memory_report.{json,md}, the
way trainer/train.py calls `write_run_report` after its first optimizer step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer import engine as eng  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.memory import write_run_report  # noqa: E402
from trainer.session import open_session, train_step  # noqa: E402

BASE = ["data.source=random", "data.seq_len=32", "batch.micro_batch_size=2", "run.log_every=1000"]

out_dir = Path(sys.argv[1])
eng.init_distributed()
for cell in sys.argv[2:]:
    name, _, overrides = cell.partition(":")
    s = open_session(load_config(None, BASE + [f"run.name={name}"] + [o for o in overrides.split(",") if o]))
    train_step(s, s.cfg.optim.lr)
    run_dir = out_dir / name
    if s.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    eng.barrier()
    write_run_report(s, run_dir)
    s.close()
eng.shutdown()
