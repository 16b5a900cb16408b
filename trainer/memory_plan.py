"""`python -m trainer.memory plan PRESET_OR_CONFIG --gpus N --gpu-mem-gib M [...]`: which tie group size fits.

Without building anything, for the tied variants g = 1, 2, 3, 4 of a preset (key=value overrides are
model fields) or of a training config (.yaml; overrides are dotted config keys, and the config's
micro-batch, sequence length, precision, checkpointing, ZeRO stage and EP size are the defaults), prints
per-GPU memory: model states (`models.accounting.rank_memory`), activations of one micro-batch
(`models.accounting.activation_memory`, the backward peak), ZeRO's communication workspace and a fixed
reserve, whether the sum fits the GPU, and the largest micro-batch that does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.accounting import account, activation_memory, layer_parts, rank_memory
from models.config import PRESETS, ModelConfig, from_preset, layer_plan, plan_notes
from models.overrides import model_field_overrides
from trainer.argtypes import output_file, reader_may_leave
from trainer.config import load_config, load_engine_settings
from trainer.memory import GIB, OneLineParser

TIE_GROUP_SIZES = (1, 2, 3, 4)
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)
MAX_MICRO_BATCH = 1 << 16


@dataclass(frozen=True)
class Layout:
    """What the planner sizes: the hardware, the parallel layout and one micro-batch."""

    gpus: int
    gpu_mem_bytes: int
    zero: int
    ep: int
    micro_batch: int
    seq_len: int
    precision: str
    checkpointing: bool
    reduce_bucket: int  # ZeRO gradient bucket, elements
    reserve_bytes: int  # CUDA context, NCCL buffers, allocator fragmentation


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Raise ValueError naming the flag for a layout that cannot run."""
    positive = {"--gpus": layout.gpus, "--micro-batch": layout.micro_batch, "--seq-len": layout.seq_len,
                "--ep": layout.ep}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag}={value}: expected a positive integer")
    if layout.gpu_mem_bytes <= 0:
        raise ValueError(f"--gpu-mem-gib={layout.gpu_mem_bytes / GIB:g}: expected a positive number")
    if layout.zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero={layout.zero}: expected 0, 1, 2 or 3")
    if layout.gpus % layout.ep:
        raise ValueError(f"--ep={layout.ep}: expected a divisor of --gpus={layout.gpus}")
    for n_experts in {cfg.n_experts, cfg.n_experts * cfg.widen_factor}:
        if n_experts % layout.ep:
            raise ValueError(f"--ep={layout.ep}: expected a divisor of the expert count {n_experts}")
    if layout.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len={layout.seq_len}: expected at most max_seq_len={cfg.max_seq_len}")


