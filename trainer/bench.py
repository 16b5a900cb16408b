"""Tied vs untied, side by side in one run: training throughput and ZeRO-3 expert traffic.

    python -m trainer.bench [--steps N] [--repeats R] [--json OUT] [key=value ...]
    torchrun --nproc_per_node 8 -m trainer.bench --json benchmarks/results/tying_gpu.json [key=value ...]

Starts 2 CPU ranks (or uses the launcher's ranks on GPUs) and builds both engines in the same
processes, then times them in alternating blocks so machine noise hits both alike. Reports tokens/s
and their ratio (goal: tied / untied >= 0.98), expert all-gather elements per step (goal at ZeRO-3:
banks / MoE layers of the untied model) and per-rank expert elements held. Absolute tokens/s from a
CPU mean little; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainer import engine as eng
from trainer.argtypes import OneLineParser, output_file, positive_int
from trainer.config import REPO_ROOT, TrainConfig, load_config
from trainer.data import ensure_data, make_source
from trainer.launch import collect_from_cpu_ranks, report_from_cpu_ranks, report_progress, torchrun_command
from trainer.metrics import peak_flops
from trainer.session import Session, describe, open_session, train_step

DEFAULT_OVERRIDES = ["data.source=random", "run.log_every=1000000"]


def collect_json(module_args: list[str], world: int, gpu: bool, out_dir: str) -> Any:
    """Run a `--worker` module on `world` ranks and read the JSON it writes to `--json-raw`.

    CPU: gloo ranks (`trainer.launch.collect_from_cpu_ranks`); gpu: one rank per GPU through torchrun,
    output streamed (a GPU job is watched live). Returns the parsed JSON or the failing exit code.
    """
    if not gpu:
        return collect_from_cpu_ranks(module_args, world)
    raw = Path(out_dir) / "raw.json"
    cmd, env = torchrun_command(world, ["-m", *module_args, "--json-raw", str(raw)], dict(os.environ))
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
    return json.loads(raw.read_text()) if proc.returncode == 0 and raw.is_file() else (proc.returncode or 1)


def check_data(cfg: TrainConfig, world: int) -> None:
    """Open the configured training data here, before any rank starts, as `./run.sh` does: with a
    `data.source=shards|stream` override a missing or damaged data set is one `error:` line (a ValueError),
    not a DataError traceback from every rank."""
    ensure_data(cfg)
    make_source(cfg.for_world(world), "train", 0, world)


def refuse_overrides(overrides: list[str], keys: tuple[str, ...], who: str) -> None:
    """A ValueError for a key=value among `keys`, which `who` sets itself per variant or cell: applied, it
    would be replaced without a word (or relabel every variant). `model.overrides.<field>` counts as
    `model.<field>`."""
    for override in overrides:
        key = override.split("=", 1)[0].strip().replace("model.overrides.", "model.", 1)
        if key in keys:
            raise ValueError(f"{override}: {who} sets {key} itself for each of its variants; leave it out")


def timed_steps(s: Session, steps: int) -> float:
    """Seconds for `steps` of the trainer's own step, all ranks and the device synchronised."""
    eng.barrier()
    eng.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(s, s.cfg.optim.lr)
    eng.synchronize()
    eng.barrier()
    return time.perf_counter() - start


def timed_rounds(repeats: int, what: str) -> Iterator[int]:
    """`range(repeats)` of a benchmark's alternating timing rounds, with a progress line (elapsed, ETA) after each:
    a benchmark printed nothing until its table, minutes later."""
    start = time.perf_counter()
    for done in range(repeats):
        yield done
        elapsed = time.perf_counter() - start
        report_progress(f"{what}: round {done + 1}/{repeats} timed, {elapsed:.0f} s, "
                        f"ETA {elapsed / (done + 1) * (repeats - done - 1):.0f} s")


def gathers_per_step(s: Session) -> dict[str, int]:
    """ZeRO-3 all-gather elements of one training step, experts vs the rest."""
    counter = eng.GatherCounter()
    with counter.active():
        train_step(s, s.cfg.optim.lr)
    return {"expert_gather_elements": counter.expert_elements, "expert_gathers": counter.expert_gathers,
            "other_gather_elements": counter.other_elements}


def tied_and_untied(overrides: list[str]) -> dict[str, TrainConfig]:
    tied = load_config(None, DEFAULT_OVERRIDES + overrides)
    return {"tied": tied, "untied": tied.untied()}


