"""The only module that touches DeepSpeed internals.

Expert parallelism comes from DeepSpeed AutoEP (`"expert_parallel"` config, 0.19+), which swaps each
`model.layers.N.mlp` MoE block for an `AutoEPMoELayer` inside `DeepSpeedEngine.__init__`, cloning
the expert weights per layer. That silently unties a tied model, so `tied_expert_parallel()` wraps
the engine's `_configure_expert_parallel` and re-applies the model's layer plan right after the EP
layers are built and before ZeRO partitions anything: each follower then runs its leader's
`GroupedExperts` (and router / attention when tied) without registering it, so ZeRO-3 partitions each
shared bank exactly once. That wrapper is the one seam that changes behaviour. The other internals
read here are for measurement only: `GatherCounter` (ZeRO-3 all-gather traffic), the ZeRO optimizer's
flat fp32 partitions and state (`optimizer_tensors_by_kind`), gradient buffers (`gradient_tensors`,
read by `GradientWatch` as each step begins), partitions (`held_tensor`: `ds_tensor`) and DeepSpeed's
estimators (`deepspeed_estimates`) for memory reports, reduced gradients and AutoEP's expert-group
names (`grad_sq_norms`), and the gathering of a full state dict (`gather_state_dict`, export). Small collectives used by the trainer
(`mean_over_ranks`, `max_over_ranks`, `gather_over_ranks`, `barrier`) live here too, so no other
module imports deepspeed. One more read of DeepSpeed's bookkeeping feeds behaviour, read-only:
`attach_muon_layouts` tells Muon which whole tensors a ZeRO / bf16 flat partition holds pieces of.
One wrapper changes how, not what, DeepSpeed communicates: `gather_persistent_parameters_at_once`
re-gathers ZeRO-3's persistent parameters after a step in one collective instead of one per parameter.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from models.accounting import layer_parts
from models.config import ModelConfig, layer_plan
from models.moe import borrow
from models.transformer import MoETransformer, apply_tying, build_model
from trainer.config import TrainConfig, load_engine_settings
from trainer.optim import build_optimizer, joint_row_blocks, param_groups


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


def deepspeed_config(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> dict[str, Any]:
    """Engine settings from the ds_config file plus what the trainer config (resolved for the world) owns."""
    settings = load_engine_settings(cfg)
    settings.update({
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch.grad_accum,
        "train_batch_size": cfg.batch.micro_batch_size * cfg.batch.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.run.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch optimizers (AdamW, SGD) are exact under ZeRO
        "expert_parallel": autoep_settings(model_cfg, cfg.parallel.expert_parallel_size),
    })
    zero = settings.setdefault("zero_optimization", {})
    if cfg.run.precision == "bf16" and zero.get("stage", 0) > 0:
        # fp32 gradient accumulation (DeepSpeed supports it with ZeRO only; ZeRO-0 bf16 accumulates in bf16)
        settings["data_types"] = {"grad_accum_dtype": "fp32"}
    if zero.get("stage") == 3 and "stage3_max_reuse_distance" not in zero:
        zero["stage3_max_reuse_distance"] = tie_aware_reuse_distance(model_cfg)
    return settings


def tie_aware_reuse_distance(model_cfg: ModelConfig) -> int:
    """ZeRO-3 reuse distance (elements) that keeps a tied bank gathered across its group, and no longer.

    DeepSpeed keeps a fetched parameter if it is used again within this many parameter elements of
    the module trace. Between two consecutive uses of a tied bank lies one layer (norms, attention,
    router, shared expert), so one layer's parameters (bank included) is enough: the bank is then
    gathered once per group in forward and once in backward instead of at every layer, while
    nothing else is held longer than with a small distance.
    """
    return max(sum(layer_parts(model_cfg, p).values()) for p in layer_plan(model_cfg)) + 1


def autoep_settings(model_cfg: ModelConfig, ep_size: int) -> dict[str, Any]:
    """AutoEP layout for our blocks (HF Qwen3-MoE layout + an optional ungated `shared_expert`).

    Routing is stated explicitly instead of read from `model.config`, whose field names differ.
    """
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "preset_model": "qwen3_moe",
        "top_k": model_cfg.top_k,
        "route_norm": model_cfg.norm_topk_prob,
        "score_func": "softmax",
        "use_grouped_mm": True,
        "load_balance_coeff": None,
    }


@contextlib.contextmanager
def tied_expert_parallel() -> Iterator[None]:
    """THE SEAM: re-tie experts right after AutoEP builds its layers (see module docstring).

    With a model built partitioned (ZeRO-3, `build`), DeepSpeed partitions each new EP block's
    experts as soon as the block replaces ours; a follower's block then takes its leader's (already
    replaced) bank instead, before its own copy is partitioned, so no rank ever holds a bank per
    layer.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_expert_parallel
    partition = DeepSpeedEngine._partition_autoep_zero3_experts
    partition_descriptor = vars(DeepSpeedEngine)["_partition_autoep_zero3_experts"]

    def configure_then_tie(self: Any, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, MoETransformer):
            return original(self, model, *args, **kwargs)

        def partition_or_borrow(replacement: nn.Module, convert: Callable[..., Any]) -> None:
            layers = model.model.layers
            layer = next(layer for layer in layers if layer.mlp is replacement)
            if layer.plan.is_tied_follower:
                borrow(replacement, "experts", layers[layer.plan.expert_owner].mlp.experts)
            else:
                partition(replacement, convert)
            release_freed_memory()  # the source bank, or the follower's copy: whole tensors now unreferenced

        DeepSpeedEngine._partition_autoep_zero3_experts = staticmethod(partition_or_borrow)
        try:
            with whole_tensors_unmapped_on_free():
                result = original(self, model, *args, **kwargs)
        finally:
            DeepSpeedEngine._partition_autoep_zero3_experts = partition_descriptor
        apply_tying(model)
        _present_followers_as_plain_modules(model)
        return result

    DeepSpeedEngine._configure_expert_parallel = configure_then_tie
    try:
        yield
    finally:
        DeepSpeedEngine._configure_expert_parallel = original


