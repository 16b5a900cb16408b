"""Building a model into DeepSpeed: the tying seam and, at ZeRO-3, construction without the whole model.

`tied_expert_parallel` keeps tied banks tied through AutoEP (see the package docstring); `build` makes
the seed-determined model partitioned from the start, so no rank ever holds all parameters. Both are
exact: the weights equal a plain build's (tests/test_construction.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.moe import borrow
from models.transformer import MoETransformer, Normal, apply_tying, build_model
from trainer.config import TrainConfig
from trainer.engine.ds_config import deepspeed_config, refusals_named
from trainer.engine.runtime import comm_device, world_size


@contextlib.contextmanager
def tied_expert_parallel() -> Iterator[None]:
    """THE SEAM: re-tie experts right after AutoEP builds its layers (see the package docstring).

    With a model built partitioned (ZeRO-3, `build`), AutoEP reads each leader's experts from the
    partitions (`_repacked_from_partitions`) and DeepSpeed partitions each new EP block's experts as
    soon as the block replaces ours; a follower's block takes its leader's (already replaced) bank
    instead, so no rank ever holds a bank per layer.
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
            with whole_tensors_unmapped_on_free(), _repacked_from_partitions():
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


@contextlib.contextmanager
def _repacked_from_partitions() -> Iterator[None]:
    """While AutoEP builds its EP blocks from a partitioned model, give it each rank's experts from the
    ZeRO-3 partitions instead of the gathered bank.

    Why: AutoEP's repack gathers the whole bank on every rank and copies this rank's experts out of it
    twice, then into a fresh `GroupedExperts`: about two banks of transient host memory per layer, the
    largest term of the partitioned build's peak. Here a leader's experts are read from the partitions
    (where the EP range is this rank's own partition, as at EP = ranks, nothing travels), the gate/up
    split is the only copy, and the EP block adopts those tensors instead of copying them again. A tied
    follower's block gets untouched placeholders: the seam hands it its leader's bank before anything
    reads them, so the follower costs no bank at all. A leader's source partitions are released once read
    (nothing reads them again). Values are exactly AutoEP's (tests/test_construction.py, 2 and 4 ranks).
    Banks that are not ours, or not partitioned, take AutoEP's own path.
    """
    from deepspeed.module_inject import auto_ep_layer

    from models.moe import Experts

    repack, copy_data = auto_ep_layer.repack_expert_weights, auto_ep_layer._copy_parameter_data
    repacked: dict[int, torch.Tensor] = {}  # tensors handed to the EP block under construction
    leaders: set[int] = set()

    def repack_from_partitions(experts_source: nn.Module, spec: Any, ep_rank: int,
                               ep_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate_up, down = getattr(experts_source, "gate_up_proj", None), getattr(experts_source, "down_proj", None)
        if not (isinstance(experts_source, Experts) and hasattr(gate_up, "ds_tensor") and hasattr(down, "ds_tensor")
                and spec.expert_storage == "fused_3d" and spec.expert_w3_name is None):
            return repack(experts_source, spec, ep_rank, ep_size)
        n_experts, two_ffn, d_model = gate_up.ds_shape
        ffn, local = two_ffn // 2, n_experts // ep_size
        first = ep_rank * local
        if id(experts_source) in leaders:  # a follower: AutoEP visits each bank's leader first
            w1 = torch.empty(local, ffn, d_model, dtype=gate_up.ds_tensor.dtype)
            w3 = torch.empty_like(w1)
            w2 = torch.empty(local, d_model, ffn, dtype=down.ds_tensor.dtype)
        else:
            leaders.add(id(experts_source))
            block = _read_whole_range(gate_up, first * two_ffn * d_model, local * two_ffn * d_model)
            block = block.view(local, two_ffn, d_model)
            w1, w3 = block[:, :ffn].contiguous(), block[:, ffn:].contiguous()
            del block
            w2 = _read_whole_range(down, first * d_model * ffn, local * d_model * ffn).view(local, d_model, ffn)
            for source in (gate_up, down):  # read by no one after this: followers get placeholders
                source.ds_tensor.data = source.ds_tensor.data.new_empty(0)
        repacked.clear()
        repacked.update((id(t), t) for t in (w1, w2, w3))
        return w1, w2, w3

    def adopt_or_copy(target: nn.Parameter, source: torch.Tensor) -> None:
        # Adopting (not copying) is safe: the block's experts are partitioned (copied into ZeRO
        # partitions) or replaced by the leader's right after construction.
        if repacked.pop(id(source), None) is source:
            target.data = source
        else:
            copy_data(target, source)

    auto_ep_layer.repack_expert_weights, auto_ep_layer._copy_parameter_data = repack_from_partitions, adopt_or_copy
    try:
        yield
    finally:
        auto_ep_layer.repack_expert_weights, auto_ep_layer._copy_parameter_data = repack, copy_data
        repacked.clear()


def _read_whole_range(param: nn.Parameter, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of a ZeRO-3 parameter's flattened whole, assembled from the partitions.

    Collective over the parameter's partition group (every rank calls it for the same parameter, each with
    its own range). A range inside this rank's partition is returned as a view of it; otherwise each
    partition another rank needs is broadcast once by its holder, so at most one partition is in flight.
    """
    import deepspeed.comm as dist

    group = param.ds_process_group
    me, ranks = dist.get_rank(group=group), dist.get_world_size(group=group)
    held = param.ds_tensor.data
    size = param.partition_numel()
    wanted = torch.tensor([start, start + count], dtype=torch.int64, device=comm_device())
    ranges = [torch.empty_like(wanted) for _ in range(ranks)]
    dist.all_gather(ranges, wanted, group=group)
    spans = [(int(lo), int(hi)) for lo, hi in (r.tolist() for r in ranges)]
    mine = me * size
    inside = mine <= start and start + count <= mine + size
    out = held[start - mine:start - mine + count] if inside else torch.empty(count, dtype=held.dtype, device=held.device)
    for src in range(ranks):
        lo, hi = src * size, min((src + 1) * size, param.ds_numel)
        needs = [(max(lo, a), min(hi, b)) for r, (a, b) in enumerate(spans) if r != src and max(lo, a) < min(hi, b)]
        a, b = max(lo, start), min(hi, start + count)
        if needs:
            first, last = min(n[0] for n in needs), max(n[1] for n in needs)
            travel = held[first - lo:last - lo] if me == src else torch.empty(last - first, dtype=held.dtype, device=held.device)
            on_wire = travel.to(comm_device())
            dist.broadcast(on_wire, src=dist.get_global_rank(group, src), group=group)
            if me != src and a < b:
                out[a - start:b - start].copy_(on_wire[a - first:b - first])
            del travel, on_wire
        if me == src and a < b and not inside:
            out[a - start:b - start].copy_(held[a - lo:b - lo])
    return out


def build(model_cfg: ModelConfig, cfg: TrainConfig) -> MoETransformer:
    """The seed-determined model for this rank, built partitioned when the engine runs ZeRO-3.

    Why: a plain build materialises every parameter on every rank before ZeRO-3 partitions it
    (an OLMoE-1B-7B rank would need 28 GB of host memory first). Under `deepspeed.zero.Init` each
    module is partitioned as soon as it is built (no broadcast from rank 0: the writer sets every
    partition; torch's default inits only advance the random stream: `_default_inits_draw_only`), followers build no bank at all (`BankSlot`), each
    parameter's init is drawn once, one parameter (and for `Normal` one piece) at a time, keeping only
    this rank's slice; AutoEP then builds its blocks from the partitions (`_repacked_from_partitions`)
    and the tying seam hands a follower's EP block its leader's bank. Tensors are created on the CPU as in a plain build (no device/dtype override) and
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

    class PartitionOnlyInit(deepspeed.zero.Init):
        """zero.Init that, while the modules are built, partitions each new parameter without first
        broadcasting it from rank 0: `_write_partition` overwrites every partition, and receiving the
        broadcast fills a whole tensor on every other rank (0.4 GiB for a 50k x 2048 head)."""

        building = True

        def _zero_init_param(self, param: nn.Parameter) -> None:
            if not self.building:  # parameters DeepSpeed converts later (AutoEP's): as DeepSpeed does
                return super()._zero_init_param(param)
            self._convert_to_deepspeed_param(param)
            param.partition()

    @contextlib.contextmanager
    def construct() -> Iterator[None]:
        init = PartitionOnlyInit(config_dict_or_path=ds_config, dtype=torch.float32, tensor_overrides=[],
                                 data_parallel_group=partition_group)
        with init, _default_inits_draw_only():
            yield
        init.building = False

    written: set[int] = set()

    def write(param: nn.Parameter, init: Callable[[torch.Tensor], object]) -> None:
        _write_partition(param, init)
        written.add(id(param))

    with whole_tensors_unmapped_on_free(), refusals_named(cfg):
        model = build_model(model_cfg, seed=cfg.run.seed, construct=construct, write=write)
        unwritten = [name for name, param in model.named_parameters() if id(param) not in written]
        if unwritten:  # they would hold whatever memory zero.Init found: no broadcast, no default init
            raise RuntimeError(f"models.transformer.init_plan draws no init for {unwritten}")
        if cfg.run.precision == "bf16":
            _cast_partitions(model, torch.bfloat16)
        release_freed_memory()
    return model


@contextlib.contextmanager
def _default_inits_draw_only() -> Iterator[None]:
    """While the modules are built, torch's default inits (Linear's `kaiming_uniform_` and `uniform_`,
    Embedding's `normal_`) only advance the random stream, piece by piece, and leave the tensor untouched.

    Why: zero.Init partitions a module's parameters after its constructor ran, so each whole weight was
    first allocated and filled: the head's (0.4 GiB at 50k x 2048) was the largest transient of the
    build. Those values are overwritten by `reset_parameters`; only their draws matter (they shift every
    later weight), and the draws still happen, so the weights stay those of a plain build. Pages never
    written cost no memory, and zero.Init's partitioning only reads them.
    """
    from torch.nn import init

    from models.transformer import advance_stream

    fills = {"kaiming_uniform_": torch.Tensor.uniform_, "uniform_": torch.Tensor.uniform_,
             "normal_": torch.Tensor.normal_}
    saved = {name: getattr(init, name) for name in fills}

    def draw_only(name: str) -> Callable[..., torch.Tensor]:
        def advance(tensor: torch.Tensor, *args: Any, generator: torch.Generator | None = None,
                    **kwargs: Any) -> torch.Tensor:
            if generator is not None or tensor.dtype != torch.float32:  # not a default init: as torch does it
                return saved[name](tensor, *args, generator=generator, **kwargs)
            advance_stream(tensor.numel(), fills[name])
            return tensor
        return advance

    for name in fills:
        setattr(init, name, draw_only(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


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
    """Draw the parameter on the CPU (fp32, as a plain build does; piece by piece for `Normal`, whole
    otherwise) and keep this rank's ZeRO-3 slice.

    Why not `GatheredParameters`: every rank draws the same values anyway, and gathering, modifying and
    re-partitioning holds the whole tensor twice per rank (the peak while building) and talks to every
    rank per parameter.
    """
    start, count = held_range(param)
    held = param.ds_tensor.data
    with torch.no_grad():
        if isinstance(init, Normal):  # elementwise: drawn piece by piece, the same values (see `Normal`)
            for at, piece in init.pieces(param.ds_numel):
                lo, hi = max(at, start), min(at + piece.numel(), start + count)
                if lo < hi:
                    held[lo - start:hi - start].copy_(piece[lo - at:hi - at])
        else:
            whole = torch.empty(param.ds_shape, dtype=torch.float32)
            init(whole)
            held[:count].copy_(whole.view(-1)[start:start + count])
            del whole
    release_freed_memory(collect=False)


def held_range(param: nn.Parameter) -> tuple[int, int]:
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
