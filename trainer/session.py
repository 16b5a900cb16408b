"""What one rank holds for a run, built once, and THE training step.

`open_session` resolves the config for the world size, builds the model, the DeepSpeed engine and
the data source once; `train_step` is the only optimizer step in the project: the training loop,
`trainer.bench` (timing), `trainer.memory` (state after a step) and `trainer.parity` (SGD gradient
check) all call it. `trainer.reference` stays a separate plain-PyTorch twin on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.accounting import Accounting, account, layer_parts
from models.config import LayerPlan, ModelConfig, layer_plan
from trainer import engine as eng
from trainer.config import TrainConfig
from trainer.data import BatchSource, make_source
from trainer.losses import RouterTap, lean_cross_entropy, training_loss
from trainer.optim import expert_bank_uses, expert_owner_of, set_lr

GRAD_NORM_PARTS = ("tied_experts", "untied_experts", "other")


@dataclass
class Session:
    cfg: TrainConfig  # resolved for the world size (`TrainConfig.for_world`)
    model_cfg: ModelConfig
    plan: list[LayerPlan]
    accounting: Accounting
    ds_config: dict[str, Any]  # what DeepSpeed got
    rank: int
    world: int
    engine: Any
    source: BatchSource
    tap: RouterTap
    gate: eng.UpdateGate  # lets train_step drop an update (run.on_nonfinite=skip)
    grads: eng.GradientWatch  # gradient bytes held at the last optimizer step (memory reports)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step(self.world)

    @property
    def steps(self) -> int:
        return self.cfg.total_steps(self.world)

    def close(self) -> None:
        self.tap.remove()


def open_session(cfg: TrainConfig) -> Session:
    """Engine, data and accounting for this rank. The process group must exist (`engine.init_distributed`)."""
    rank, world = eng.rank(), eng.world_size()
    cfg = cfg.for_world(world)
    model_cfg = cfg.model_config()
    gate = eng.UpdateGate()
    engine, ds_config = eng.initialize(eng.build(model_cfg, cfg), cfg, gate)
    torch.manual_seed(cfg.run.seed + rank)
    return Session(cfg=cfg, model_cfg=model_cfg, plan=layer_plan(model_cfg),
                   accounting=account(model_cfg, cfg.data.seq_len), ds_config=ds_config, rank=rank, world=world,
                   engine=engine, source=make_source(cfg, "train", rank, world), tap=RouterTap(engine.module),
                   gate=gate, grads=eng.GradientWatch(engine))


@dataclass
class StepResult:
    loss: float  # total loss, mean over micro-batches and ranks (identical on every rank)
    ce: float
    lb: float
    z: float
    router_logits: list[torch.Tensor]  # last micro-batch, this rank
    skipped: bool = False  # the update was dropped (run.on_nonfinite=skip)
    engine_grad_norm: float | None = None  # DeepSpeed's own global norm, every step where it computes one
    grad_norm: float | None = None  # global, before clipping, each tied tensor once (measured steps only)
    grad_norm_parts: dict[str, float] | None = None  # GRAD_NORM_PARTS -> norm

    @property
    def finite(self) -> bool:
        norms = [n for n in (self.grad_norm, self.engine_grad_norm) if n is not None]
        return all(math.isfinite(v) for v in [self.loss, *norms])


def train_step(s: Session, lr: float, measure_grad_norm: bool = False, poison: bool = False) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches at learning rate `lr` (tied banks scaled).

    measure_grad_norm: also compute the global gradient norm and its split (collective; costs a
    gradient gather at ZeRO-3, so the loop asks for it on log steps only). With
    `run.on_nonfinite=skip`, an update whose loss is non-finite on any rank is dropped: the ranks agree
    on the loss before the boundary's `engine.step()`, and the gate turns the optimizer's update into
    a no-op (weights and optimizer state unchanged). poison: make this step's loss NaN (fault injection
    for tests, `TIEDMOE_FAULT_NAN_AT_STEP`).
    """
    set_lr(s.engine.optimizer, lr)
    sums = torch.zeros(4, dtype=torch.float64)
    norms: dict[str, float] | None = None
    accum = s.cfg.batch.grad_accum
    for micro in range(accum):
        batch = eng.to_device(s.source.next_batch(), s.engine)
        logits = s.engine(batch["input_ids"])
        router_logits = s.tap.take()
        parts = training_loss(logits, batch["labels"], router_logits, s.model_cfg.top_k,
                              s.cfg.loss.load_balance_coef, s.cfg.loss.z_loss_coef)
        s.engine.backward(parts.total * float("nan") if poison else parts.total)
        sums += torch.tensor([parts.total.item(), parts.ce.item(), parts.lb.item(), parts.z.item()])
        if poison:
            sums[0] = float("nan")
        if micro == accum - 1:  # the boundary: gradients are reduced, the update is next
            if measure_grad_norm:
                norms = eng.grad_sq_norms(s.engine, _grad_norm_part(s.model_cfg))
            loss, ce, lb, z = eng.mean_over_ranks((sums / accum).tolist())
            s.gate.drop = s.cfg.run.on_nonfinite == "skip" and not math.isfinite(loss)
        s.engine.step()
    result = StepResult(loss=loss, ce=ce, lb=lb, z=z, router_logits=router_logits, skipped=s.gate.drop,
                        engine_grad_norm=eng.global_grad_norm(s.engine))
    s.gate.drop = False
    if norms is not None:
        result.grad_norm = math.sqrt(sum(norms.values()))
        result.grad_norm_parts = {k: math.sqrt(norms.get(k, 0.0)) for k in GRAD_NORM_PARTS}
    return result


