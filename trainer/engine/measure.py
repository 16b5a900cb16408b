"""Read-only views of DeepSpeed's state for logs and memory reports: what each rank holds and moves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from trainer.engine.runtime import comm_device, max_over_ranks


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
            self.steps += 1  # every optimizer step of this process (the report's optimizer_steps_seen)
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