def build(model_cfg: ModelConfig, cfg: TrainConfig) -> MoETransformer:
    """The seed-determined model for this rank, built partitioned when the engine runs ZeRO-3.

    Why: a plain build materialises every parameter on every rank before ZeRO-3 partitions it
    (an OLMoE-1B-7B rank would need 28 GB of host memory first). Under `deepspeed.zero.Init` each
    module is partitioned as soon as it is built, followers build no bank at all (`BankSlot`), each
    parameter's init is drawn whole once, one parameter at a time, keeping only this rank's slice,
    and the tying seam hands a follower's EP block its leader's bank before its own copy is
    partitioned. Tensors are created on the CPU as in a plain build (no device/dtype override) and
    drawn from the CPU generator, so the weights are bit-identical to
    `models.transformer.build_model` with the same seed (tests/test_construction.py).
    Measured host peaks: benchmarks/construction_memory.py.
    """
    ds_config = deepspeed_config(cfg, model_cfg, world_size())
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return build_model(model_cfg, seed=cfg.run.seed)
    import deepspeed
    from deepspeed.utils import groups

    # The group object the engine will partition over (its `seq_data_parallel_group`), not zero.Init's
    # default world group: ZeRO-3 buckets parameters by group object, and the engine places the
    # parameters it converts itself (AutoEP's routers) over this one, so with two objects the flat
    # optimizer partitions, and with them the checkpoint layout, would differ from a plain build's.
    partition_group = groups._get_sequence_data_parallel_group()

    def construct() -> contextlib.AbstractContextManager[object]:
        return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.float32, tensor_overrides=[],
                                   data_parallel_group=partition_group)

    with whole_tensors_unmapped_on_free():
        model = build_model(model_cfg, seed=cfg.run.seed, construct=construct, write=_write_partition)
        if cfg.run.precision == "bf16":
            _cast_partitions(model, torch.bfloat16)
        release_freed_memory()
    return model


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def _glibc() -> Any | None:
    """glibc's allocator controls (`mallopt`, `malloc_trim`), or None where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def whole_tensors_unmapped_on_free() -> Iterator[None]:
    """While building, let glibc serve every allocation of 1 MiB or more with its own mapping.

    Why: building allocates and frees one whole tensor after another (1-300 MB); glibc's default
    threshold rises to 32 MiB after the first large free, so the mid-sized ones come from the heap and
    stay resident around the partitions that outlive them, inflating the host peak by a few hundred
    MiB. Afterwards the threshold is set to 32 MiB, where glibc's own adaptation ends up anyway.
    Elsewhere than glibc this does nothing.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`).

    Why: building frees many whole tensors of 1-32 MB (below glibc's mmap threshold, so they live on the
    heap); glibc keeps those pages resident, and the host peak would count them again on top of the
    next layer's transients. Elsewhere than glibc this only collects garbage.
    """
    if collect:
        gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _write_partition(param: nn.Parameter, init: Callable[[torch.Tensor], object]) -> None:
    """Draw the whole parameter on the CPU (fp32, as a plain build does) and keep this rank's ZeRO-3 slice.

    Why not `GatheredParameters`: every rank draws the same values anyway, and gathering, modifying and
    re-partitioning holds the whole tensor twice per rank (the peak while building) and talks to every
    rank per parameter.
    """
    whole = torch.empty(param.ds_shape, dtype=torch.float32)
    with torch.no_grad():
        init(whole)
        start, count = _held_range(param)
        param.ds_tensor.data[:count].copy_(whole.view(-1)[start:start + count])
    del whole
    release_freed_memory(collect=False)


def _held_range(param: nn.Parameter) -> tuple[int, int]:
    """(first element, element count) of the whole flattened ZeRO-3 parameter that this rank's partition
    holds: DeepSpeed cuts it into `partition_numel()`-element pieces (the last one padded), rank r of
    the parameter's partition group holding piece r."""
    import deepspeed.comm as dist

    size = param.partition_numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    return start, max(0, min(size, param.ds_numel - start))


def _cast_partitions(model: nn.Module, dtype: torch.dtype) -> None:
    """Round each rank's fp32 partitions to `dtype`, as the engine casts a plain-built model.

    Why here: DeepSpeed leaves a model built under zero.Init in the dtype it was built in, and building
    in bf16 (zero.Init's dtype override) would draw `normal_` into bf16 tensors, which consumes the
    random stream differently from fp32 and so changes every later weight. Rounding element by element
    gives the same bf16 values (and fp32 masters made from them) as casting whole parameters.
    """
    for param in model.parameters():
        param.ds_tensor.data = param.ds_tensor.data.to(dtype)
        param.data = param.data.to(dtype)


_FOLLOWER_CLASS: type | None = None


def _present_followers_as_plain_modules(model: MoETransformer) -> None:
    """Give each follower's EP block a class that runs AutoEPMoELayer's code but is not an instance of it.

    Why: DeepSpeed's checkpoint save/load enumerates `AutoEPMoELayer` modules and expects each to own
    its expert parameters (ZeRO-3 save fails: "metadata references expert parameters that are
    missing"). A follower owns none (its experts are the leader's), so it must not be enumerated;
    its router and shared expert are then saved as ordinary parameters. Its forward, EP group
    binding (`set_deepspeed_parallelism`) and all-to-all are AutoEPMoELayer's own methods, unchanged.
    """
    global _FOLLOWER_CLASS
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    if _FOLLOWER_CLASS is None:
        methods = {k: v for k, v in vars(AutoEPMoELayer).items() if k not in ("__dict__", "__weakref__", "__init__")}
        _FOLLOWER_CLASS = type("TiedAutoEPFollower", (nn.Module,), methods)
    for layer in model.model.layers:
        if layer.plan.is_tied_follower and isinstance(layer.mlp, AutoEPMoELayer):
            layer.mlp.__class__ = _FOLLOWER_CLASS


class UpdateGate:
    """While `drop` is set, the optimizer's update is a no-op: weights and optimizer state stay as they were.

    Why at the basic optimizer: every ZeRO stage ends its `step()` by calling it (ZeRO-3 once per
    sub-group), after reducing and partitioning gradients, which must still happen so the next step
    starts clean; skipping `engine.step()` itself would leave DeepSpeed's buffers half-used.
    """

    def __init__(self) -> None:
        self.drop = False

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        update = optimizer.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return None if self.drop else update(*args, **kwargs)

        optimizer.step = gated_step
        return optimizer


def optimizer_factory(model: MoETransformer, cfg: TrainConfig, gate: UpdateGate,
                      on_built: Callable[[], None] | None = None) -> Callable[[Any], torch.optim.Optimizer]:
    """A callable DeepSpeed invokes after AutoEP replacement and tying, so groups see the live tensors.

    ZeRO-1/2 need expert parameters in their own 'moe' groups (reduced over the expert-data-parallel group).
    Muon gets AutoEP's gate/up tensor pairs (`joint_row_blocks`) so each expert is orthogonalised as the
    model's fused [2F, D] matrix; under ZeRO 1-3 / bf16 it is then stepped on flat partitions, whose
    layout `attach_muon_layouts` gives it once the engine exists.
    """

    def build(_params: Any) -> torch.optim.Optimizer:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        if on_built is not None:  # AutoEP blocks in place and tied; no optimizer state exists yet
            on_built()

        groups = param_groups(model, cfg.optim, model.config)
        return gate.wrap(build_optimizer(split_params_into_different_moe_groups_for_optimizer(groups), cfg.optim,
                                         row_blocks=joint_row_blocks(model)))

    return build


class _NoHFRecorderWarning(logging.Filter):
    """AutoEP warns that it found no HF output-capture registry for router logits; our blocks are not
    HF classes and the trainer reads router logits through RouterTap, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "output-capture registry" not in record.getMessage()


def initialize(model: MoETransformer, cfg: TrainConfig, gate: UpdateGate | None = None,
               on_built: Callable[[], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """A DeepSpeed engine with tied expert parallelism, and the DeepSpeed config it got.

    The process group must exist and `cfg` be resolved for its world size (`TrainConfig.for_world`).
    `on_built` runs once the model is complete (EP blocks in place, tied) and before any optimizer
    state exists: where memory benchmarks read the cost of building the model.
    """
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not any(isinstance(f, _NoHFRecorderWarning) for f in ds_logger.filters):
        ds_logger.addFilter(_NoHFRecorderWarning())

    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    ds_config = deepspeed_config(cfg, model.config, world_size())
    with tied_expert_parallel():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_factory(model, cfg, gate or UpdateGate(), on_built),
                                               config=ds_config)
    attach_muon_layouts(engine)
    gather_persistent_parameters_at_once(engine)
    return engine, ds_config


def plain_initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """DeepSpeed as a user without tiedmoe would call it (no tying seam): the peer in benchmarks/peers.py.

    AutoEP in `ds_config` then replaces every MoE block with its own clone of the experts, so a model
    tied before this call trains untied: exactly what the peer is there to show.
    """
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def gather_persistent_parameters_at_once(engine: Any) -> None:
    """After each ZeRO-3 step, re-gather the persistent parameters in one all-gather per partition group.

    Why: DeepSpeed keeps parameters below `stage3_param_persistence_threshold` gathered between steps,
    and its stage-3 optimizer re-gathers them after every step (`_post_step` -> `Init._all_gather`)
    with one blocking collective per parameter: 73 all-gathers a step on the tiny default model, about
    1 ms each on gloo, some 10% of the step. The parameter coordinator's own fetch path
    (`param.all_gather_coalesced`, what every forward uses) gathers a list into one flat buffer with
    one collective per partition group. Gathering them that way just before DeepSpeed's `_post_step`
    leaves its per-parameter gather nothing to do (it skips parameters already available): the
    same partitions, the same values, one collective. Wraps this engine's optimizer instance only;
    quantized-weight and hpZ (secondary partition) parameters are left to DeepSpeed, whose
    post-step path gathers them differently. No-op below ZeRO-3.
    """
    optimizer = engine.optimizer
    if not hasattr(optimizer, "persistent_parameters") or not hasattr(optimizer, "_post_step"):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    post_step = optimizer._post_step

    def gather_then_post_step(*args: Any, **kwargs: Any) -> Any:
        waiting = [p for p in optimizer.persistent_parameters
                   if p.ds_status == ZeroParamStatus.NOT_AVAILABLE and getattr(p, "ds_secondary_tensor", None) is None
                   and not hasattr(p.ds_tensor, "ds_quant_scale")]
        if waiting:
            waiting[0].all_gather_coalesced(waiting).wait()
        return post_step(*args, **kwargs)

    optimizer._post_step = gather_then_post_step


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


def is_expert_param(param: nn.Parameter) -> bool:
    from deepspeed.moe.utils import is_moe_param

    return is_moe_param(param)


def global_grad_norm(engine: Any) -> float | None:
    """DeepSpeed's global gradient norm of the last step (ZeRO-1/2/3 and bf16 compute one for clipping;
    None where it does not, e.g. fp32 ZeRO-0)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def held_tensor(param: nn.Parameter) -> torch.Tensor:
    """What this rank stores of a parameter: its ZeRO-3 partition, else the (EP-local) tensor itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


def params_finite(engine: Any) -> bool:
    """Every parameter finite on every rank (each checks what it holds). Collective."""
    local = all(bool(torch.isfinite(held_tensor(p)).all()) for p in engine.module.parameters())
    return max_over_ranks([0.0 if local else 1.0])[0] == 0.0


def local_expert_elements(engine: Any) -> int:
    """Expert parameter elements this rank holds: its ZeRO-3 partition, or its EP shard below stage 3."""
    return sum(held_tensor(p).numel() for p in engine.module.parameters() if is_expert_param(p))


def local_param_elements(engine: Any) -> int:
    return sum(held_tensor(p).numel() for p in engine.module.parameters())


def grad_sq_norms(engine: Any, category_of: Callable[[str], str]) -> dict[str, float]:
    """Global squared gradient norms per category, each tensor counted once. Collective; call after the
    backward of an accumulation boundary and before `engine.step()` (the step clears gradients).

    `safe_get_full_grad` gives every rank the whole reduced gradient of a non-expert parameter and of its
    own EP shard of an expert one (gathering ZeRO-3 partitions), so non-expert squares are divided by
    the world size and expert squares by the expert-data-parallel size before one all-reduce.
    """
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_grad

    world = dist.get_world_size()
    sums: dict[str, float] = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is None:
            continue
        sq = grad.detach().double().pow(2).sum().item()
        replicas = _expert_data_parallel_size(param) if is_expert_param(param) else world
        key = category_of(name)
        sums[key] = sums.get(key, 0.0) + sq / replicas
    keys = sorted(sums)
    total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist()))


def _expert_data_parallel_size(param: nn.Parameter) -> int:
    """Ranks holding the same EP shard of an expert parameter (AutoEP tags it with its group's name)."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_world_size(param.group_name)


class GatherCounter:
    """Counts ZeRO-3 parameter all-gathers (elements actually fetched), experts vs everything else.

    Wraps the stage-3 parameter coordinator's private gather method while active: measurement only,
    used by benchmarks and tests to check that a tied bank is fetched once per group, not per layer.
    """

    def __init__(self) -> None:
        self.expert_elements = 0
        self.other_elements = 0
        self.expert_gathers = 0

    def reset(self) -> None:
        self.expert_elements = self.other_elements = self.expert_gathers = 0

    @contextlib.contextmanager
    def active(self) -> Iterator["GatherCounter"]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coord

        name = "_PartitionedParameterCoordinator__all_gather_params_"
        original = getattr(Coord, name)

        def counting(coord: Any, params: Any, forward: bool, quantize: bool = False) -> None:
            for param in params:
                if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    if is_expert_param(param):
                        self.expert_elements += param.ds_numel
                        self.expert_gathers += 1
                    else:
                        self.other_elements += param.ds_numel
            return original(coord, params, forward, quantize)

        setattr(Coord, name, counting)
        try:
            yield self
        finally:
            setattr(Coord, name, original)


def optimizer_tensors_by_kind(engine: Any) -> dict[str, list[tuple[bool, torch.Tensor]]]:
    """This rank's optimizer copies ("master") and state ("state"), each tagged True for experts.

    Read from the ZeRO optimizer, not the basic one: ZeRO-3 swaps its flats into the basic optimizer
    only during step(). Why per group: ZeRO keeps one flat fp32 partition per parameter group (ZeRO-3: per sub-group),
    and the trainer puts expert parameters in their own 'moe' groups, so a flat tensor is wholly
    expert or wholly not. Optimizer state is keyed by those flats (or by the parameters themselves
    without ZeRO) and inherits their tag. Callers de-duplicate against the module's own storage.
    """
    zero = engine.optimizer
    basic = getattr(engine, "basic_optimizer", None) or zero
    group_is_expert = [bool(g.get("moe")) or any(is_expert_param(p) for p in g["params"]) for g in basic.param_groups]
    if getattr(zero, "fp32_partitioned_groups_flat", None):  # ZeRO-3: sub-groups of parameter groups
        flats = zero.fp32_partitioned_groups_flat
        masters = [(group_is_expert[zero.sub_group_to_group_id[i]], t) for i, t in enumerate(flats)]
    else:
        flats = (getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
                 or getattr(zero, "fp32_groups_flat_partition", None)  # BF16_Optimizer (bf16 ZeRO-1)
                 or getattr(zero, "fp32_groups_flat", None))  # FP16_Optimizer in bf16 mode (bf16 ZeRO-0)
        if flats:
            masters = [(group_is_expert[i], t) for i, t in enumerate(flats)]
        else:
            masters = [(group_is_expert[i], p) for i, g in enumerate(basic.param_groups) for p in g["params"]]
    masters = [(kind, t) for kind, t in masters if torch.is_tensor(t)]
    kind_of = {id(t): kind for kind, t in masters}
    state = [(kind_of.get(id(key), False), v) for key, values in basic.state.items() for v in values.values()
             if torch.is_tensor(v) and v.numel() > 1]
    return {"master": masters, "state": state}


def gradient_tensors(engine: Any) -> list[tuple[bool, torch.Tensor]]:
    """Gradient tensors this rank holds right now, tagged True for experts (views of one buffer
    are listed separately; callers count each (address, size) once).

    Read just before the optimizer step (`GradientWatch`), when every stage holds its gradients:
    ZeRO-3 its partition of the flat fp32 gradient buffer, ZeRO-1/2 the reduced `param.grad` views
    and flat partitions, the bf16 optimizer its fp32 gradient buffers, plain DDP `param.grad`.
    """
    zero = engine.optimizer
    out: list[tuple[bool, torch.Tensor]] = []
    parts = getattr(zero, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
    for p in engine.module.parameters():
        if parts is not None and getattr(p, "ds_id", None) in parts:
            out.append((is_expert_param(p), parts[p.ds_id]))
        if p.grad is not None:
            out.append((is_expert_param(p), p.grad))
    flats = optimizer_tensors_by_kind(engine)["master"]
    out += [(kind, t.grad) for kind, t in flats if t.grad is not None]
    averaged = getattr(zero, "averaged_gradients", None) or {}
    for i, grads in (enumerate(averaged) if isinstance(averaged, list) else averaged.items()):
        kind = flats[i][0] if i < len(flats) else False
        out += [(kind, g) for g in (grads if isinstance(grads, (list, tuple)) else [grads]) if torch.is_tensor(g)]
    for i, flat in enumerate(getattr(zero, "fp32_groups_gradients_flat", None) or []):
        out.append((flats[i][0] if i < len(flats) else False, flat))
    return out


class GradientWatch:
    """Gradient bytes (expert, other) held at the last optimizer step, read as the step begins.

    Why a watch: after `engine.step()` ZeRO-0/1/2 have freed their gradients, so a report written
    after a step cannot see them. It wraps this engine's optimizer `step` (an instance attribute,
    measurement only, no behaviour change); while `armed` (the steps a report follows) it costs one
    pass over the parameters, else nothing.
    """

    def __init__(self, engine: Any) -> None:
        self.expert_bytes = 0
        self.other_bytes = 0
        self.steps = 0
        self.armed = True
        optimizer = engine.optimizer
        original = optimizer.step

        def watched_step(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                self._record(engine)
            return original(*args, **kwargs)

        optimizer.step = watched_step

    def _record(self, engine: Any) -> None:
        seen: set[tuple[int, int]] = set()
        sums = {True: 0, False: 0}
        for kind, t in gradient_tensors(engine):
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                sums[kind] += t.numel() * t.element_size()
        self.expert_bytes, self.other_bytes = sums[True], sums[False]
        self.steps += 1


def deepspeed_estimates(total_params: int, largest_layer_params: int, world: int) -> dict[str, int]:
    """DeepSpeed's own per-GPU model-state estimates (no offload), bytes: ZeRO-2 (also the only
    figure DeepSpeed offers for stages 0/1) and ZeRO-3. They assume 16-bit weights with fp32 Adam,
    see each parameter as replicated data-parallel (no expert parallelism) and take the caller's
    parameter count (we pass unique parameters: tied banks once, as their `_all_live` variants would).
    Their GPU figure depends on the node layout only through the total GPU count, so one node of
    `world` GPUs is passed."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, zero2_gpu = estimate_zero2_model_states_mem_needs(total_params, world, 1, cpu_offload=False)
    _, zero3_gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, world, 1,
                                                            cpu_offload=False, cpu_offload_params=False)
    return {"zero2_bytes_per_gpu": int(zero2_gpu), "zero3_bytes_per_gpu": int(zero3_gpu)}


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


# --------------------------------------------------------------------------------------------------
# Gathering a full state dict from an engine (export, checks)
# --------------------------------------------------------------------------------------------------

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\w+)$")


def _map_name(name: str) -> str:
    """AutoEP parameter name -> ours (non-expert parameters)."""
    name = name.replace(".mlp.router.gate.", ".mlp.gate.")
    return name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")


def _gathered(param: torch.nn.Parameter, master: bool = False) -> torch.Tensor:
    """fp32 copy of a (possibly ZeRO-3 partitioned) parameter as this rank sees it. Collective at ZeRO-3.

    master: the optimizer's fp32 master copy (bf16 runs) when it has one; None-safe fallback below.
    """
    if master:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)  # collective; None when the optimizer keeps no master
        if full is not None:
            return full.detach().float().cpu().clone()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().float().clone()
    return param.detach().float().clone()


def _all_experts(local: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate every EP rank's local experts (dim 0) in EP-rank order. Collective over `group`."""
    import deepspeed.comm as dist

    size = dist.get_world_size(group=group) if group is not None else 1
    if size == 1:
        return local
    parts = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def gather_state_dict(engine: Any, master: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict in the model's own naming (on every rank), from ZeRO-3 partitions and
    AutoEP expert shards; each tied bank once, under its leader's name.

    master: take the optimizer's fp32 master weights (bf16 runs) instead of the module's bf16 ones.
    Every rank must call it (ZeRO-3 gathers and EP all-gathers are collectives).
    """
    state = _gather_full(engine, lambda param: _gathered(param, master))
    if engine.module.config.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one tensor, two state_dict keys
    return state


def _gather_full(engine: Any, read: Callable[[nn.Parameter], torch.Tensor]) -> dict[str, torch.Tensor]:
    """`read(param)` (this rank's full view of one parameter) for every parameter, in the model's naming,
    AutoEP expert shards concatenated over the EP group. Collective."""
    layers = engine.module.model.layers
    state: dict[str, torch.Tensor] = {}
    banks: dict[int, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():  # same order on every rank -> collectives line up
        match = _EXPERT_RE.match(name)
        if match is None:
            state[_map_name(name)] = read(param)
            continue
        layer, kind = int(match.group(1)), match.group(2)
        if kind in ("gate_up_proj", "down_proj"):  # an MoE block AutoEP did not replace
            state[name] = read(param)
            continue
        if kind not in ("w1", "w2", "w3"):
            raise RuntimeError(f"{name}: unexpected AutoEP expert parameter (expected w1, w2, w3)")
        group = getattr(layers[layer].mlp, "ep_group", None)
        banks.setdefault(layer, {})[kind] = _all_experts(read(param), group)
    for layer, bank in banks.items():
        if sorted(bank) != ["w1", "w2", "w3"]:
            raise RuntimeError(f"layer {layer}: AutoEP experts have {sorted(bank)}, expected w1, w2, w3")
        # AutoEP: w1 gate [E, F, D], w3 up [E, F, D], w2 down [E, D, F]; ours: gate_up [E, 2F, D], down [E, D, F]
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([bank["w1"], bank["w3"]], dim=1)
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = bank["w2"]
    return state


def _local_view(engine: Any, name: str, full: dict[str, torch.Tensor]) -> torch.Tensor:
    """The slice of a full tensor (model naming) that engine parameter `name` holds on this rank: the
    inverse of `_gather_full` (EP-local experts, AutoEP's w1/w2/w3 split)."""
    match = _EXPERT_RE.match(name)
    if match is None or match.group(2) in ("gate_up_proj", "down_proj"):
        return full[_map_name(name) if match is None else name]
    layer, kind = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer}.mlp.experts."
    bank = full[prefix + ("down_proj" if kind == "w2" else "gate_up_proj")]
    if kind != "w2":
        half = bank.shape[1] // 2
        bank = bank[:, :half] if kind == "w1" else bank[:, half:]
    import deepspeed.comm as dist

    group = getattr(engine.module.model.layers[layer].mlp, "ep_group", None)
    size = dist.get_world_size(group=group) if group is not None else 1
    rank = dist.get_rank(group=group) if group is not None else 0
    local = bank.shape[0] // size
    return bank[rank * local:(rank + 1) * local]


ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _basic_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed drives (inside a ZeRO / bf16 wrapper, or the engine's own)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def gather_training_state(engine: Any) -> dict[str, Any]:
    """Everything an optimizer step depends on, full-sized and in the model's naming, independent of
    world size, EP size and ZeRO stage: fp32 (master) weights, Adam moments and the Adam step count.
    Collective. The layout-free form a run is resharded through (`trainer.reshard`)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    def moment(key: str) -> Callable[[nn.Parameter], torch.Tensor]:
        def read(param: nn.Parameter) -> torch.Tensor:
            value = safe_get_full_optimizer_state(param, key)  # ZeRO 1-3 and the bf16 optimizer; collective
            if value is None:  # ZeRO-0 fp32: the torch optimizer keeps full per-parameter state
                value = engine.optimizer.state[param][key]
            return value.detach().float().cpu().clone()

        return read

    steps = {float(st["step"]) for st in _basic_optimizer(engine).state.values() if "step" in st}
    if len(steps) != 1:
        raise RuntimeError(f"optimizer steps differ between parameter groups: {sorted(steps)}")
    return {"weights": gather_state_dict(engine, master=True),
            **{key: _gather_full(engine, moment(key)) for key in ADAM_STATE_KEYS},
            "optimizer_step": int(steps.pop())}


def scatter_training_state(engine: Any, state: dict[str, Any]) -> None:
    """Load `gather_training_state` output into an engine of any layout: each rank sets what it holds.
    Collective at ZeRO-3. The optimizer state must exist already (one step at lr 0 creates it without
    changing the weights)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    basic = _basic_optimizer(engine)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and the bf16 optimizer link each parameter to its optimizer-state fragments lazily, at
        # their first step and before the state exists; link again now that it does.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        weight = _local_view(engine, name, state["weights"]).to(param.dtype)
        if hasattr(param, "ds_id"):  # ZeRO-3: the module's partitions (re-split from the partition group's rank 0)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(weight)  # every rank holds the same full view, so any source is right
        else:
            param.data.copy_(weight)
        wrapped = hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")
        if wrapped:
            safe_set_full_fp32_param(param, _local_view(engine, name, state["weights"]))
        for key in ADAM_STATE_KEYS:
            value = _local_view(engine, name, state[key])
            if wrapped:
                safe_set_full_optimizer_state(param, value, key)
            else:
                basic.state[param][key] = value.clone().to(param.device, param.dtype)
        if not wrapped:
            basic.state[param].setdefault("step", torch.tensor(0.0))
    for st in basic.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(state["optimizer_step"]), dtype=st["step"].dtype)


# --------------------------------------------------------------------------------------------------
# Muon under ZeRO 1-3 and bf16: what DeepSpeed's flat partitions are made of (read-only)
# --------------------------------------------------------------------------------------------------

def attach_muon_layouts(engine: Any) -> None:
    """Let `MuonWithAdamW` orthogonalise whole tensors although DeepSpeed hands it flat partitions.

    Why: ZeRO 1-3 and the bf16 optimizers step the client optimizer on flat fp32 tensors (this rank's
    partition of a parameter group, or of a ZeRO-3 sub-group). Momentum, decay and AdamW are
    elementwise and run on them as they are; Newton-Schulz needs each expert's whole matrix, so the
    optimizer asks `layout_of(flat)` which parameters the flat holds which elements of. This reads
    DeepSpeed's bookkeeping only (changes nothing): ZeRO-1/2 and BF16_Optimizer link each parameter to
    its fragment of the partition (`_hp_mapping`); ZeRO-3 concatenates each parameter's partition
    (`ds_tensor`, rank r holds elements [r*n, (r+1)*n)) in sub-group order. The bf16 ZeRO-0 optimizer
    (FP16_UnfusedOptimizer) steps whole fp32 copies, so there only AutoEP's gate/up pairing is moved
    onto the copies. No-op for other optimizers and for ZeRO-0 fp32 (the parameters themselves).
    Layouts are rebuilt if DeepSpeed ever swaps a flat tensor for a new one.
    """
    from trainer.optim import MuonWithAdamW

    basic = _basic_optimizer(engine)
    if not isinstance(basic, MuonWithAdamW) or basic is engine.optimizer:
        return
    wrapper = engine.optimizer
    if _is_unfused(wrapper):  # whole fp32 copies, no flats: only the gate/up pairing must follow the copies
        basic.rebind({id(p): copy for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                      for p, copy in zip(lp, hp)})
        return
    cache: dict[int, tuple[torch.Tensor, Any]] = {}

    def layout_of(flat: torch.Tensor) -> Any:
        hit = cache.get(id(flat))
        if hit is None or hit[0] is not flat:
            cache.clear()
            cache.update({id(f): (f, layout) for f, layout in _flat_layouts(wrapper)})
            hit = cache.get(id(flat))
        if hit is None or hit[0] is not flat:
            raise RuntimeError(f"optim.name=muon: a flat tensor of {flat.numel()} elements that "
                               f"{type(wrapper).__name__} does not list; its layout is unknown")
        return hit[1]

    basic.layout_of = layout_of


def _flat_layouts(wrapper: Any) -> list[tuple[torch.Tensor, Any]]:
    """(flat fp32 tensor, FlatLayout) for every flat the DeepSpeed optimizer `wrapper` steps."""
    from trainer.optim import FlatLayout, FlatPiece

    out = []
    if getattr(wrapper, "fp32_partitioned_groups_flat", None) is not None:  # ZeRO-3
        for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            pieces, at = [], 0
            for p in wrapper.fp16_groups[i]:  # one partition group per sub-group (stage3 asserts it)
                start, count = _held_range(p)
                pieces.append(FlatPiece(p, p.ds_shape, start, count, at))
                at += p.partition_numel()
            out.append((flat, FlatLayout(pieces, _summer(wrapper.sub_group_process_groups[i]))))
        return out
    flats = (getattr(wrapper, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
             or getattr(wrapper, "fp32_groups_flat_partition", None))  # BF16_Optimizer (bf16 ZeRO-1)
    if flats:
        lp_groups = getattr(wrapper, "bit16_groups", None) or wrapper.bf16_groups
        for i, flat in enumerate(flats):
            pieces = []
            for p in lp_groups[i]:
                frag = getattr(p, "_hp_mapping", None)
                if frag is None:  # no element of p in this rank's partition
                    pieces.append(FlatPiece(p, p.shape, 0, 0, 0))
                else:
                    pieces.append(FlatPiece(p, p.shape, frag.lp_fragment_address.start, frag.lp_fragment_address.numel,
                                            frag.hp_fragment_address.start))
            out.append((flat, FlatLayout(pieces, _summer(wrapper.real_dp_process_group[i]))))
        return out
    raise RuntimeError(f"optim.name=muon: no flat-partition layout known for {type(wrapper).__name__}")


def _is_unfused(wrapper: Any) -> bool:
    """DeepSpeed's bf16 ZeRO-0 optimizer (FP16_UnfusedOptimizer): one fp32 copy per parameter, whole."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(wrapper, FP16_UnfusedOptimizer)


def _summer(group: Any) -> Callable[[torch.Tensor], None]:
    """In-place sum over a process group (nothing to do for a group of one)."""
    import deepspeed.comm as dist

    def sum_over_ranks(t: torch.Tensor) -> None:
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(t, group=group)

    return sum_over_ranks


def check_muon_layouts(engine: Any) -> dict[str, Any]:
    """Test aid: rebuild every whole tensor from the flat fp32 partitions through their `FlatLayout`s and
    compare with the module's parameter (ZeRO-3: gathered), cast to its dtype; also count how often each
    element of each whole tensor is held over the ranks (must be exactly once). Collective."""
    import deepspeed

    worst, coverage_ok, flats = 0.0, True, 0
    wrapper = engine.optimizer
    if _is_unfused(wrapper):  # whole copies: each equals its parameter, gate/up copies paired
        basic = _basic_optimizer(engine)
        copy_of = {id(p): copy for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups) for p, copy in zip(lp, hp)}
        for p in engine.module.parameters():
            worst = max(worst, (copy_of[id(p)].detach().to(p.dtype).float() - p.detach().float()).abs().max().item())
        for block in joint_row_blocks(engine.module):
            paired = [id(q) for q in basic.row_block_of(copy_of[id(block[0])])]
            coverage_ok &= paired == [id(copy_of[id(q)]) for q in block]
        return {"max_abs_diff": worst, "coverage_ok": coverage_ok, "flats": len(wrapper.fp32_groups)}
    for flat, layout in _flat_layouts(wrapper):
        flats += 1
        for pc in layout.pieces:
            whole = torch.zeros(pc.shape.numel(), dtype=flat.dtype, device=flat.device)
            held = torch.zeros_like(whole)
            whole[pc.start:pc.start + pc.numel] = flat.detach()[pc.flat_start:pc.flat_start + pc.numel]
            held[pc.start:pc.start + pc.numel] = 1.0
            layout.sum_over_ranks(whole)
            layout.sum_over_ranks(held)
            coverage_ok &= bool((held == 1).all())
            if hasattr(pc.param, "ds_id"):
                with deepspeed.zero.GatheredParameters([pc.param], modifier_rank=None):
                    value = pc.param.detach().clone()
            else:
                value = pc.param.detach()
            diff = (whole.view(pc.shape).to(value.dtype).float() - value.float()).abs().max().item()
            worst = max(worst, diff)
    return {"max_abs_diff": worst, "coverage_ok": coverage_ok, "flats": flats}