def run_pair(overrides: list[str], steps: int, repeats: int, warmup: int = 3,
             progress: str | None = "trainer.bench") -> dict[str, Any]:
    """Tied (as configured) and untied sessions in the same processes, timed in alternating blocks; `progress`
    names the progress lines (None: none, for a caller that only counts gathers)."""
    sessions = {name: open_session(cfg) for name, cfg in tied_and_untied(overrides).items()}
    times = dict.fromkeys(sessions, 0.0)
    for s in sessions.values():
        timed_steps(s, warmup)
    for _ in (timed_rounds(repeats, progress) if progress else range(repeats)):
        for name, s in sessions.items():
            times[name] += timed_steps(s, steps)
    out: dict[str, Any] = {}
    for name, s in sessions.items():
        info = describe(s)
        flops = s.accounting.train_flops_per_token
        tok_s = s.tokens_per_step * steps * repeats / times[name]
        out[name] = {"tokens_per_s": tok_s, "seconds": times[name], "model_flops_per_token": flops,
                     "achieved_flops_per_rank": flops * tok_s / s.world,
                     "expert_elements_per_rank": info["expert_elements_per_rank_measured"],
                     "expert_banks": info["expert_banks"], "moe_layers": info["moe_layers"],
                     "local_param_elements": eng.local_param_elements(s.engine)}
        if s.engine.zero_optimization_stage() == 3:
            out[name].update(gathers_per_step(s))
        s.close()
    out["throughput_ratio_tied_over_untied"] = out["tied"]["tokens_per_s"] / out["untied"]["tokens_per_s"]
    if out["untied"].get("expert_gather_elements"):  # 0: banks below the persistence threshold stay gathered
        out["expert_gather_ratio_tied_over_untied"] = (out["tied"]["expert_gather_elements"]
                                                       / out["untied"]["expert_gather_elements"])
    out["expert_memory_ratio_tied_over_untied"] = (out["tied"]["expert_elements_per_rank"][0]
                                                   / out["untied"]["expert_elements_per_rank"][0])
    out["goal_banks_over_layers"] = out["tied"]["expert_banks"] / out["tied"]["moe_layers"]
    return out


def worker(args: argparse.Namespace) -> None:
    eng.init_distributed()
    result = run_pair(args.overrides, args.steps, args.repeats)
    peak, source = peak_flops(load_config(None, DEFAULT_OVERRIDES + args.overrides))
    for name in ("tied", "untied"):
        result[name]["mfu"] = result[name]["achieved_flops_per_rank"] / peak
    result.update(overrides=args.overrides, steps=args.steps, repeats=args.repeats, world_size=eng.world_size(),
                  device=_device(), torch=torch.__version__, peak_flops_per_rank=peak, peak_flops_source=source)
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
        if not args.worker:  # started by a launcher (e.g. torchrun on GPUs): report here
            print(render(result))
            print(f"wrote {args.json_raw}", flush=True)
    eng.shutdown()


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def render(result: dict[str, Any]) -> str:
    lines = [f"tied vs untied on {result['world_size']} ranks, {result['device']}; overrides: "
             f"{' '.join(result['overrides']) or '(default config)'}",
             f"{'':<8} {'tokens/s':>10} {'expert elems/rank':>18} {'expert gather elems/step':>25}"]
    for name in ("tied", "untied"):
        r = result[name]
        lines.append(f"{name:<8} {r['tokens_per_s']:>10,.0f} {r['expert_elements_per_rank'][0]:>18,} "
                     f"{r.get('expert_gather_elements', 0):>25,}")
    lines.append(f"MFU tied / untied                 {100 * result['tied']['mfu']:.1f}% / {100 * result['untied']['mfu']:.1f}%"
                 f"  (peak {result['peak_flops_per_rank']:.3g} FLOP/s per rank: {result['peak_flops_source']})")
    lines.append(f"throughput ratio tied/untied      {result['throughput_ratio_tied_over_untied']:.3f}  (goal >= 0.98)")
    lines.append(f"expert memory ratio tied/untied   {result['expert_memory_ratio_tied_over_untied']:.3f}  "
                 f"(banks/layers = {result['goal_banks_over_layers']:.3f})")
    if "expert_gather_ratio_tied_over_untied" in result:
        lines.append(f"expert all-gather ratio           {result['expert_gather_ratio_tied_over_untied']:.3f}  "
                     f"(goal {result['goal_banks_over_layers']:.3f})")
    elif "expert_gather_elements" in result["untied"]:
        lines.append("expert all-gather ratio           -  (expert tensors are below stage3_param_persistence_threshold: "
                     "gathered once, never released; parallel.ds_config=ds_configs/zero3_strict.json counts them)")
    return "\n".join(lines)


