"""Data pipeline throughput: tokenization (tokens/s) and loader cost per batch (ms).

    python benchmarks/bench_data.py [--data-dir data/default] [--batches 50] [--repeats 5] [--json OUT]

Uses `data/default` when it has been built (else the test fixture, built into a temporary folder) and
the fixture's text for tokenization. Prints a table and writes the JSON to `--json` (default
`benchmarks/results/data.json`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from data_prep.build import DEFAULT_OUT_DIR  # noqa: E402
from data_prep.errors import DataError  # noqa: E402
from data_prep.loader import TokenWindowLoader, load_manifest  # noqa: E402
from data_prep.streaming import StreamingTokenLoader  # noqa: E402
from data_prep.testing import FIXTURE_JSONL, FIXTURE_TXT, build_fixture_dataset  # noqa: E402
from data_prep.tokenizer import load_tokenizer  # noqa: E402
from trainer.argtypes import OneLineParser, output_file  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "data.json"


def _fixture_texts() -> list[str]:
    texts = [json.loads(line)["text"] for line in FIXTURE_JSONL.read_text().splitlines()]
    return texts + [p for p in FIXTURE_TXT.read_text().split("\n\n") if p.strip()]


def bench_tokenizer(tokenizer_path: Path, repeats: int) -> list[dict]:
    """encode_batch (all cores, what the build uses) against one-at-a-time encode."""
    texts = _fixture_texts() * repeats
    rows = []
    for mode in ("encode_batch", "encode (1 thread)"):
        tokenizer = load_tokenizer(tokenizer_path)  # fresh: its word cache must not carry over between modes
        start = time.perf_counter()
        if mode == "encode_batch":
            tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        else:
            tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
        seconds = time.perf_counter() - start
        rows.append({"what": f"tokenize {mode}", "tokens": tokens, "mb": round(sum(map(len, texts)) / 1e6, 2),
                     "tokens_per_s": round(tokens / seconds)})
    return rows


def _time_batches(loader: object, batches: int) -> float:
    loader.next_batch()  # warm-up: page in the memmaps / open the stream
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return (time.perf_counter() - start) / batches * 1e3


def bench_loaders(data_dir: Path, batches: int) -> list[dict]:
    rows = []
    for seq_len, micro_batch_size in ((512, 8), (2048, 8), (4096, 4)):
        try:
            loader = TokenWindowLoader(data_dir, "train", seq_len, micro_batch_size)
        except ValueError as err:
            print(f"skip seq_len={seq_len}: {err}", file=sys.stderr)
            continue
        ms = _time_batches(loader, batches)
        rows.append({"what": "TokenWindowLoader", "seq_len": seq_len, "micro_batch_size": micro_batch_size,
                     "ms_per_batch": round(ms, 3),
                     "tokens_per_s": round(seq_len * micro_batch_size / ms * 1e3)})
    tokenizer_path = data_dir / "tokenizer.json"
    for shuffle_buffer in (0, 1000):
        loader = StreamingTokenLoader(FIXTURE_JSONL, tokenizer_path, 512, 8, shuffle_buffer=shuffle_buffer)
        ms = _time_batches(loader, max(batches // 5, 5))
        rows.append({"what": f"StreamingTokenLoader (shuffle_buffer={shuffle_buffer})", "seq_len": 512,
                     "micro_batch_size": 8, "ms_per_batch": round(ms, 3), "tokens_per_s": round(512 * 8 / ms * 1e3)})
    return rows


def loader_share_of_step(data_dir: Path, batches: int) -> dict | None:
    """Loader time per micro-batch of the default config over the measured default training step.

    The step time comes from `python -m trainer.bench` (benchmarks/results/tying_cpu.json, tied model,
    same machine), so run that first; returns None when it is missing.
    """
    bench = REPO_ROOT / "benchmarks" / "results" / "tying_cpu.json"
    if not bench.is_file():
        return None
    from trainer.config import load_config

    result = json.loads(bench.read_text())
    cfg = load_config(None, result.get("overrides", []))
    seq, mb = cfg.data.seq_len, cfg.batch.micro_batch_size
    tokens_per_step = mb * cfg.batch.grad_accum * result["world_size"] * seq
    step_ms = tokens_per_step / result["tied"]["tokens_per_s"] * 1e3
    loader_ms = _time_batches(TokenWindowLoader(data_dir, "train", seq, mb), batches) * cfg.batch.grad_accum
    return {"shape": f"{mb}x{seq}", "step_ms": step_ms, "loader_ms_per_step": loader_ms,
            "fraction": loader_ms / step_ms, "source": bench.name}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="built data set (default: data/default, else the fixture)")
    parser.add_argument("--batches", type=int, default=50, help="loader batches timed (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="copies of the fixture text to tokenize")
    parser.add_argument("--json", type=output_file, default=str(RESULTS), metavar="OUT",
                        help="where the result goes (default: benchmarks/results/data.json)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.repeats < 1:
        parser.error(f"--batches={args.batches} --repeats={args.repeats}: expected positive integers")
    if args.data_dir is not None and not (args.data_dir / "manifest.json").is_file():
        parser.error(f"--data-dir {args.data_dir}: no manifest.json (build one with `python -m data_prep.build`)")
    if args.data_dir is not None:
        try:  # a damaged data set is refused here, not as a traceback (or every loader row skipped) later
            load_manifest(args.data_dir, verify=True)
        except DataError as err:
            parser.error(f"--data-dir {args.data_dir}: {err}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = DEFAULT_OUT_DIR if (DEFAULT_OUT_DIR / "manifest.json").is_file() else \
                build_fixture_dataset(Path(tmp) / "fixture")
        tokenize = bench_tokenizer(data_dir / "tokenizer.json", args.repeats)
        loaders = bench_loaders(data_dir, args.batches)
        share = loader_share_of_step(data_dir, args.batches)  # in here: a fixture built into tmp is gone after
    print(f"{'benchmark':<42} {'shape':>10} {'ms/batch':>9} {'tokens/s':>12}")
    for row in tokenize:
        print(f"{row['what']:<42} {str(row['mb']) + ' MB':>10} {'':>9} {row['tokens_per_s']:>12,}")
    for row in loaders:
        shape = f"{row['micro_batch_size']}x{row['seq_len']}"
        print(f"{row['what']:<42} {shape:>10} {row['ms_per_batch']:>9.3f} {row['tokens_per_s']:>12,}")
    if share:
        print(f"loader share of a default training step ({share['shape']}, step {share['step_ms']:.0f} ms "
              f"from {share['source']}): {100 * share['fraction']:.4f}%")
    report = {"data_dir": str(data_dir), "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "tokenization": tokenize, "loaders": loaders,
              "loader_share_of_step": share}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")  # its folders made when --json was read
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