def workspace_bytes(cfg: ModelConfig, layout: Layout) -> int:
    """ZeRO's buffers beside model states and activations.

    ZeRO-1/2/3 allocate a gradient bucket of `reduce_bucket_size` elements in the parameter dtype at
    start-up (seen on CPU ranks: a 1 GB bf16 buffer with the default 5e8, whatever the model size);
    ZeRO-3 also holds the layer it is computing gathered in full (largest layer, experts split over EP).
    """
    if layout.zero == 0:
        return 0
    elt = 2 if layout.precision == "bf16" else 4
    bucket = layout.reduce_bucket * elt
    if layout.zero < 3:
        return bucket
    largest = max(sum(n // (layout.ep if name == "experts" else 1) for name, n in layer_parts(cfg, p).items())
                  for p in layer_plan(cfg))
    return bucket + largest * elt


def row(cfg: ModelConfig, layout: Layout) -> dict[str, Any]:
    """One tied variant: its bytes per GPU at the layout's micro-batch, whether it fits, the largest micro-batch."""
    states = rank_memory(cfg, layout.gpus, layout.ep, layout.zero, layout.precision).total
    fixed = states + workspace_bytes(cfg, layout) + layout.reserve_bytes

    def total(micro_batch: int) -> int:
        return fixed + activation_memory(cfg, micro_batch, layout.seq_len, layout.precision,
                                         layout.checkpointing).peak

    acc = account(cfg, layout.seq_len)
    return {"tie_group_size": cfg.tie_group_size, "unique_params": acc.unique_params,
            "expert_banks": acc.expert_banks, "moe_layers": acc.moe_layers, "model_states_bytes": states,
            "activation_bytes": total(layout.micro_batch) - fixed, "workspace_bytes": fixed - states,
            "total_bytes": total(layout.micro_batch), "fits": total(layout.micro_batch) <= layout.gpu_mem_bytes,
            "max_micro_batch": largest_fitting(total, layout.gpu_mem_bytes), "notes": plan_notes(cfg)}


def largest_fitting(total: Any, budget: int) -> int:
    """Largest micro-batch b with total(b) <= budget (0 if not even 1): binary search, total grows with b."""
    if total(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= MAX_MICRO_BATCH and total(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    return lo


def plan(cfg: ModelConfig, layout: Layout) -> list[dict[str, Any]]:
    check_layout(cfg, layout)
    return [row(dataclasses.replace(cfg, tie_group_size=g, tie_groups=None), layout) for g in TIE_GROUP_SIZES]


def render(name: str, layout: Layout, rows: list[dict[str, Any]]) -> str:
    head = (f"{name}: {layout.gpus} GPUs x {layout.gpu_mem_bytes / GIB:g} GiB, ZeRO-{layout.zero}, EP {layout.ep}, "
            f"{layout.precision}, micro-batch {layout.micro_batch} x {layout.seq_len}, activation checkpointing "
            f"{'on' if layout.checkpointing else 'off'}; per GPU, GiB (workspace: ZeRO buckets/gathers + "
            f"{layout.reserve_bytes / GIB:g} reserve)")
    lines = [head, "", "| g | unique params | banks/MoE layers | model states | activations | workspace | total | fits "
             "| max micro-batch |", "|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tie_group_size']} | {r['unique_params'] / 1e9:.2f}B | {r['expert_banks']}/{r['moe_layers']} "
                     f"| {r['model_states_bytes'] / GIB:.2f} | {r['activation_bytes'] / GIB:.2f} "
                     f"| {r['workspace_bytes'] / GIB:.2f} | {r['total_bytes'] / GIB:.2f} "
                     f"| {'yes' if r['fits'] else 'no'} | {r['max_micro_batch']} |")
    notes = sorted({f"g={r['tie_group_size']}: {n}" for r in rows for n in r["notes"]})
    return "\n".join(lines + [f"note: {n}" for n in notes])


def model_and_layout(args: argparse.Namespace) -> tuple[str, ModelConfig, Layout]:
    """A preset name (overrides: model fields) or a training config file (overrides: dotted keys)."""
    target = args.target
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        tc = load_config(target, args.overrides)
        cfg = tc.model_config()
        zero = load_engine_settings(tc).get("zero_optimization", {})
        defaults = {"zero": zero.get("stage", 0), "ep": tc.parallel.expert_parallel_size,
                    "micro_batch": tc.batch.micro_batch_size, "seq_len": tc.data.seq_len,
                    "precision": tc.run.precision, "checkpointing": tc.parallel.activation_checkpointing,
                    "reduce_bucket": int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET))}
    elif target in PRESETS:
        cfg = from_preset(target, **model_field_overrides(args.overrides))
        defaults = {"zero": 3, "ep": 1, "micro_batch": 1, "seq_len": min(2048, cfg.max_seq_len),
                    "precision": "bf16", "checkpointing": False, "reduce_bucket": DEFAULT_REDUCE_BUCKET}
    else:
        raise ValueError(f"{target!r}: not a preset ({', '.join(sorted(PRESETS))}) or a config file")
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
    layout = Layout(gpus=args.gpus, gpu_mem_bytes=int(args.gpu_mem_gib * GIB), reserve_bytes=int(args.reserve_gib * GIB),
                    **chosen)
    return Path(target).stem if target not in PRESETS else target, cfg, layout


def plan_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m trainer.memory plan", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="PRESET_OR_CONFIG")
    parser.add_argument("overrides", nargs="*", default=[], help="model fields (preset) or dotted config keys (config)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the data-parallel world)")
    parser.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU, GiB")
    parser.add_argument("--zero", type=int, help="ZeRO stage (default: the config's, or 3)")
    parser.add_argument("--ep", type=int, help="expert-parallel size (default: the config's, or 1)")
    parser.add_argument("--micro-batch", type=int, dest="micro_batch", help="sequences per GPU (default: config, or 1)")
    parser.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sequence (default: config, or 2048 capped at max_seq_len)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: the config's, or bf16")
    parser.add_argument("--activation-checkpointing", dest="checkpointing", action=argparse.BooleanOptionalAction,
                        help="default: the config's, or off")
    parser.add_argument("--reduce-bucket", type=int, dest="reduce_bucket",
                        help="ZeRO reduce_bucket_size in elements (default: the ds_config's, or 5e8)")
    parser.add_argument("--reserve-gib", type=float, default=1.0,
                        help="per-GPU memory set aside for CUDA context, NCCL and fragmentation (default 1)")
    parser.add_argument("--json", type=output_file, help="also write the rows as JSON here")
    return parser


def run_plan(argv: list[str]) -> tuple[argparse.Namespace, str, Layout, list[dict[str, Any]]]:
    """Parse a `plan` command line and size its tied variants: (arguments, name, layout, rows)."""
    args = plan_parser().parse_intermixed_args(argv)  # key=value may follow the flags, as documented
    for flag, value in (("--gpu-mem-gib", args.gpu_mem_gib), ("--reserve-gib", args.reserve_gib)):
        if not math.isfinite(value):
            raise ValueError(f"{flag}={value:g}: expected a finite number")
    if args.reserve_gib < 0:
        raise ValueError(f"--reserve-gib={args.reserve_gib:g}: expected a non-negative number")
    if args.reduce_bucket is not None and args.reduce_bucket < 1:
        raise ValueError(f"--reduce-bucket={args.reduce_bucket}: expected a positive number of elements")
    name, cfg, layout = model_and_layout(args)
    return args, name, layout, plan(cfg, layout)


def plan_main(argv: list[str]) -> int:
    args, name, layout, rows = run_plan(argv)
    with reader_may_leave():
        print(render(name, layout, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"target": name, "layout": dataclasses.asdict(layout), "rows": rows},
                                              indent=1))
    return 0
