"""Typed training configuration: YAML file + dotted `key=value` overrides -> `TrainConfig`.

Unknown keys and bad values raise ValueError naming the dotted key. `ds_configs/*.json` hold engine
settings only (ZeRO stage, offload, ...); everything else (batch sizes, clipping, precision, expert
parallelism) comes from here and the trainer writes the final DeepSpeed config itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from models.config import UNTIED_FIELDS, ModelConfig, from_preset, layer_plan
from models.overrides import merge, nest, parse_overrides, yaml_problem

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "trainer" / "configs" / "default.yaml"


@dataclass
class ModelSection:
    preset: str = "olmoe_tiny"  # a name in models.config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field, e.g. tie_group_size: 2


@dataclass
class DataSection:
    source: Literal["shards", "random", "stream"] = "shards"  # packed shards, random tokens, or tokenize on the fly
    path: str = "data/default"  # shard directory (relative to the repo root unless absolute)
    build_if_missing: bool = True  # run `python -m data_prep.build` for the default corpus when absent
    seq_len: int = 128  # tokens per training sequence (at most model.max_seq_len)
    # source=stream: local txt/jsonl/parquet files (glob) or a save_to_disk folder, read as a stream
    stream_train: str | None = None
    stream_validation: str | None = None  # optional; without it there is no validation loss
    tokenizer: str | None = None  # tokenizer JSON for source=stream (e.g. a data set's tokenizer.json)
    text_field: str = "text"  # source=stream: jsonl field / parquet or dataset column holding the text


@dataclass
class OptimSection:
    # muon: the paper's split (trainer/optim.py), Muon on hidden matrices and per expert, AdamW for the rest;
    # any ZeRO stage (0-3, no offload), fp32 or bf16
    name: Literal["adamw", "sgd", "muon"] = "adamw"
    lr: float = 3e-3  # muon: the Muon lr (paper 2e-2); its AdamW half runs at lr x adam_lr_ratio
    betas: tuple[float, float] = (0.9, 0.95)  # adamw, and muon's AdamW half
    eps: float = 1e-8  # adamw, and muon's AdamW half
    weight_decay: float = 0.1  # adamw / sgd; not applied to norms and biases
    momentum: float = 0.0  # sgd only
    grad_clip: float = 1.0  # 0 disables; each tied tensor counts once in the norm
    # LR multiplier of a bank shared by g layers, for every optimizer and group: 1/sqrt(g) (paper), 1/g, 1, or a number
    tied_lr_scale: Literal["inv_sqrt_g", "inv_g", "none"] | float = "inv_sqrt_g"
    muon_momentum: float = 0.95  # muon: momentum of the Muon half
    muon_nesterov: bool = True  # muon: Nesterov blend of gradient and momentum
    muon_weight_decay: float = 0.1  # muon: decoupled decay of hidden matrices and expert banks
    muon_ns_steps: int = 5  # muon: Newton-Schulz iterations per orthogonalisation
    adam_lr_ratio: float = 0.1  # muon: embeddings, LM head, routers and 1-D tensors at lr x this (AdamW)
    adam_weight_decay: float = 0.01  # muon: decoupled decay of the AdamW half (every tensor in it, as the paper)


# Which optimizers read each optimizer-specific field (trainer/optim.py); the others read every one.
OPTIM_FIELDS_USED_ONLY_BY: dict[str, tuple[str, ...]] = {
    "betas": ("adamw", "muon"), "eps": ("adamw", "muon"), "weight_decay": ("adamw", "sgd"), "momentum": ("sgd",),
    **{name: ("muon",) for name in ("muon_momentum", "muon_nesterov", "muon_weight_decay", "muon_ns_steps",
                                     "adam_lr_ratio", "adam_weight_decay")},
}


@dataclass
class ScheduleSection:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"  # after warmup (trainer/schedule.py)
    warmup_steps: int = 10  # linear from lr / warmup_steps to lr (0: none)
    # floor lr = lr * min_lr_ratio (cosine, wsd): wsd's last step runs at it; cosine reaches it at step run.steps,
    # one past the last update (whose lr is just above it; on short runs visibly: 6 steps, 2 warmup: 2.3 x floor)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end


@dataclass
class BatchSection:
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    global_batch_tokens: int | None = None  # if set, grad_accum = this / (micro * world * seq_len)


@dataclass
class LossSection:
    load_balance_coef: float = 0.01  # weight of the mean over MoE layers of the load-balancing loss (0: off)
    z_loss_coef: float = 1e-4  # weight of the mean over MoE layers of the router z-loss (0: off)


@dataclass
class ParallelSection:
    ds_config: str = "ds_configs/zero3.json"  # engine settings only
    expert_parallel_size: int = 2  # ranks an expert bank is split over (AutoEP); divides world size and E
    activation_checkpointing: bool = False  # recompute each layer's activations in backward


@dataclass
class RunSection:
    name: str = "default"  # the run directory is out_dir/name (a plain folder name)
    out_dir: str = "runs"  # relative to the repo root unless absolute
    steps: int = 100  # optimizer steps of the whole run (the schedule's length)
    tokens: int | None = None  # alternative to steps (replaces it): this many tokens, in whole steps (rounded down)
    seed: int = 0  # model init, data order and random tokens
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: bf16 weights and activations, fp32 master weights
    log_every: int = 10  # progress line, metrics.jsonl and TensorBoard every N steps (and the last)
    eval_every: int = 0  # validation every N steps (0: only at the end)
    eval_batches: int = 4  # validation micro-batches per rank each time validation runs (the same ones every time)
    downstream_every: int = 0  # lm-eval downstream subset every N steps (0: off); logged as downstream/<task>
    downstream_tasks: str = "arc_easy,piqa"  # comma-separated, from trainer/eval_tasks (offline)
    downstream_limit: int = 20  # documents per task (a quick in-loop signal, not a benchmark)
    downstream_fewshot: int = 3  # few-shot examples in each downstream prompt (lm-eval num_fewshot)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest N kept (0: keep all)
    resume: Literal["auto", "never"] = "auto"  # auto: continue from <run dir>/checkpoints/latest if present
    stop_at_step: int | None = None  # leave after this step (checkpointed), as a time-limited job would; <= steps
    # a non-finite loss or gradient norm: "stop" exits 3 without saving it; "skip" drops an update whose loss is
    # non-finite, counts it and trains on (a non-finite gradient norm of a finite loss still exits 3; a
    # non-finite checkpoint never becomes `latest` either way)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 5  # on_nonfinite=skip: stop (exit 3) after this many dropped updates in a row
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; null: known GPU table, or a CPU matmul probe


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    loss: LossSection = field(default_factory=LossSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)

    def model_config(self) -> ModelConfig:
        return from_preset(self.model.preset, **self.model.overrides)

    def untied(self) -> "TrainConfig":
        """This run with the untied twin of its model (`models.config.untied`), everything else equal."""
        model = dataclasses.replace(self.model, overrides={**self.model.overrides, **UNTIED_FIELDS})
        return dataclasses.replace(self, model=model)

    def for_world(self, world_size: int) -> "TrainConfig":
        """This config resolved for `world_size` ranks: a new value, the world-dependent checks done.

        The global batch is the fact when `batch.global_batch_tokens` is set; gradient accumulation
        follows from it and the world size, so the same config runs on 2 or 64 ranks.
        """
        ep = self.parallel.expert_parallel_size
        if world_size % ep:
            raise ValueError(f"parallel.expert_parallel_size={ep}: expected a divisor of the world size {world_size}")
        if self.batch.global_batch_tokens is None:
            self._check_stop_at_step(world_size)
            return self
        per_micro_step = self.batch.micro_batch_size * world_size * self.data.seq_len
        accum, rest = divmod(self.batch.global_batch_tokens, per_micro_step)
        if rest or accum < 1:
            raise ValueError(f"batch.global_batch_tokens={self.batch.global_batch_tokens}: expected a multiple of "
                             f"micro_batch_size x world_size x seq_len = {per_micro_step}")
        if self.batch.grad_accum not in (1, accum):
            raise ValueError(f"batch.grad_accum={self.batch.grad_accum}: disagrees with batch.global_batch_tokens="
                             f"{self.batch.global_batch_tokens} on {world_size} ranks (which needs {accum}); set one")
        resolved = dataclasses.replace(self, batch=dataclasses.replace(self.batch, grad_accum=accum))
        resolved._check_stop_at_step(world_size)
        return resolved

    def _check_stop_at_step(self, world_size: int) -> None:
        """`run.stop_at_step` past the run's last step stopped nothing: the run trained to its end as if it
        were unset. With `run.tokens` the length is known only per world size, hence here as well."""
        stop, steps = self.run.stop_at_step, self.total_steps(world_size)
        if stop is not None and stop > steps:
            length = (f"{steps} steps (run.tokens={self.run.tokens} on {world_size} ranks)" if self.run.tokens
                      else f"run.steps={steps}")
            raise ValueError(f"run.stop_at_step={stop}: expected at most the run's length, {length}; "
                             f"raise run.steps (or run.tokens) to train longer, or remove run.stop_at_step")

    def tokens_per_step(self, world_size: int) -> int:
        return self.batch.micro_batch_size * self.batch.grad_accum * world_size * self.data.seq_len

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps of the whole run (`run.tokens` converted at this world size)."""
        if self.run.tokens is None:
            return self.run.steps
        return max(1, self.run.tokens // self.tokens_per_step(world_size))

    def tokens_note(self, world_size: int) -> str | None:
        """What `run.tokens` became at this world size, when it is set: whole optimizer steps (rounded down,
        at least 1) replace `run.steps`, so the tokens actually trained can differ from the number asked
        for; the start of a run prints this line rather than changing the budget silently."""
        if self.run.tokens is None:
            return None
        steps, per_step = self.total_steps(world_size), self.tokens_per_step(world_size)
        exact = "" if steps * per_step == self.run.tokens else f", not {self.run.tokens:,} (whole steps only)"
        return (f"run.tokens={self.run.tokens}: {steps} steps of {per_step:,} tokens = {steps * per_step:,} "
                f"tokens{exact}; run.steps={self.run.steps} is not used")

    def unused_optim_notes(self) -> list[str]:
        """Optimizer fields set away from their default that `optim.name` does not read (weight_decay under
        Muon, which has its own two): the start of a run says so rather than dropping them silently."""
        default = OptimSection()
        return [f"note: optim.{name}={getattr(self.optim, name)!r} is not used by optim.name={self.optim.name}"
                for name in OPTIM_FIELDS_USED_ONLY_BY
                if self.optim.name not in OPTIM_FIELDS_USED_ONLY_BY[name]
                and getattr(self.optim, name) != getattr(default, name)]

    def run_dir(self) -> Path:
        out = Path(self.run.out_dir)
        return (out if out.is_absolute() else REPO_ROOT / out) / self.run.name

    def make_run_dir(self) -> Path:
        """Create the run directory; a run.out_dir that is a file or not writable was an OSError traceback
        from inside rank 0 (exit 1)."""
        path = self.run_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as err:
            raise ValueError(f"run.out_dir={self.run.out_dir!r}: cannot create the run directory {path} "
                             f"({err.strerror or err}); expected a writable folder") from None
        return path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _given(key: str, value: Any) -> str:
    """How an error shows the value: `key=` on the command line (or an empty YAML field) is null, and
    "run.downstream_tasks=None" named a value nobody typed."""
    return f"{key} has no value" if value is None else f"{key}={value!r}"


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the annotation `typ`; returns the value (tuples from lists)."""
    origin, args = get_origin(typ), get_args(typ)
    if typ is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{_given(key, value)}: expected one of {list(args)}")
        return value
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{_given(key, value)}: expected a list of {len(args)} numbers")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{_given(key, value)}: expected a mapping")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{_given(key, value)}: invalid")
    if typ is float:
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{_given(key, value)}: expected a number")
        if not math.isfinite(value):  # YAML reads `.inf` / `.nan`; no setting means either
            raise ValueError(f"{_given(key, value)}: expected a finite number")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{_given(key, value)}: expected an integer")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{_given(key, value)}: expected true or false")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"{_given(key, value)}: expected a string")
        if "\0" in value:  # a YAML "\0": every path or name made of it failed as "embedded null byte", naming no key
            raise ValueError(f"{_given(key, value)}: contains a NUL byte; expected text without one")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.')}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # YAML keys need not be strings (`1: 2`, `null: x`): sorted by their text, as mixed types do not compare
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, typ)
    return cls(**kwargs)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping: PyYAML keeps the last one, silently dropping
    the first. Merge keys (`<<: *base`) work as in `yaml.safe_load`: a key they bring in may be overridden by
    one written in the mapping itself (YAML's meaning), which is no repeat."""

    def _refuse_repeats(self, node: yaml.MappingNode, deep: bool) -> None:
        if id(node) in self._checked:  # an anchored mapping merged again: SafeConstructor flattened it in place,
            return  # so its own override of a key it merged now reads as that key twice
        self._checked.add(id(node))
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # the merged mappings' own keys are checked, not the merge itself
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for sub in merged:
                    if isinstance(sub, yaml.MappingNode):
                        self._refuse_repeats(sub, deep)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # `? [1, 2]`: refused as PyYAML refuses it, not a TypeError traceback
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found unhashable key", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._refuse_repeats(node, deep)
        return super().construct_mapping(node, deep=deep)  # SafeConstructor: flattens merges, explicit keys win


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML (default: the embedded tiny default) + overrides like `optim.lr=1e-3` or `model.tie_group_size=4`."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"config file {path}: {'is a directory, expected a YAML file' if path.is_dir() else 'not found'}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as err:  # a binary or unreadable file is named, not a bare codec error
        raise ValueError(f"config file {path}: unreadable, expected a UTF-8 YAML file "
                         f"({err.strerror if isinstance(err, OSError) else err.reason})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path}: invalid YAML ({yaml_problem(err)})") from None
    if not isinstance(raw, dict) or not raw:
        # An empty file would otherwise train the dataclass defaults, which is never what was meant.
        got = "is empty" if raw is None or raw == {} else f"holds a {type(raw).__name__}"
        raise ValueError(f"config file {path}: {got}; expected a mapping of sections (model, data, optim, ...)")
    flat = parse_overrides(overrides or [])
    # `model.<field>=v` is shorthand for `model.overrides.<field>=v` (except model.preset).
    rewritten = {}
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] == "model" and len(parts) == 2 and parts[1] not in ("preset", "overrides"):
            key = f"model.overrides.{parts[1]}"
        rewritten[key] = value
    cfg = _build(TrainConfig, merge(raw, nest(rewritten)), "")
    cfg.model.overrides = _coerce_model_overrides(cfg.model.overrides)
    validate(cfg)
    return cfg


