"""benchmarks/reproduce.py without training: every run's config builds at both scales, the table and the
per-claim statements follow from (synthetic) numbers, and --table-only / --dry-run start nothing."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from trainer.config import REPO_ROOT, load_config, zero_stage

_spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up there
_spec.loader.exec_module(reproduce)

TASKS = reproduce.DOWNSTREAM_TASKS


def _run(val_ce: float, macro: float | None = None, seed: int = 0, agreement: float | None = None) -> dict:
    """One run as `collect` returns it; `macro` puts the same score on every task."""
    down = None if macro is None else {"macro_average": macro, "tasks": {t: macro for t in TASKS},
                                       "metrics": {t: "acc" for t in TASKS},
                                       "docs": {t: reproduce.DOWNSTREAM_LIMIT for t in TASKS}}
    return {"run": f"r{seed}", "seed": seed, "val_ce": val_ce, "unique_params": 1000, "active_params": 500,
            "unique_ffn_params": 800, "tokens_per_s": 100.0, "model_state_bytes_per_rank": 2**20,
            "tie_agreement": agreement, "downstream": down, "val_curve": [(0, 9.0), (10, val_ce)]}


def _results(**rows: list[dict]) -> dict[str, list[dict]]:
    """Every variant of the suite, those not given with no runs."""
    return {name: rows.get(name, []) for name in reproduce.VARIANTS}


@pytest.mark.parametrize("scale", sorted(reproduce.SCALES))
def test_every_run_config_builds_at_both_scales(scale) -> None:
    names = set()
    for variant in reproduce.VARIANTS:
        for seed in (0, 1):
            cfg = load_config(*reproduce.overrides_for(scale, variant, seed, None))
            names.add(cfg.run.name)
            assert cfg.run.seed == seed and cfg.run.out_dir == f"runs/repro-{scale}"
            if "Muon" in variant:  # at ZeRO-0, as the committed CPU runs were trained
                assert cfg.optim.name == "muon" and zero_stage(cfg) == 0
            else:
                assert cfg.optim.name == "adamw"
            if scale == "cpu":  # the floor for the CPU scale
                assert cfg.model_config().n_layers >= 8 and cfg.model_config().n_experts >= 16
    assert len(names) == 2 * len(reproduce.VARIANTS)


@pytest.mark.parametrize("kind, cost, noise, tolerance, expected", [
    ("better", -0.05, 0.02, 0, "holds"), ("better", 0.05, 0.02, 0, "does not hold"),
    ("better", -0.01, 0.02, 0, "cannot be told from seed noise"),
    ("worse", 0.05, 0.02, 0, "holds"), ("worse", -0.05, 0.02, 0, "does not hold"),
    ("worse", 0.01, 0.02, 0, "cannot be told from seed noise"),
    ("no_cost", 0.01, 0.02, 0.05, "holds"), ("no_cost", 0.10, 0.02, 0.05, "does not hold"),
    ("no_cost", 0.04, 0.02, 0.05, "cannot be told from seed noise"),
    ("small_cost", 0.05, 0.02, 0.10, "holds"), ("small_cost", -0.05, 0.02, 0.10, "does not hold"),
    ("small_cost", 0.20, 0.02, 0.10, "does not hold"), ("small_cost", 0.01, 0.02, 0.10, "cannot be told from seed noise"),
    ("better", -1.0, None, 0, "cannot be told from seed noise"),  # one seed: no noise measured
])
def test_verdict(kind, cost, noise, tolerance, expected) -> None:
    assert reproduce.verdict(kind, cost, noise, tolerance) == expected


def test_unknown_claim_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="claim kind"):
        reproduce.verdict("sideways", 0.0, 0.0)


def test_summary_is_mean_and_half_range_over_seeds() -> None:
    s = reproduce.summarize([_run(5.0, 0.40, 0), _run(5.2, 0.36, 1)])
    assert s["seeds"] == 2 and s["val_ce"] == pytest.approx(5.1) and s["val_ce_half_range"] == pytest.approx(0.1)
    down = s["downstream"]
    assert down["macro_average"] == pytest.approx(0.38) and down["macro_half_range"] == pytest.approx(0.02)
    assert down["tasks"]["piqa"] == {"mean": pytest.approx(0.38), "half_range": pytest.approx(0.02)}
    one = reproduce.summarize([_run(5.0)])
    assert one["val_ce_half_range"] is None and "downstream" not in one


def test_binomial_standard_error_at_the_limit() -> None:
    docs = {t: 500 for t in TASKS}  # 2 tasks at chance 1/4, 2 at chance 1/2
    expected = math.sqrt(2 * 0.25 * 0.75 / 500 + 2 * 0.25 / 500) / 4
    assert reproduce.binomial_se(docs) == pytest.approx(expected)
    assert 0.009 < expected < 0.011  # what the docstring and the document state


def test_claims_follow_the_numbers() -> None:
    summaries = {name: reproduce.summarize(runs) if runs else None for name, runs in _results(**{
        "untied": [_run(5.50, 0.45, 0), _run(5.52, 0.46, 1)],  # above chance (0.375 + 2 SE)
        "g=2": [_run(5.52, 0.45, 0), _run(5.54, 0.45, 1)],  # +0.02, noise 0.02: within 1% -> holds
        "g=4": [_run(5.70, 0.38, 0), _run(5.72, 0.38, 1)],  # +0.20 > 3% of 5.51 -> does not hold
        "g=2 tied router": [_run(5.50, 0.38, 0)],  # one seed, at chance
        "g=2 tied attention": [_run(5.60, 0.36, 0), _run(5.62, 0.36, 1)],  # below chance
    }).items()}
    by_claim = {c.variant + " vs " + c.reference: reproduce.assess(c, summaries) for c in reproduce.CLAIMS}
    g2 = by_claim["g=2 vs untied"]
    assert g2["verdict"] == "holds" and g2["val_ce_cost"] == pytest.approx(0.02)
    assert g2["val_ce_noise"] == pytest.approx(0.02)
    # downstream: -0.005 difference, noise at least the binomial SE of a difference of 2-seed means
    assert g2["downstream_gain"] == pytest.approx(-0.005)
    assert g2["downstream_noise"] >= reproduce.binomial_se({t: 500 for t in TASKS}) - 1e-12
    # -0.005 +- 0.0105 may be more than the 1-point tolerance: noise
    assert g2["downstream_verdict"] == "cannot be told from seed noise"
    assert by_claim["g=4 vs untied"]["verdict"] == "does not hold"
    assert by_claim["g=4 vs untied"]["downstream_verdict"] == "does not hold"  # -0.075 accuracy, 7.5 points
    attention = by_claim["g=2 tied attention vs g=2 tied router"]
    assert attention["verdict"] == "cannot be told from seed noise" and attention["val_ce_noise"] is None
    assert attention["downstream_verdict"] == reproduce.AT_CHANCE  # a -0.02 gain, but both rows guess
    widened = by_claim["g=2 widened x2 vs g=2"]
    assert widened["verdict"] == "not run yet" and widened["missing"] == ["g=2 widened x2"]
    assert by_claim["untied Muon vs untied"]["verdict"] == "not run yet"


def test_above_chance_needs_two_standard_errors() -> None:
    docs = {t: 500 for t in TASKS}
    margin = 2 * reproduce.binomial_se(docs) / math.sqrt(2)  # of a two-seed mean
    at = {"docs": docs, "runs": 2, "macro_average": 0.375 + margin - 0.001}
    assert not reproduce.above_chance(at)
    assert reproduce.above_chance({**at, "macro_average": 0.375 + margin + 0.001})


def test_document_lists_every_variant_and_states_every_claim() -> None:
    results = _results(**{"untied": [_run(5.50, 0.37, 0), _run(5.52, 0.38, 1)],
                          "g=2": [_run(5.52, 0.37, 0, 0.2), _run(5.54, None, 1, 0.2)],
                          "g=2 tied router": [_run(5.48, None, 0, 0.8), _run(5.49, None, 1, 0.9)]})
    params = {name: (1000, 500) for name in reproduce.VARIANTS}
    text, verdicts = reproduce.document(results, params, "cpu", [0, 1])
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the main table's rows (the per-task table repeats the names)
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    for name in reproduce.VARIANTS:
        assert name in rows
    assert "| 0 of 2 | 1,000 | 500 | not run yet |" in rows["g=4"]
    assert "| 5.510 +- 0.010 | +0.000 | 0.375 +- 0.005 |" in rows["untied"]
    assert "| 0.370 (1 seed) (1 of 2) |" in rows["g=2"]  # one of its two runs scored
    assert "| - |" in rows["g=2 tied router"]  # no downstream scores
    for claim, result in zip(reproduce.CLAIMS, verdicts):
        assert text.count(f"- **{claim.text}**: {result['verdict']}") == 1
    assert "6 of 20 runs finished" in text and "at chance or close to it" in text
    assert "from 0.20 (g=2) to 0.85 (top-k / n_experts would be chance)" in text
    json.dumps(verdicts)  # goes into the results JSON as is


def test_steps_runs_live_apart_and_the_document_says_their_steps() -> None:
    """`--steps N` trained into runs/repro-cpu/ itself: `--steps 3` resumed a `--steps 1` run, the full suite
    would have continued smoke runs' checkpoints, and the document still said "Every run: 300 steps"."""
    smoke = load_config(*reproduce.overrides_for("cpu", "untied", 0, 3))
    full = load_config(*reproduce.overrides_for("cpu", "untied", 0, None))
    assert smoke.run_dir() != full.run_dir() and smoke.run.out_dir == "runs/repro-cpu-steps3"
    params = {name: (1000, 500) for name in reproduce.VARIANTS}
    results = _results(untied=[_run(8.9, None, 0)])
    text, _ = reproduce.document(results, params, "cpu", [0], 3)
    assert "`python benchmarks/reproduce.py --scale cpu --steps 3` from the runs under runs/repro-cpu-steps3/" in text
    assert "Every run: 3 steps on the default corpus" in text and "300 steps" not in text
    assert "Every run: 300 steps on the default corpus" in reproduce.document(results, params, "cpu", [0])[0]