def nonfinite_layers(s: Session, result: StepResult) -> list[int]:
    """MoE layers whose router logits were non-finite on any rank in the step's last micro-batch. Collective."""
    moe = [p.index for p in s.plan if p.ffn == "moe"]
    local = [0.0 if torch.isfinite(lg).all() else 1.0 for lg in result.router_logits]
    if len(local) != len(moe):
        return []
    return [layer for layer, bad in zip(moe, eng.max_over_ranks(local)) if bad]


def _grad_norm_part(model_cfg: ModelConfig) -> Any:
    uses = expert_bank_uses(model_cfg)

    def part(name: str) -> str:
        if expert_owner_of(name, uses) is not None:
            return "tied_experts"
        return "untied_experts" if ".mlp.experts." in name else "other"

    return part


@torch.no_grad()
def validation_ce(s: Session) -> float | None:
    """Mean cross-entropy over `run.eval_batches` validation micro-batches per rank (None: no validation data).

    The validation source is opened afresh each time, so every evaluation sees the same batches. Without
    autograd and with the training loss's cross-entropy: the forward kept every activation for a backward
    that never came, and `F.cross_entropy` on `.float()` logits made [tokens, vocab] fp32 tensors, so a
    run sized by the planner to fit training could run out of memory at its first validation.
    """
    source = make_source(s.cfg, "validation", s.rank, s.world)
    if source is None:
        return None
    s.engine.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(s.cfg.run.eval_batches):
            batch = eng.to_device(source.next_batch(), s.engine)
            logits = s.engine(batch["input_ids"])
            total += lean_cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
    s.tap.take()  # eval forwards are not part of any step's routing statistics
    s.engine.train()
    return eng.mean_over_ranks([total / s.cfg.run.eval_batches])[0]


def describe(s: Session) -> dict[str, Any]:
    """Sizes worth recording: measured per-rank expert elements vs what the untied model would hold."""
    acc, ep, zero_stage = s.accounting, s.cfg.parallel.expert_parallel_size, s.engine.zero_optimization_stage()
    measured = eng.gather_over_ranks(float(eng.local_expert_elements(s.engine)))
    # Untied: every MoE layer's bank, sharded over EP (and over the expert-data-parallel group at ZeRO-3).
    untied_expert = sum(layer_parts(s.model_cfg, p).get("experts", 0) for p in s.plan)
    shard = ep * (s.world // ep if zero_stage == 3 else 1)
    return {
        "zero_stage": zero_stage, "world_size": s.world, "expert_parallel_size": ep,
        "unique_params": acc.unique_params, "untied_params": acc.untied_params,
        "expert_banks": acc.expert_banks, "moe_layers": acc.moe_layers,
        "expert_elements_per_rank_measured": [int(v) for v in measured],
        "expert_elements_per_rank_if_untied": untied_expert // shard,
        "followers_share_leader_bank": followers_share_leader_bank(s),
    }


def followers_share_leader_bank(s: Session) -> bool:
    """Every tied follower runs its leader's expert module object (not a copy) in the live engine."""
    layers = s.engine.module.model.layers
    return all(layers[p.index].mlp.experts is layers[p.expert_owner].mlp.experts for p in s.plan if p.is_tied_follower)