def _coerce_model_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Type-check model overrides against ModelConfig like every other key (`init_std: 2e-2` -> float).
    Unknown names pass through; `from_preset` reports them."""
    hints = get_type_hints(ModelConfig)
    for name in overrides:
        if not isinstance(name, str):  # `{1: 2}`: no field name (from_preset takes them as keywords: a TypeError)
            raise ValueError(f"model.overrides.{name!r}: unknown field; expected ModelConfig field names "
                             f"(known: {', '.join(sorted(hints))})")
    return {name: _coerce(f"model.{name}", value, hints[name]) if name in hints else value
            for name, value in overrides.items()}


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: v >= low


def _in_unit_interval(v: float) -> bool:
    return 0 <= v < 1


# Every number of the trainer config: (dotted key, test, what is allowed). `null` (None) passes wherever
# the field allows it; model fields are checked by models.config.validate.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("data.seq_len", _at_least(2), "an integer >= 2"),
    ("optim.lr", lambda v: v > 0, "a positive number"),
    ("optim.betas", lambda v: all(map(_in_unit_interval, v)), "two numbers, each in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "a positive number"),
    ("optim.weight_decay", _at_least(0), "a non-negative number"),
    ("optim.momentum", _in_unit_interval, "a number in [0, 1)"),
    ("optim.grad_clip", _at_least(0), "a non-negative number (0 disables)"),
    ("optim.tied_lr_scale", lambda v: isinstance(v, str) or v > 0, "'inv_sqrt_g', 'inv_g', 'none' or a number > 0"),
    ("schedule.warmup_steps", _at_least(0), "a non-negative integer"),
    ("schedule.min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("schedule.decay_fraction", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("batch.micro_batch_size", _at_least(1), "a positive integer"),
    ("batch.grad_accum", _at_least(1), "a positive integer"),
    ("batch.global_batch_tokens", _at_least(1), "a positive integer or null"),
    ("loss.load_balance_coef", _at_least(0), "a non-negative number"),
    ("loss.z_loss_coef", _at_least(0), "a non-negative number"),
    ("parallel.expert_parallel_size", _at_least(1), "a positive integer"),
    ("run.steps", _at_least(1), "a positive integer"),
    ("run.tokens", _at_least(1), "a positive integer or null"),
    ("run.seed", lambda v: 0 <= v < 2**31, "an integer in [0, 2**31) (seed + rank must stay a valid numpy seed)"),
    ("run.log_every", _at_least(1), "a positive integer"),
    ("run.eval_every", _at_least(0), "a non-negative integer (0: only at the end)"),
    ("run.eval_batches", _at_least(1), "a positive integer"),
    ("run.save_every", _at_least(0), "a non-negative integer (0: only at the end)"),
    ("run.keep_checkpoints", _at_least(0), "a non-negative integer (0: keep all)"),
    ("run.stop_at_step", _at_least(1), "a positive integer or null"),
    ("run.max_consecutive_skips", _at_least(1), "a positive integer"),
    ("run.downstream_every", _at_least(0), "a non-negative integer (0: off)"),
    ("run.downstream_limit", _at_least(1), "a positive integer"),
    ("run.downstream_fewshot", _at_least(0), "a non-negative integer"),
    ("run.peak_flops", lambda v: v > 0, "a positive number (FLOP/s per device) or null"),
]


def _check_ranges(cfg: TrainConfig) -> None:
    for key, ok, expected in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not ok(value):
            raise ValueError(f"{key}={value!r}: expected {expected}")


def validate(cfg: TrainConfig) -> None:
    """Checks that need no world size (those live in `TrainConfig.for_world`)."""
    cfg.model_config()  # raises on bad model fields
    _check_ranges(cfg)
    if cfg.run.name in ("", ".", "..") or "/" in cfg.run.name or "\\" in cfg.run.name:
        # the run directory is run.out_dir/run.name: a path here would write (or resume) outside run.out_dir
        raise ValueError(f"run.name={cfg.run.name!r}: expected a plain folder name (no '/'); "
                         f"use run.out_dir for the parent folder")
    name_bytes = len(cfg.run.name.encode("utf-8", "surrogatepass"))
    if name_bytes > 255:  # the file systems' limit on one name: the launcher's look for a checkpoint failed on it
        raise ValueError(f"run.name={cfg.run.name[:40]!r}... is {name_bytes} bytes long; expected a folder name of "
                         f"at most 255 bytes (UTF-8)")
    if cfg.run.downstream_every and cfg.data.source == "random":
        raise ValueError(f"run.downstream_every={cfg.run.downstream_every}: needs text data (data.source=shards or "
                         f"stream); random tokens have no tokenizer to score tasks with")
    entries = [t.strip() for t in cfg.run.downstream_tasks.split(",")]
    tasks = [t for t in entries if t]
    if cfg.run.downstream_every and not tasks:
        raise ValueError("run.downstream_tasks='': expected at least one task when run.downstream_every > 0")
    if tasks and "" in entries:  # 'arc_easy,' or 'arc_easy,,piqa': a name lost in editing went unscored without a word
        raise ValueError(f"run.downstream_tasks={cfg.run.downstream_tasks!r}: entry {entries.index('') + 1} is empty; "
                         f"expected comma-separated task names (as evaluate's --tasks)")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:  # it would be scored twice and count twice in the downstream average
        raise ValueError(f"run.downstream_tasks={cfg.run.downstream_tasks!r}: {repeated[0]} is given twice; "
                         f"give each task once")
    if cfg.data.source == "stream":
        for key in ("stream_train", "tokenizer"):
            if not getattr(cfg.data, key):
                raise ValueError(f"data.{key}: required when data.source=stream")
    if cfg.run.tokens is None:  # with run.tokens the length depends on the world size: `for_world` checks it
        cfg._check_stop_at_step(1)
    _validate_muon(cfg)
    model = cfg.model_config()
    if cfg.data.seq_len > model.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len}: expected at most model.max_seq_len={model.max_seq_len}")
    for n_exp in sorted({p.n_experts for p in layer_plan(model) if p.ffn == "moe"}):
        if n_exp % cfg.parallel.expert_parallel_size:
            raise ValueError(f"parallel.expert_parallel_size={cfg.parallel.expert_parallel_size}: expected a divisor "
                             f"of the expert count {n_exp}")
    load_engine_settings(cfg)


def zero_stage(cfg: TrainConfig) -> int:
    return load_engine_settings(cfg).get("zero_optimization", {}).get("stage", 0)


def _validate_muon(cfg: TrainConfig) -> None:
    """Muon's ranges; it runs at ZeRO 0-3, fp32 and bf16 (flat partitions are orthogonalised through
    `trainer.engine.attach_muon_layouts`), but its flat-partition path is untested with offload."""
    optim = cfg.optim
    # Ranged whatever optim.name is (the README: every number is range-checked): `optim.muon_ns_steps=0` under
    # adamw was accepted, and failed only once optim.name=muon was added to the same command line.
    checks = [
        ("optim.muon_momentum", 0 <= optim.muon_momentum < 1, "a number in [0, 1)"),
        ("optim.muon_weight_decay", optim.muon_weight_decay >= 0, "a non-negative number"),
        ("optim.muon_ns_steps", 1 <= optim.muon_ns_steps < 100, "an integer in [1, 99]"),
        ("optim.adam_lr_ratio", optim.adam_lr_ratio > 0, "a positive number"),
        ("optim.adam_weight_decay", optim.adam_weight_decay >= 0, "a non-negative number"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"{key}={getattr(optim, key.split('.')[1])!r}: expected {expected}")
    if optim.name != "muon":
        return
    for key in offload_keys(load_engine_settings(cfg).get("zero_optimization", {})):
        raise ValueError(f"optim.name='muon': parallel.ds_config={cfg.parallel.ds_config!r} sets zero_optimization."
                         f"{key}; Muon is tested without offload only")


def offload_keys(zero: dict[str, Any]) -> list[str]:
    """The keys of a ds_config's zero_optimization that offload to CPU or NVMe, DeepSpeed's deprecated `cpu_offload`
    (optimizer) and `cpu_offload_param` included. A block of the wrong type (`"offload_optimizer": "cpu"`) offloads
    nothing here: DeepSpeed's schema check refuses it in one line (`trainer.engine.check_deepspeed_config`)."""
    blocks = [key for key in ("offload_optimizer", "offload_param")
              if isinstance(zero.get(key), dict) and zero[key].get("device", "none") != "none"]
    return blocks + [key for key in ("cpu_offload", "cpu_offload_param") if zero.get(key) is True]


