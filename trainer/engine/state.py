"""Whole tensors from the ranks' pieces and back: a full state dict (export) and the training state (reshard)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn



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


def basic_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed drives (inside a ZeRO / bf16 wrapper, or the engine's own)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _link_optimizer_state_fragments(engine: Any) -> None:
    """ZeRO-1/2 and the bf16 optimizer link each parameter to its optimizer-state fragments lazily, after their
    first step (and before the state exists); link again now that it does. Without it, reading the moments right
    after a checkpoint load (no step taken: `trainer.reshard` of a ZeRO-1/2 or bf16 run) failed inside DeepSpeed
    with "argument of type 'NoneType' is not iterable"."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


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

    _link_optimizer_state_fragments(engine)  # reshard reads right after a checkpoint load, before any step
    steps = {float(st["step"]) for st in basic_optimizer(engine).state.values() if "step" in st}
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

    basic = basic_optimizer(engine)
    _link_optimizer_state_fragments(engine)
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