def test_an_evaluation_with_another_setting_is_not_reused(tmp_path) -> None:
    path = tmp_path / "step00000300.json"
    down = {"tasks": {t: {"score": 0.3} for t in TASKS}, "limit": reproduce.DOWNSTREAM_LIMIT,
            "num_fewshot": reproduce.DOWNSTREAM_FEWSHOT, "macro_average": 0.3}
    assert reproduce.downstream_result(path) is None  # not there
    path.write_text(json.dumps({"downstream": down}))
    assert reproduce.downstream_result(path) == down
    path.write_text(json.dumps({"downstream": {**down, "limit": 100}}))
    assert reproduce.downstream_result(path) is None
    path.write_text(json.dumps({"validation": {}}))  # scored with --tasks none
    assert reproduce.downstream_result(path) is None
    path.write_text("{truncated")
    assert reproduce.downstream_result(path) is None


@pytest.mark.parametrize("args, trains, scores, writes", [
    (["--table-only"], False, False, True),
    (["--no-train"], False, True, True),
    (["--no-downstream"], True, False, True),
    (["--dry-run"], False, False, False),
    (["--dry-run", "--scale", "gpu"], False, False, False),
])
def test_what_each_mode_starts(monkeypatch, capsys, args, trains, scores, writes) -> None:
    calls = {"train": 0, "score": 0, "write": 0}
    monkeypatch.setattr(reproduce.Run, "finished", lambda self: True)
    monkeypatch.setattr(reproduce, "train", lambda run: calls.__setitem__("train", calls["train"] + 1))
    monkeypatch.setattr(reproduce, "score", lambda run: calls.__setitem__("score", calls["score"] + 1) or True)
    monkeypatch.setattr(reproduce, "write_outputs", lambda *a: calls.__setitem__("write", calls["write"] + 1))
    monkeypatch.setattr(reproduce.subprocess, "run", lambda *a, **k: pytest.fail("started a process"))
    assert reproduce.main(args + ["--seeds", "0"]) == 0
    runs = len(reproduce.VARIANTS)
    assert calls == {"train": runs * trains, "score": runs * scores, "write": int(writes)}
    if "--dry-run" in args:
        out = capsys.readouterr().out
        assert out.count("   train: ./run.sh ") == runs and out.count("   score: python -m trainer.evaluate ") == runs


