"""The DeepSpeed config of a run: engine settings from `ds_configs/*.json`, everything else from the YAML."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Iterator, KeysView
from typing import Any

from models.accounting import layer_parts
from models.config import ModelConfig, layer_plan
from trainer.config import TRAINER_OWNED_DS_KEYS, TrainConfig, load_engine_settings, offload_keys


@contextlib.contextmanager
def refusals_named(cfg: TrainConfig) -> Iterator[None]:
    """DeepSpeed checks its config against its own schema deep inside `zero.Init` or `initialize`; its
    error names a class and a key. Name the file the user can fix, as a one-line ValueError (exit 2)."""
    from deepspeed.runtime.config import DeepSpeedConfigError
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise _refused(cfg, f"{err.title}: {detail}") from None
    except DeepSpeedConfigError as err:  # e.g. a block of a feature DeepSpeed removed ("elasticity": {...})
        raise _refused(cfg, str(err)) from None


def _refused(cfg: TrainConfig, why: str) -> ValueError:
    return ValueError(f"parallel.ds_config={cfg.parallel.ds_config}: DeepSpeed refuses it ({' '.join(why.split())})")


def check_deepspeed_config(resolved: TrainConfig) -> None:
    """DeepSpeed's own schema check of the config a run (`resolved` for its world: `TrainConfig.for_world`)
    will hand it, before any process group exists.

    Why: inside the ranks DeepSpeed checks it in `zero.Init` or `initialize`, after process groups are set
    up; a rank that leaves there with the one-line error can reset a peer still connecting its gloo group,
    which then dies with a traceback. Here it is one line from the launcher, or from every rank alike."""
    import deepspeed.comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    # DeepSpeedConfig takes the world as 1 without a process group (the batch sizes are then given for one rank),
    # and as the group's size in a process that has one (a second run in one process: tests, tools)
    seen = dist.get_world_size() if dist.is_initialized() else 1
    settings = deepspeed_config(resolved, resolved.model_config(), seen)  # its own errors name their key already
    check_unchecked_blocks(resolved, settings)
    with refusals_named(resolved):
        try:
            DeepSpeedConfig(settings)
        except ValidationError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, AssertionError) as err:
            # its value checks ("Invalid gradient_allreduce_op ...") named no file; a value of another type than a
            # block's default that `check_unchecked_blocks` does not know failed with a bare TypeError traceback
            raise _refused(resolved, f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)) \
                from None


# Blocks DeepSpeed reads without a schema (get_scalar_param: any value is stored, and fails where it is used, e.g.
# `"flops_profiler": {"enabled": "maybe"}` a TypeError in DeepSpeedConfig) and the dtype names of `data_types`, which
# it resolves only in the engine (`'bogus' is not a valid DtypeEnum` from inside the ranks, naming no key).
_DTYPE_KEYS = ("grad_accum_dtype", "param_dtype", "buffer_dtype")


def _schemaless_defaults() -> dict[str, dict[str, Any]]:
    """Block -> its scalar settings and their defaults, as the installed DeepSpeed parses an empty config."""
    from deepspeed.profiling.config import DeepSpeedFlopsProfilerConfig
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig
    from deepspeed.runtime.config import get_aio_config

    return {"flops_profiler": vars(DeepSpeedFlopsProfilerConfig({})),
            "activation_checkpointing": vars(DeepSpeedActivationCheckpointingConfig({})), "aio": get_aio_config({})}


def check_unchecked_blocks(cfg: TrainConfig, settings: dict[str, Any]) -> None:
    """Refuse, naming the file and the key, a setting of a schema-less block whose type differs from its default's,
    and a `data_types` dtype DeepSpeed does not know (it would fail inside the ranks, or name neither)."""
    from deepspeed.runtime.config import DtypeEnum

    where = f"parallel.ds_config={cfg.parallel.ds_config}"
    for block, defaults in _schemaless_defaults().items():
        for key, value in settings.get(block, {}).items():
            default = defaults.get(key)
            if default is not None and not _same_kind(value, default):
                kind = next(t for t in (bool, int, float, str) if isinstance(default, t))
                raise ValueError(f"{where}: {block}.{key}={value!r}, expected "
                                 f"{'an integer' if kind is int else _EXPECTED[kind]}")
    for key in _DTYPE_KEYS:
        value = settings.get("data_types", {}).get(key)
        if value is not None:
            try:
                DtypeEnum(value)
            except (ValueError, TypeError):
                names = sorted({v for member in DtypeEnum for v in member._all_values if isinstance(v, str)
                                and not v.startswith("torch.")})
                raise ValueError(f"{where}: data_types.{key}={value!r}, expected one of {', '.join(names)}") from None


def _same_kind(value: Any, default: Any) -> bool:
    """JSON's view of a default's type: true is no number, an integer is a number where the default is a float."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def deepspeed_config(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> dict[str, Any]:
    """Engine settings from the ds_config file plus what the trainer config (resolved for the world) owns.
    A top-level key of the file that DeepSpeed would not read, or a value of the wrong type, is refused here
    (`check_top_level`), so every path to DeepSpeed (launcher, ranks, tools) refuses it alike."""
    settings = load_engine_settings(cfg)
    check_top_level(cfg, settings)
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
        data_types = settings.get("data_types", {})
        if data_types.get("grad_accum_dtype", "fp32") != "fp32":
            raise ValueError(f"parallel.ds_config={cfg.parallel.ds_config}: data_types.grad_accum_dtype="
                             f"{data_types['grad_accum_dtype']!r}; with run.precision=bf16 at ZeRO 1-3 the trainer "
                             f"accumulates in fp32, remove it")
        settings["data_types"] = {**data_types, "grad_accum_dtype": "fp32"}  # the file's other data_types stay
    offloaded = offload_keys(zero)
    nvme = [key for key in offloaded if isinstance(zero[key], dict) and zero[key].get("device") == "nvme"]
    if nvme and not _async_io_loads():  # it failed inside the ranks, a RuntimeError traceback from its JIT load
        raise ValueError(f"parallel.ds_config={cfg.parallel.ds_config}: zero_optimization.{nvme[0]}.device='nvme' "
                         f"needs DeepSpeed's async_io op, which this DeepSpeed install cannot load; use 'cpu'")
    if {"offload_optimizer", "cpu_offload"} & set(offloaded):
        # DeepSpeed refuses a torch optimizer on offloaded partitions unless told to take it (its own CPU Adam needs
        # compiled ops, which this install does not build); AdamW / SGD then step the fp32 partitions on the CPU
        if settings.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(f"parallel.ds_config={cfg.parallel.ds_config}: zero_force_ds_cpu_optimizer=true with "
                             f"zero_optimization offload asks for DeepSpeed's CPU Adam, which the trainer does not use "
                             f"(it steps a torch optimizer on the offloaded partitions); remove it")
        settings["zero_force_ds_cpu_optimizer"] = False
    if zero.get("stage") == 3 and "stage3_max_reuse_distance" not in zero:
        zero["stage3_max_reuse_distance"] = tie_aware_reuse_distance(model_cfg)
    return settings


