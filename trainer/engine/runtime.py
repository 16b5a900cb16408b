"""The process group, where tensors for collectives live, and the small collectives the trainer uses."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch



def use_cpu_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; on a machine without CUDA make it the CPU one."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init_distributed() -> None:
    """Start the process group (gloo on CPU, nccl on GPU), skipping DeepSpeed's shm JIT build on CPU."""
    use_cpu_if_no_gpu()
    import deepspeed

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # The shm comm op is JIT-compiled on first use (35-70 s) and only speeds up large CPU
        # all-reduces; gloo is enough for CPU runs.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        set_cpu_local_size()
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    backend = "gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else "nccl"
    if backend == "nccl":  # one GPU per local rank, before any collective
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)


def set_cpu_local_size() -> None:
    """Tell DeepSpeed's CPU accelerator how many ranks share this node, so it stops forking `numactl`.

    Why: `CPU_Accelerator.device_count()` reads the `LOCAL_SIZE` environment variable (DeepSpeed's own
    launcher sets it) and otherwise runs `numactl --hardware` in a subprocess to count NUMA nodes.
    ZeRO-3 calls it in every gradient reduce-scatter (`stage3.__avg_scatter_grads`), about 13 forks
    per step; the count only decides whether the quantized two-level all-to-all (`zero_quantized_gradients`,
    off here) spans several nodes, so results do not change. torchrun and our launcher set
    `LOCAL_WORLD_SIZE`; an explicit `LOCAL_SIZE` wins.
    """
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL takes only GPU tensors, gloo CPU ones."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def launched_world_size() -> int:
    """World size the launcher announced (1 without one); readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank()


def world_size() -> int:
    import deepspeed.comm as dist

    return dist.get_world_size()


def synchronize() -> None:
    """Wait for the accelerator's queued work (timing)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


class RefusedOnEveryRank(ValueError):
    """Bad input that rank 0 found and every rank raises alike (`on_rank_zero`): one line per node, no peer
    left waiting in a collective."""


def on_rank_zero(action: Callable[[], None]) -> None:
    """Run `action` on rank 0 while the others wait; a ValueError it raises is raised on every rank.

    Work only rank 0 does (building data, making and locking the run directory) used to end in a barrier:
    when it refused, rank 0 left and its peers died in that barrier with gloo's traceback, which hid the
    one line under torchrun or `deepspeed run.sh`."""
    import deepspeed.comm as dist

    box: list[str | None] = [None]
    if rank() == 0:
        try:
            action()
        except ValueError as err:
            box[0] = str(err)
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RefusedOnEveryRank(box[0])


def on_every_rank(action: Callable[[], None]) -> None:
    """Run `action` on every rank; when it raises ValueError on any, every rank raises the lowest rank's. A check
    that fails on some ranks only (one rank's data) would otherwise leave the others in the next collective."""
    import deepspeed.comm as dist

    mine: str | None = None
    try:
        action()
    except ValueError as err:
        mine = str(err)
    every: list[str | None] = [None] * world_size()
    dist.all_gather_object(every, mine)
    refused = next((m for m in every if m is not None), None)
    if refused is not None:
        raise RefusedOnEveryRank(refused)


def _all_reduce(values: list[float], op: str) -> list[float]:
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def mean_over_ranks(values: list[float]) -> list[float]:
    return [v / world_size() for v in _all_reduce(values, "SUM")]


def max_over_ranks(values: list[float]) -> list[float]:
    return _all_reduce(values, "MAX")


def gather_over_ranks(value: float) -> list[float]:
    """Every rank's `value`, in rank order (on every rank)."""
    import deepspeed.comm as dist

    mine = torch.tensor([value], dtype=torch.float64, device=comm_device())
    parts = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    return [p.item() for p in parts]


def to_device(batch: dict[str, torch.Tensor], engine: Any) -> dict[str, torch.Tensor]:
    """Loaders yield CPU tensors; the engine's module lives on its accelerator (CPU in tests, a GPU on nodes)."""
    return {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}


def shutdown() -> None:
    """End a rank cleanly: wait for all, tear down the process group, and leave without C++ teardown.

    Why the hard exit: at interpreter teardown a background C++ thread (gloo / c10d) is sometimes
    destroyed while joinable, which aborts the rank ("terminate called without an active exception")
    after all work is done and turns a finished run into a failed one. Everything is written and
    flushed before this point.
    """
    import sys

    import deepspeed.comm as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
