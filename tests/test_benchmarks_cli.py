"""The side-by-side timing benchmarks (and activation_memory.py) as a user runs them: bad input ends in one line and exit 2 before
any rank starts; a smoke run of each (slow) prints its table with MFU and writes its JSON."""

import json
from pathlib import Path

import pytest
from helpers import run_python

TIMING_BENCHMARKS = [["benchmarks/decompose.py"], ["benchmarks/zero3_settings.py"], ["benchmarks/peers.py"],
                     ["-m", "trainer.bench"]]


BAD_INPUT = [(command, ["model.not_a_field=1"], "model.not_a_field") for command in TIMING_BENCHMARKS] + [
    (TIMING_BENCHMARKS[0], ["optim.lr=fast"], "optim.lr"),
    (TIMING_BENCHMARKS[0], ["optim.lr=[1,"], "optim.lr"),  # PyYAML's own error spans lines: still one
    (TIMING_BENCHMARKS[1], ["--steps", "0"], "--steps"),  # the shared command line (trainer.bench.timing_parser)
    (TIMING_BENCHMARKS[2], ["--repeats", "-2"], "--repeats"),
    (TIMING_BENCHMARKS[3], ["--steps", "many"], "--steps"),
    # 2 CPU ranks cannot hold EP 4: a ValueError traceback from each rank, exit 1
    (TIMING_BENCHMARKS[1], ["parallel.expert_parallel_size=4"], "parallel.expert_parallel_size=4"),
    # a data set that is not there: a DataError traceback from every rank, exit 1
    (TIMING_BENCHMARKS[3], ["data.source=shards", "data.path=/nonexistent/tiedmoe"], "data.path='/nonexistent"),
    (["benchmarks/equal_memory.py"], ["data.source=shards", "data.path=/nonexistent/tiedmoe"], "data.path"),
    # shared experts have no HF peer: a ValueError traceback from every rank, exit 1
    (TIMING_BENCHMARKS[0], ["model.preset=deepseek_moe_tiny"], "model.n_shared_experts"),
    (TIMING_BENCHMARKS[2], ["model.preset=deepseek_moe_tiny"], "model.n_shared_experts"),
    # set per cell / variant: replaced without a word
    (TIMING_BENCHMARKS[0], ["parallel.expert_parallel_size=1"], "parallel.expert_parallel_size=1"),
    (TIMING_BENCHMARKS[1], ["parallel.ds_config=ds_configs/zero1.json"], "parallel.ds_config"),
    (["benchmarks/activation_memory.py"], ["model.not_a_field=1"], "model.not_a_field"),
    (["benchmarks/activation_memory.py"], ["data.seq_len={a"], "data.seq_len"),
    (["benchmarks/activation_memory.py"], ["--micro-batch", "2,0"], "--micro-batch")] + [
    # an output that cannot be written is refused before minutes of measuring, not with a traceback after
    (command, ["--json", "README.md/result.json"], "--json")  # a folder under a file: refused even for root
    for command in (TIMING_BENCHMARKS[2], ["benchmarks/equal_memory.py"], ["benchmarks/construction_memory.py"],
                    ["benchmarks/activation_memory.py"], ["-m", "trainer.parity"])] + [
    (TIMING_BENCHMARKS[0], ["--json", "benchmarks"], "--json"),  # a folder, not a file
    # the .md table / .png plot written beside the JSON would have replaced it
    (TIMING_BENCHMARKS[2], ["--json", "/tmp/peers.md"], "--json /tmp/peers.md"),
    (["benchmarks/equal_memory.py"], ["--json", "/tmp/equal_memory.png"], "--json /tmp/equal_memory.png"),
    (["benchmarks/tying_quality.py"], ["--json", "/tmp/tying_quality.png"], "--json /tmp/tying_quality.png"),
    (["benchmarks/tying_quality.py"], ["--json", "README.md/result.json"], "--json"),
    (["benchmarks/bench_data.py"], ["--json", "README.md/result.json"], "--json")] + [
    # a list entry given twice was measured (or scored) twice and counted twice
    (["benchmarks/activation_memory.py"], ["--micro-batch", "2,4,2"], "--micro-batch 2,4,2: 2 is given twice"),
    (["benchmarks/construction_memory.py"], ["--paths", "plain,partitioned,plain"],
     "--paths plain,partitioned,plain: plain"),
    (["benchmarks/equal_memory.py"], ["--variants", "untied,g2,g2"], "--variants untied,g2,g2: g2 is given twice"),
    (["benchmarks/reproduce.py"], ["--dry-run", "--only", "g=2", "untied", "g=2"], "--only g=2,untied,g=2: g=2"),
    (["-m", "trainer.evaluate"], ["runs/none", "--tasks", "piqa,arc_easy,piqa"], "--tasks piqa,arc_easy,piqa: piqa")]