# Top-level DeepSpeed keys the trainer writes from this config (trainer.engine.ds_config.deepspeed_config) or that
# would override what it writes: in a ds_config file they are refused, not dropped. `bfloat16` is DeepSpeed's old
# name of `bf16`, read only when `bf16` is absent (never: the trainer sets it).
TRAINER_OWNED_DS_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "bf16", "bfloat16", "fp16", "expert_parallel", "zero_allow_untested_optimizer"})


def load_engine_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Read the ds_config JSON; it may hold engine settings only (no batch, optimizer or precision)."""
    path = Path(cfg.parallel.ds_config)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        what = f"{path} is a directory, expected a JSON file" if path.is_dir() else f"file {path} not found"
        raise ValueError(f"parallel.ds_config={cfg.parallel.ds_config!r}: {what}")

    def refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """json keeps the last of two equal keys: `{"zero_optimization": {...}, "zero_optimization": {...}}`
        ran the second silently (YAML configs refuse it too)."""
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"parallel.ds_config {path}: duplicate key {key!r}; give each key once")
            seen.add(key)
        return dict(pairs)

    try:
        settings = json.loads(path.read_text(), object_pairs_hook=refuse_repeats)
    except (OSError, UnicodeDecodeError) as err:  # a binary or unreadable file named, not a bare codec error
        raise ValueError(f"parallel.ds_config {path}: unreadable, expected a UTF-8 JSON file "
                         f"({err.strerror if isinstance(err, OSError) else err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"parallel.ds_config {path}: invalid JSON ({err})") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("zero_optimization", {}), dict):
        where = "the file" if not isinstance(settings, dict) else "zero_optimization"
        raise ValueError(f"parallel.ds_config {path}: {where} must be a JSON object ({{...}})")
    clash = sorted(TRAINER_OWNED_DS_KEYS & set(settings))
    if clash:
        raise ValueError(f"parallel.ds_config {path}: key {clash[0]!r} is set by the trainer config, remove it")
    stage = settings.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):  # `true` == 1 in Python: it ran as ZeRO-1
        raise ValueError(f"parallel.ds_config {path}: zero_optimization.stage={stage!r}, expected 0, 1, 2 or 3")
    return settings
