"""The only package that touches DeepSpeed internals; the rest of tiedmoe calls it as `trainer.engine`.

Expert parallelism comes from DeepSpeed AutoEP (`"expert_parallel"` config, 0.19+), which swaps each
`model.layers.N.mlp` MoE block for an `AutoEPMoELayer` inside `DeepSpeedEngine.__init__`, cloning
the expert weights per layer. That silently unties a tied model, so `tied_expert_parallel()` wraps
the engine's `_configure_expert_parallel` and re-applies the model's layer plan right after the EP
layers are built and before ZeRO partitions anything: each follower then runs its leader's
`GroupedExperts` (and router / attention when tied) without registering it, so ZeRO-3 partitions each
shared bank exactly once. That wrapper, with the partitioned build it serves, is the one seam that
changes behaviour (`construction`). The other internals are read, not changed: `measure` (ZeRO-3
all-gather traffic, the optimizer's flat partitions and state, gradient buffers, partitions and
DeepSpeed's estimators for memory reports, reduced gradients by category), `state` (a full state
dict and the training state gathered from, or scattered onto, the ranks: export, reshard),
`muon_layouts` (which whole tensors a ZeRO / bf16 flat partition holds pieces of, for Muon).
`runtime` starts the process group and holds the small collectives the trainer uses, so no module
outside this package imports deepspeed; `ds_config` turns a run's config into DeepSpeed's.

Here: the optimizer the engine steps (`optimizer_factory`, `UpdateGate`) and `initialize`, with two
changes to how, not what, ZeRO-3 gathers: `gather_persistent_parameters_at_once` re-gathers its
persistent parameters after a step in one collective instead of one per parameter, and
`zero3_hooks.drop_idle_module_hooks` removes its module hooks where they never gather anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.transformer import MoETransformer
from trainer.config import TrainConfig
from trainer.engine.construction import build, tied_expert_parallel
from trainer.engine.ds_config import (autoep_settings, check_deepspeed_config, deepspeed_config, refusals_named,
                                      tie_aware_reuse_distance)
from trainer.engine.measure import (GatherCounter, GradientWatch, deepspeed_estimates, global_grad_norm, grad_sq_norms,
                                    gradient_tensors, held_tensor, is_expert_param, local_expert_elements,
                                    local_param_elements, optimizer_tensors_by_kind, params_finite)
from trainer.engine.muon_layouts import attach_muon_layouts, check_muon_layouts
from trainer.engine.runtime import (RefusedOnEveryRank, barrier, comm_device, gather_over_ranks, init_distributed,
                                    launched_world_size, max_over_ranks, mean_over_ranks, on_every_rank, on_rank_zero, rank,
                                    set_cpu_local_size, shutdown, synchronize, to_device, use_cpu_if_no_gpu,
                                    world_size)
from trainer.engine.state import (ADAM_STATE_KEYS, gather_state_dict, gather_training_state,
                                  scatter_training_state)
from trainer.engine.zero3_hooks import drop_idle_module_hooks
from trainer.optim import build_optimizer, joint_row_blocks, param_groups

__all__ = [
    "ADAM_STATE_KEYS", "GatherCounter", "GradientWatch", "RefusedOnEveryRank", "UpdateGate", "attach_muon_layouts", "autoep_settings",
    "barrier", "build", "check_deepspeed_config", "check_muon_layouts", "comm_device", "deepspeed_config", "deepspeed_estimates",
    "drop_idle_module_hooks",
    "gather_over_ranks", "gather_state_dict", "gather_training_state", "global_grad_norm", "grad_sq_norms",
    "gradient_tensors", "held_tensor", "init_distributed", "initialize", "is_expert_param", "launched_world_size",
    "local_expert_elements", "local_param_elements", "max_over_ranks", "mean_over_ranks", "on_every_rank", "on_rank_zero", "optimizer_factory",
    "optimizer_tensors_by_kind", "params_finite", "plain_initialize", "rank", "scatter_training_state",
    "set_cpu_local_size", "shutdown", "synchronize", "tie_aware_reuse_distance", "tied_expert_parallel", "to_device",
    "use_cpu_if_no_gpu", "world_size",
]


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

    def make(_params: Any) -> torch.optim.Optimizer:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        if on_built is not None:  # AutoEP blocks in place and tied; no optimizer state exists yet
            on_built()

        groups = param_groups(model, cfg.optim, model.config)
        return gate.wrap(build_optimizer(split_params_into_different_moe_groups_for_optimizer(groups), cfg.optim,
                                         row_blocks=joint_row_blocks(model)))

    return make


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
    with refusals_named(cfg), tied_expert_parallel():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_factory(model, cfg, gate or UpdateGate(), on_built),
                                               config=ds_config)
    attach_muon_layouts(engine)
    gather_persistent_parameters_at_once(engine)
    drop_idle_module_hooks(engine)
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