@pytest.mark.parametrize("command, bad, named", BAD_INPUT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_and_exit_2(command: list[str], bad: list[str], named: str) -> None:
    proc = run_python([*command, *bad])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    error = [i for i, line in enumerate(lines) if "error:" in line]
    assert error == [len(lines) - 1] and named in lines[-1], proc.stderr  # the last line, nothing after it


@pytest.mark.parametrize("command", [["benchmarks/activation_memory.py", "--micro-batch", "x"],
                                     ["benchmarks/construction_memory.py", "--until", "x"],
                                     ["benchmarks/equal_memory.py", "--steps", "x"],
                                     ["benchmarks/reproduce.py", "--seeds", "x"],
                                     ["benchmarks/peers.py", "--steps", "x"], ["-m", "trainer.bench", "--nope"],
                                     ["benchmarks/tying_quality.py", "--steps", "x"],
                                     ["benchmarks/bench_data.py", "--batches", "x"],
                                     ["-m", "data_prep.build", "--vocab-size", "x"]], ids=" ".join)
def test_argparse_errors_are_one_line(command: list[str]) -> None:
    """argparse's own refusals (a flag's type or choice) printed a usage block and `PROG: error: ...`, not the
    one `error: ...` line every other refusal gives."""
    proc = run_python(command)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command, cells", [(["benchmarks/decompose.py"], ["zero3-ep2", "hf_ddp"]),
                                            (["benchmarks/zero3_settings.py"], ["strict", "defaults"]),
                                            (["benchmarks/peers.py"], ["tiedmoe", "hf_ddp"])],
                         ids=lambda c: c[-1] if isinstance(c[-1], str) and c[-1].endswith(".py") else None)
