"""Where the default cell loses to the DDP peer: tiedmoe at ZeRO 0/3 x EP 1/2 against hf_ddp, side by side.

    python benchmarks/decompose.py [--steps N] [--repeats R] [--json OUT] [key=value ...]

One model (the config's; default: tiny tied OLMoE-style, g=2) in the same 2 CPU ranks, each cell timed in
alternating blocks with `trainer.session.train_step`:
  zero0-ep1, zero0-ep2, zero3-ep1, zero3-ep2   tiedmoe with ds_configs/zero0.json or zero3.json and that EP size
  zero3-ep2-per-param-gather   the default cell with DeepSpeed's own post-step gather of the persistent
                               parameters (one all-gather each) instead of
                               `trainer.engine.gather_persistent_parameters_at_once`
  hf_ddp                       the paper's recipe as in benchmarks/peers.py (HF OlmoeForCausalLM, aliased
                               experts, DistributedDataParallel; F.cross_entropy on fp32 logits)
  hf_ddp-lean                  the same with tiedmoe's cross-entropy (trainer.losses.lean_cross_entropy)
                               and fused AdamW: the like-for-like peer, so those kernels' share shows
So ZeRO-0 EP 1 vs hf_ddp-lean is tiedmoe's own cost (vs hf_ddp: also its leaner kernels), EP 1 -> 2
AutoEP's all-to-all (and the load imbalance between the two ranks' experts), ZeRO 0 -> 3 the
partitioning. Per cell: tokens/s, the ratio to hf_ddp (total time and median of per-round ratios,
robust to bursts of load from other jobs) and to hf_ddp-lean, the collectives one step launches across
ranks (by kind; hf_ddp's bucketed all-reduce runs inside DDP's C++ reducer and is not seen), and the
loss of one more step after timing (cells of the same ZeRO stage and EP size must agree exactly).
Writes benchmarks/results/decompose_cpu*.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch.distributed as tdist  # noqa: E402

from benchmarks.peers import Peer, build_ddp, check_hf, peer_runner  # noqa: E402
from trainer.losses import lean_cross_entropy  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.bench import (DEFAULT_OVERRIDES, mfu, mfu_basis, mfu_note, refuse_overrides, timed_steps,  # noqa: E402
                           timed_rounds, timing_main)
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.session import Session, open_session, train_step  # noqa: E402

CELLS: dict[str, list[str]] = {
    f"zero{z}-ep{e}": [f"parallel.ds_config=ds_configs/zero{z}.json", f"parallel.expert_parallel_size={e}"]
    for z in (0, 3) for e in (1, 2)}
PER_PARAM = "zero3-ep2-per-param-gather"
LEAN_PEER = "hf_ddp-lean"
COLLECTIVES = ("all_gather_into_tensor", "all_to_all_single", "reduce_scatter_tensor", "all_reduce", "all_gather",
               "broadcast")


class CollectiveCounter:
    """Counts torch.distributed collectives over more than one rank while `active`, by kind.

    Installed before the process group starts: DeepSpeed's comm backend keeps references to some
    torch.distributed functions (all-gather, reduce-scatter) from its start.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.active = False
        for name in COLLECTIVES:
            setattr(tdist, name, self._counted(name, getattr(tdist, name)))

    def _counted(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.active and tdist.get_world_size(kwargs.get("group")) > 1:
                self.counts[name] += 1
            return original(*args, **kwargs)

        return call

    @contextmanager
    def counting(self) -> Iterator[collections.Counter]:
        self.counts = collections.Counter()
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


def open_cells(overrides: list[str]) -> dict[str, Session]:
    sessions = {name: open_session(load_config(None, DEFAULT_OVERRIDES + overrides + cell))
                for name, cell in CELLS.items()}
    sessions[PER_PARAM] = open_session(load_config(None, DEFAULT_OVERRIDES + overrides + CELLS["zero3-ep2"]))
    del sessions[PER_PARAM].engine.optimizer._post_step  # the engine's instance wrapper: DeepSpeed's own method
    return sessions


def worker(args: argparse.Namespace) -> None:
    counter = CollectiveCounter()
    eng.init_distributed()
    sessions = open_cells(args.overrides)
    any_session = sessions["zero3-ep2"]
    s0 = any_session
    runs: dict[str, Callable[[int], float]] = {name: (lambda s: lambda n: timed_steps(s, n))(s)
                                               for name, s in sessions.items()}
    runs["hf_ddp"] = peer_runner(Peer("hf_ddp", s0.cfg, s0.rank, s0.world, build_ddp(s0.cfg)))
    runs[LEAN_PEER] = peer_runner(Peer(LEAN_PEER, s0.cfg, s0.rank, s0.world, build_ddp(s0.cfg, fused=True),
                                      lean_cross_entropy))
    blocks: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(2)  # warm-up
    for _ in timed_rounds(args.repeats, "decompose"):
        for name, run in runs.items():
            blocks[name].append(run(args.steps))
    basis = mfu_basis(any_session)
    result: dict[str, Any] = {"overrides": args.overrides, "steps": args.steps, "repeats": args.repeats, **basis,
                              "cells": {}}
    tokens = any_session.tokens_per_step * args.steps * args.repeats
    for name, run in runs.items():
        with counter.counting() as counts:
            run(1)
        tokens_per_s = tokens / sum(blocks[name])
        cell = {"tokens_per_s": tokens_per_s, "mfu": mfu(basis, tokens_per_s, any_session.world),
                "block_seconds": blocks[name],
                "vs_hf_ddp": sum(blocks["hf_ddp"]) / sum(blocks[name]),
                "vs_hf_ddp_median": statistics.median(d / b for d, b in zip(blocks["hf_ddp"], blocks[name])),
                "vs_hf_ddp_lean": sum(blocks[LEAN_PEER]) / sum(blocks[name]),
                "collectives_per_step": dict(counts), "collectives_total": sum(counts.values())}
        if name in sessions:
            cell["loss_after_timing"] = train_step(sessions[name], sessions[name].cfg.optim.lr).loss
        result["cells"][name] = cell
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
    eng.shutdown()


def render(result: dict[str, Any]) -> str:
    lines = [f"tiedmoe cells vs hf_ddp, 2 CPU ranks; overrides: {' '.join(result['overrides']) or '(default config)'}",
             "", "| cell | tokens/s | MFU | vs hf_ddp | median/round | vs hf_ddp-lean | collectives/step (across ranks) "
             "| loss after timing |", "|---|---|---|---|---|---|---|---|"]
    for name, c in result["cells"].items():
        kinds = ", ".join(f"{k.replace('_single', '').replace('_into_tensor', '')} {v}"
                          for k, v in sorted(c["collectives_per_step"].items()))
        loss = f"{c['loss_after_timing']:.9f}" if "loss_after_timing" in c else "-"
        lean = f"{c['vs_hf_ddp_lean']:.3f}" if "vs_hf_ddp_lean" in c else "-"  # older JSON: no such peer
        lines.append(f"| {name} | {c['tokens_per_s']:,.0f} | {100 * c['mfu']:.2f}% | {c['vs_hf_ddp']:.3f} | {c['vs_hf_ddp_median']:.3f} | "
                     f"{lean} | {c['collectives_total']} ({kinds}) | {loss} |")
    lines.append("\n" + mfu_note(result))
    return "\n".join(lines)


def check(cfg: TrainConfig, overrides: list[str]) -> None:
    """Each cell sets the ZeRO config and EP size (CELLS); the hf_ddp cell needs an HF-expressible model."""
    refuse_overrides(overrides, ("parallel.ds_config", "parallel.expert_parallel_size"), "decompose.py")
    check_hf(cfg)


def main(argv: list[str] | None = None) -> int:
    return timing_main(argv, __doc__, "benchmarks.decompose", worker, render, (2, 10, "decompose_cpu.json", "cell"),
                       check=check)


if __name__ == "__main__":
    sys.exit(main())