def timing_parser(doc: str | None, steps: int, repeats: int, result: str, what: str) -> argparse.ArgumentParser:
    """The command line every side-by-side timing benchmark shares: blocks of `--steps` optimizer steps
    alternated `--repeats` times per `what`, JSON to `--json` (default benchmarks/results/`result`),
    trailing key=value config overrides; `--worker` / `--json-raw` are the ranks' internal flags."""
    parser = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=positive_int, default=repeats, help=f"alternating blocks per {what}")
    parser.add_argument("--json", type=output_file, default=str(REPO_ROOT / "benchmarks" / "results" / result),
                        help=f"where to write the result (default benchmarks/results/{result})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-raw", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=f"config overrides applied to every {what}")
    return parser


def mfu_basis(s: Session) -> dict[str, Any]:
    """What every benchmark's MFU is computed from: tying-aware training FLOPs per token (a tied bank
    counted at every layer that uses it) and the per-rank peak. Collective on CPU (the peak probe)."""
    peak, source = peak_flops(s.cfg)
    return {"model_flops_per_token": s.accounting.train_flops_per_token, "peak_flops_per_rank": peak,
            "peak_flops_source": source}


def mfu(basis: dict[str, Any], tokens_per_s: float, world: int) -> float:
    """Model FLOPs utilisation of `tokens_per_s` over `world` ranks."""
    return basis["model_flops_per_token"] * tokens_per_s / world / basis["peak_flops_per_rank"]


def mfu_note(basis: dict[str, Any]) -> str:
    return (f"MFU peak: {basis['peak_flops_per_rank']:.3g} FLOP/s per rank ({basis['peak_flops_source']}); "
            f"{basis['model_flops_per_token']:.3g} training FLOPs per token (tied layers counted at every use)")


def timing_main(argv: list[str] | None, doc: str | None, module: str, worker: Callable[[argparse.Namespace], None],
                render: Callable[[Any], str], defaults: tuple[int, int, str, str], markdown: bool = False,
                launcher_ranks: bool = False, check: Callable[[TrainConfig, list[str]], None] | None = None) -> int:
    """The `main` every side-by-side timing benchmark shares (`timing_parser`'s command line).

    Bad overrides end in one `error:` line and exit 2 before any rank starts; otherwise 2 CPU ranks run
    `module --worker`, and its table is printed and its JSON written (with `markdown`, the table also
    beside it as .md). `launcher_ranks`: a process already started as a rank by a launcher (torchrun on
    GPUs) runs the worker itself, writing to `--json`. `check(cfg, overrides)`: the benchmark's own refusals
    (a ValueError), also made before any rank starts.
    """
    steps, repeats, result, what = defaults
    args = timing_parser(doc, steps, repeats, result, what).parse_args(argv)
    in_rank = args.worker or (launcher_ranks and "RANK" in os.environ)
    try:
        if markdown and Path(args.json).suffix == ".md":  # the table goes beside it as .md: it would replace the JSON
            raise ValueError(f"--json {args.json}: the table is written beside the JSON as .md; name the JSON .json")
        cfg = load_config(None, DEFAULT_OVERRIDES + args.overrides)
        if not in_rank:
            cfg.for_world(2)  # the CPU ranks below: e.g. expert parallelism they cannot tile
            check_data(cfg, 2)
            if check is not None:
                check(cfg, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if in_rank:
        args.json_raw = args.json_raw or args.json
        worker(args)
        return 0
    return report_from_cpu_ranks([module, "--worker", "--steps", str(args.steps), "--repeats", str(args.repeats),
                                  *args.overrides], render, args.json, markdown)


def main(argv: list[str] | None = None) -> int:
    return timing_main(argv, __doc__, "trainer.bench", worker, render, (10, 3, "tying_cpu.json", "variant"),
                       launcher_ranks=True)


if __name__ == "__main__":
    sys.exit(main())