@functools.cache
def _async_io_loads() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) is built or can be built here (libaio): not on a CPU install."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))


# The top-level scalars DeepSpeed reads, and their JSON types (defaults: deepspeed/runtime/constants.py, use:
# deepspeed/runtime/config.py). DeepSpeedConfig stores them as given, so a wrong type failed far from the file:
# "steps_per_print": "x" was a TypeError traceback inside the ranks at the first step. None: null is allowed
# (DeepSpeed's default is null). Every other key DeepSpeed reads is a section, a JSON object that DeepSpeed's
# own config classes check inside; tests/test_cli_errors.py checks this list against `deepspeed_reads()`.
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(["dump_state", "disable_python_gc", "disable_allgather", "prescale_gradients", "memory_breakdown",
                     "managed_gradient_accumulation", "zero_force_ds_cpu_optimizer", "wall_clock_breakdown",
                     "use_data_before_expert_parallelism", "dataloader_drop_last"], (bool,)),
    "gradient_predivide_factor": (float,),
    "gradient_allreduce_op": (str,),  # its values DeepSpeedConfig checks itself, as those of the two *_data_type
    "seq_parallel_communication_data_type": (str,),
    "communication_data_type": (str, None),
    "log_level": (str, None),
    "steps_per_print": (int, None),
    "vocabulary_size": (int, None),
    "sequence_parallel_size": (int,),  # these two: read by deepspeed.initialize, before DeepSpeedConfig
    "data_parallel_size": (int,),
}
_EXPECTED = {bool: "true or false", float: "a number", int: "a positive integer", str: "a string",
             dict: "a JSON object"}


