"""The DeepSpeed config of a run: engine settings from `ds_configs/*.json`, everything else from the YAML."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from models.accounting import layer_parts
from models.config import ModelConfig, layer_plan
from trainer.config import TrainConfig, load_engine_settings


@contextlib.contextmanager
def refusals_named(cfg: TrainConfig) -> Iterator[None]:
    """DeepSpeed checks its config against its own schema deep inside `zero.Init` or `initialize`; its
    error names a class and a key. Name the file the user can fix, as a one-line ValueError (exit 2)."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"parallel.ds_config={cfg.parallel.ds_config}: DeepSpeed refuses it "
                         f"({err.title}: {detail})") from None


def check_deepspeed_config(resolved: TrainConfig) -> None:
    """DeepSpeed's own schema check of the config a run (`resolved` for its world: `TrainConfig.for_world`)
    will hand it, before any process group exists.

    Why: inside the ranks DeepSpeed checks it in `zero.Init` or `initialize`, after process groups are set
    up; a rank that leaves there with the one-line error can reset a peer still connecting its gloo group,
    which then dies with a traceback. Here it is one line from the launcher, or from every rank alike."""
    import deepspeed.comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig takes the world as 1 without a process group (the batch sizes are then given for one rank),
    # and as the group's size in a process that has one (a second run in one process: tests, tools)
    seen = dist.get_world_size() if dist.is_initialized() else 1
    with refusals_named(resolved):
        DeepSpeedConfig(deepspeed_config(resolved, resolved.model_config(), seen))


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
