"""A single-process, plain-PyTorch twin of the training loop: the independent reference for the engine.

It simulates `world_size` data-parallel ranks by computing each rank's micro-batch loss in turn and
averaging, which is what DeepSpeed's gradient averaging does; no DeepSpeed code runs here, and the
cross-entropy is PyTorch's own (the trainer runs `trainer.losses.lean_cross_entropy`). The same
config, seed, tying, data and optimizer must give the same losses as `trainer.train.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import untied
from models.transformer import MoETransformer, build_model
from trainer.config import TrainConfig
from trainer.data import make_source
from trainer.losses import RouterTap, plain_cross_entropy, training_loss
from trainer.optim import build_optimizer, param_groups, set_lr
from trainer.schedule import lr_at


def untied_copy(tied: MoETransformer) -> MoETransformer:
    """The same function as `tied`, with every layer owning its own copy of what it borrowed.

    Used as a negative control (a trainer that silently untied would follow this model) and to
    check that a tied bank's gradient is the sum of its layers' gradients.
    """
    twin = build_model(untied(tied.config))
    for layer, source in zip(twin.model.layers, tied.model.layers):
        layer.load_state_dict(_full_layer_state(source))
    twin.model.embed_tokens.load_state_dict(tied.model.embed_tokens.state_dict())
    twin.model.norm.load_state_dict(tied.model.norm.state_dict())
    twin.lm_head.load_state_dict(tied.lm_head.state_dict())
    return twin


def _full_layer_state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A layer's state including modules it borrows (which its own state_dict leaves out)."""
    state = {f"input_layernorm.{k}": v for k, v in layer.input_layernorm.state_dict().items()}
    state |= {f"post_attention_layernorm.{k}": v for k, v in layer.post_attention_layernorm.state_dict().items()}
    state |= {f"self_attn.{k}": v for k, v in layer.self_attn.state_dict().items()}
    mlp = layer.mlp
    state |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    for name in ("experts", "gate"):
        if name in mlp.__dict__:  # borrowed
            state |= {f"mlp.{name}.{k}": v for k, v in getattr(mlp, name).state_dict().items()}
    return state


@dataclass
class ReferenceRun:
    losses: list[float]  # per step, mean total loss over simulated ranks and micro-steps
    grad_norms: list[float]  # per step, global gradient norm before clipping (each tied tensor once)
    model: MoETransformer  # after training


def reference_run(cfg: TrainConfig, world_size: int, steps: int | None = None,
                  untie_after_init: bool = False, start: dict | None = None, flat_banks: bool = False) -> ReferenceRun:
    """`untie_after_init`: start from the tied weights but train every layer separately (the control).
    `flat_banks`: Muon orthogonalises each expert bank as one flattened matrix (the Muon control).

    start: continue from a layout-free training state (`engine.gather_training_state` plus "step" and
    per-rank "data", as `trainer.reshard` writes it) instead of step 0.
    """
    cfg = cfg.for_world(world_size)  # batch.global_batch_tokens -> this world size's grad_accum, as the trainer
    model_cfg = cfg.model_config()
    model = build_model(model_cfg, seed=cfg.run.seed)
    if untie_after_init:
        model = untied_copy(model)
    optimizer = build_optimizer(param_groups(model, cfg.optim, model.config), cfg.optim, per_expert=not flat_banks)
    sources = [make_source(cfg, "train", r, world_size) for r in range(world_size)]
    first = 0
    if start is not None:
        first = _load_start(model, optimizer, sources, start)
    tap = RouterTap(model)
    schedule_steps = cfg.total_steps(world_size)
    losses, grad_norms = [], []
    for step in range(first, steps or schedule_steps):
        set_lr(optimizer, lr_at(step, schedule_steps, cfg.optim.lr, cfg.schedule))
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        n = world_size * cfg.batch.grad_accum
        for _ in range(cfg.batch.grad_accum):
            for source in sources:
                batch = source.next_batch()
                logits = model(batch["input_ids"])
                parts = training_loss(logits, batch["labels"], tap.take(), model_cfg.top_k,
                                      cfg.loss.load_balance_coef, cfg.loss.z_loss_coef, plain_cross_entropy)
                (parts.total / n).backward()
                total += parts.total.item() / n
        # parameters() yields each tied tensor once; max_norm=inf measures without clipping.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        losses.append(total)
        grad_norms.append(norm.item())
    tap.remove()
    return ReferenceRun(losses=losses, grad_norms=grad_norms, model=model)


def _load_start(model: MoETransformer, optimizer: torch.optim.Optimizer, sources: list, start: dict) -> int:
    """Weights, Adam moments and step, and each simulated rank's data position (random tokens: the index)."""
    model.load_state_dict(start["weights"])
    for name, param in model.named_parameters():
        optimizer.state[param] = {"step": torch.tensor(float(start["optimizer_step"])),
                                  **{key: start[key][name].clone() for key in ("exp_avg", "exp_avg_sq")}}
    for source in sources:
        source.load_state_dict({"index": start["data"][0]["index"]})
    return start["step"]