class _LookupLog(dict):
    """A dict that notes every key looked up in it (`get`, `[]`, `in`, `in .keys()`), also in its copies."""

    def __init__(self, items: dict[str, Any], seen: set[Any]) -> None:
        super().__init__(items)
        self.seen = seen

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self) -> KeysView[str]:  # type: ignore[override]  # `key in d.keys()` then goes through __contains__
        return KeysView(self)

    def __copy__(self) -> "_LookupLog":  # DeepSpeedConfig parses a copy of what it is given
        return _LookupLog(self, self.seen)


@functools.cache
def deepspeed_reads() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed reads: those DeepSpeedConfig (the engine's parser, also
    zero.Init's) looks up, noted while it parses a minimal config, and the two deepspeed.initialize reads."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[Any] = set()
    DeepSpeedConfig(_LookupLog({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}, seen))
    return frozenset(seen | {"sequence_parallel_size", "data_parallel_size"})


def _removed_keys() -> frozenset[str]:
    """Blocks of features DeepSpeed removed: it looks them up only to refuse them, with its own message (a private
    name of deepspeed.runtime.config; none where it is gone, and those keys are then refused as unknown)."""
    import deepspeed.runtime.config as ds_config

    return frozenset(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))


def check_top_level(cfg: TrainConfig, settings: dict[str, Any]) -> None:
    """Refuse a top-level key of the ds_config file that DeepSpeed does not read, and a value of the wrong type.

    Why: DeepSpeed ignores a key it does not know (`"zero_optimisation": {"stage": 3}` trained at ZeRO 0), and
    stores top-level scalars as given, to fail inside the ranks (the file's keys only: the trainer's own are
    refused by `load_engine_settings`)."""
    import deepspeed

    where = f"parallel.ds_config={cfg.parallel.ds_config}"
    removed = _removed_keys()
    settable = deepspeed_reads() - removed - TRAINER_OWNED_DS_KEYS
    for key, value in settings.items():
        if key in removed:
            continue  # DeepSpeedConfig refuses it by name (`refusals_named`)
        if key not in settable:
            close = difflib.get_close_matches(key, settable, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"DeepSpeed reads: {', '.join(sorted(settable))}"
            raise ValueError(f"{where}: unknown top-level key {key!r}, which DeepSpeed {deepspeed.__version__} "
                             f"does not read ({hint})")
        typ, *null = _SCALAR_TYPES.get(key, (dict,))
        if not (_has_type(value, typ) or (null and value is None)):
            raise ValueError(f"{where}: {key}={value!r}, expected {_EXPECTED[typ]}{' or null' if null else ''}")


def _has_type(value: Any, typ: type) -> bool:
    """JSON's view: true is no number, an integer is a number (every integer above is a count or a period: >= 1)."""
    if isinstance(value, bool):
        return typ is bool
    if typ is int:
        return isinstance(value, int) and value >= 1  # "steps_per_print": 0 divided by zero at the first step
    return isinstance(value, (int, float) if typ is float else typ)


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