def test_a_smoke_or_partial_table_does_not_replace_the_whole_suites_results(monkeypatch, tmp_path, capsys) -> None:
    """`--only untied --seeds 0 --steps 2` rewrote docs/reproduction.md and reproduce_cpu.json / .png (the
    committed 20-run results) with a 1-run table. Only the whole suite is written under those names."""
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(reproduce, "collect", lambda run: _run(5.5, None, run.seed))
    monkeypatch.setattr(reproduce, "plot", lambda results, path: path.write_bytes(b"png"))

    def tabulate(argv: list[str], finished: set[str]) -> set[str]:
        monkeypatch.setattr(reproduce.Run, "finished", lambda self: self.variant in finished)
        assert reproduce.main(["--table-only", *argv]) == 0
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}

    every = set(reproduce.VARIANTS)
    assert tabulate([], every) == {"docs/reproduction.md", "benchmarks/results/reproduce_cpu.json",
                                   "benchmarks/results/reproduce_cpu.png"}
    whole = (tmp_path / "docs" / "reproduction.md").read_text()
    assert "20 of 20 runs finished" in whole
    written = tabulate(["--seeds", "0", "--steps", "2"], {"untied"})
    assert "benchmarks/results/reproduce_cpu-steps2-seeds0-partial.json" in written
    assert "docs/reproduction_cpu-steps2-seeds0-partial.md" in written
    assert "the partial table goes to reproduce_cpu-steps2-seeds0-partial.*" in capsys.readouterr().out
    tabulate(["--steps", "2"], every)  # a complete smoke suite: its own name too
    assert (tmp_path / "benchmarks" / "results" / "reproduce_cpu-steps2.json").is_file()
    tabulate(["--scale", "gpu"], every)
    assert (tmp_path / "docs" / "reproduction_gpu.md").is_file()
    assert (tmp_path / "docs" / "reproduction.md").read_text() == whole  # the whole CPU suite's, untouched