def test_smoke_run_reports_mfu(command: list[str], cells: list[str], tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_python([*command, "--steps", "1", "--repeats", "1", "--json", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "MFU" in proc.stdout and "FLOP/s per rank" in proc.stdout
    result = json.loads(out.read_text())
    rows = next(result[key] for key in ("cells", "variants", "peers") if key in result)
    for cell in cells:
        assert 0 < rows[cell]["mfu"] < 1 and rows[cell]["tokens_per_s"] > 0
    assert result["model_flops_per_token"] > 0 and result["peak_flops_per_rank"] > 0


def test_equal_memory_plot_draws_a_written_result(tmp_path: Path) -> None:
    """`--plot JSON` draws a result brought back from elsewhere (the GPU device has no matplotlib)."""
    result = tmp_path / "throughput.json"
    result.write_text((Path(__file__).resolve().parent.parent / "benchmarks" / "results"
                       / "equal_memory_cpu_d256.json").read_text())
    proc = run_python(["benchmarks/equal_memory.py", "--plot", str(result)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = tmp_path / "throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_equal_memory_plot_that_cannot_be_written(tmp_path: Path) -> None:
    """A PNG path that cannot be written (here a folder) was an IsADirectoryError traceback from savefig."""
    result = tmp_path / "throughput.json"
    result.write_text((Path(__file__).resolve().parent.parent / "benchmarks" / "results"
                       / "equal_memory_cpu_d256.json").read_text())
    (tmp_path / "throughput.png").mkdir()
    proc = run_python(["benchmarks/equal_memory.py", "--plot", str(result)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    png = tmp_path / "throughput.png"
    assert proc.stderr.strip().splitlines()[-1] == f"error: --plot {result}: cannot write {png} (Is a directory)"


@pytest.mark.parametrize("content", ["not json", '{"variants": {}}',
                                     # the keys checked first, but rows without a result's fields: a KeyError traceback
                                     '{"variants": {"untied": {}}, "budget_gib_per_rank": 1}'])
def test_equal_memory_plot_refuses_other_files(content: str, tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(content)
    proc = run_python(["benchmarks/equal_memory.py", "--plot", str(bad)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --plot {bad}")
    assert not bad.with_suffix(".png").exists()


def test_bench_data_without_a_built_corpus_uses_the_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh checkout (no data/default): the fixture built into a temporary folder was gone when the loader
    share of a step was timed, a DataError traceback after the table."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).resolve().parent.parent / "benchmarks"
                                                  / "bench_data.py")
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    monkeypatch.setattr(bench_data, "DEFAULT_OUT_DIR", tmp_path / "not_built")
    monkeypatch.setattr(bench_data, "RESULTS", tmp_path / "data.json")
    monkeypatch.setattr(sys, "argv", ["bench_data.py", "--batches", "1", "--repeats", "1"])
    bench_data.main()
    assert "loader share of a default training step" in capsys.readouterr().out
    assert json.loads((tmp_path / "data.json").read_text())["loader_share_of_step"]["fraction"] > 0


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_data_json_goes_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_data.py had no --json: every run overwrote the committed benchmarks/results/data.json."""
    bench_data = _load_script("bench_data")
    monkeypatch.setattr(bench_data, "DEFAULT_OUT_DIR", tmp_path / "not_built")  # the fixture: seconds
    monkeypatch.setattr(bench_data, "RESULTS", tmp_path / "committed" / "data.json")  # the default: must stay unwritten
    bench_data.main(["--batches", "1", "--repeats", "1", "--json", str(tmp_path / "new" / "data.json")])
    assert json.loads((tmp_path / "new" / "data.json").read_text())["tokenization"]
    assert not (tmp_path / "committed" / "data.json").exists()


COMMITTED_QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "tying_quality_cpu.json"


def test_tying_quality_json_and_plot_go_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """tying_quality.py had no --json: every run overwrote the committed tying_quality_cpu.json and .png.
    The training is replaced by the committed result's rows (the runs themselves take minutes)."""
    tying_quality = _load_script("tying_quality")
    rows = json.loads(COMMITTED_QUALITY.read_text())["variants"]
    monkeypatch.setattr(tying_quality, "run_variant", lambda name, *args: rows[name])
    monkeypatch.setattr(tying_quality, "RESULTS", tmp_path / "committed")
    out = tmp_path / "new" / "quality.json"
    assert tying_quality.main(["--steps", "6", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"steps": 6, "overrides": [], "variants": rows}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tied g=4" in capsys.readouterr().out and not (tmp_path / "committed").exists()


def test_tying_quality_plot_draws_a_written_result(tmp_path: Path) -> None:
    result = tmp_path / "quality.json"
    result.write_text(COMMITTED_QUALITY.read_text())
    proc = run_python(["benchmarks/tying_quality.py", "--plot", str(result)])
    assert proc.returncode == 0 and proc.stdout.strip() == f"wrote {tmp_path / 'quality.png'}", proc.stderr[-2000:]
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", ["not json", '{"steps": 3}', '{"variants": {"untied": {}}}', '{"variants": {}}'])
def test_tying_quality_plot_refuses_other_files(content: str, tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(content)
    proc = run_python(["benchmarks/tying_quality.py", "--plot", str(bad)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: --plot {bad}")
    assert not bad.with_suffix(".png").exists()


@pytest.mark.parametrize("script, extra, named", [
    ("benchmarks/tying_quality.py", ["--steps", "3"], "--steps"),
    ("benchmarks/tying_quality.py", ["model.d_model=32"], "model.d_model=32"),
    ("benchmarks/equal_memory.py", ["--variants", "g2"], "--variants"),
    ("benchmarks/equal_memory.py", ["--json", "/tmp/other.json"], "--json"),
])
def test_plot_takes_no_other_arguments(script: str, extra: list[str], named: str, tmp_path: Path) -> None:
    """`--plot JSON` only redraws: the measuring flags given with it were ignored without a word."""
    proc = run_python([script, "--plot", str(tmp_path / "r.json"), *extra])
    assert proc.returncode == 2 and proc.stderr == f"error: --plot takes no other arguments; {named} was given too\n"


def test_an_output_under_a_file_names_the_file() -> None:
    """It said 'File exists' (mkdir's errno), which names nothing the user can fix."""
    proc = run_python(["-m", "trainer.bench", "--json", "README.md/a/result.json"])
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("cannot write 'README.md/a/result.json': 'README.md' is a file, not a folder")


def test_timing_rounds_report_progress_through_the_captured_ranks(tmp_path: Path, monkeypatch, capsys) -> None:
    """The benchmarks' ranks run with their output captured (for the error tail): nothing showed until the table,
    minutes later. Rank 0's progress lines go through a file the launcher copies to stderr as they come."""
    import threading

    from trainer import launch
    from trainer.bench import timed_rounds

    progress = tmp_path / "progress.txt"
    progress.touch()
    monkeypatch.setenv(launch.PROGRESS_ENV, str(progress))
    monkeypatch.setenv("RANK", "1")
    assert list(timed_rounds(2, "quiet")) == [0, 1] and progress.read_text() == ""  # only rank 0 reports
    monkeypatch.setenv("RANK", "0")
    done = threading.Event()
    shower = threading.Thread(target=launch._show_progress, args=(progress, done))
    shower.start()
    assert list(timed_rounds(3, "bench")) == [0, 1, 2]
    done.set()
    shower.join()
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == [f"bench: round {i}/3 timed" for i in (1, 2, 3)], err
    assert err[-1].endswith("ETA 0 s"), err
