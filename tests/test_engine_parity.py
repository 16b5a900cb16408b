"""The hinge: DeepSpeed (2 CPU ranks, gloo) with tied experts under expert parallelism and ZeRO 0-3
trains exactly like the plain-PyTorch reference (trainer.reference), cell by cell."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.parity import MUON_CI_CELLS, cells, muon_cells

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.distributed


def _parity(tmp_path_factory, which: str) -> dict:
    out = tmp_path_factory.mktemp(f"parity_{which}") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "trainer.parity", "--cells", which, "--steps", "8", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """`--cells quick`: every ZeRO stage and both EP sizes, tied and untied (10 of the 16 stage x EP x tying
    cells), every ablation, bf16 and the Muon CI cells: the CI set. The other 6 run with `-m slow`."""
    return _parity(tmp_path_factory, "quick")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> dict:
    return _parity(tmp_path_factory, "all")


ALL_CELLS = [f"zero{z}-ep{e}-{t}" for z in range(4) for e in (1, 2) for t in ("tied", "untied")] + [
    "zero3-ep2-tied-router", "zero3-ep2-tied-attention", "zero3-ep2-tied-widen2", "zero3-ep2-tied-actckpt",
    "zero3-ep2-tied-g3-deepseek"] + [c for c in MUON_CI_CELLS if not c.endswith("bf16")]
CELLS = [c for c in ALL_CELLS if c in cells("quick")]
REST = [c for c in ALL_CELLS if c not in CELLS]


def _check_losses(c: dict) -> None:
    assert len(c["losses"]) == 8
    assert c["max_abs_loss_diff"] <= 1e-5, (c["losses"], c["reference"])
    assert c["followers_share_leader_bank"]


def _check_grad_norms(c: dict) -> None:
    assert len(c["grad_norms"]) == 8 and all(n > 0 for n in c["grad_norms"])
    assert c["first_rel_grad_norm_diff"] <= 1e-5, (c["grad_norms"], c["reference_grad_norms"])
    assert c["max_rel_grad_norm_diff"] <= 5e-3, (c["grad_norms"], c["reference_grad_norms"])


@pytest.mark.parametrize("cell", CELLS)
def test_losses_match_reference(report: dict, cell: str) -> None:
    _check_losses(report["cells"][cell])


@pytest.mark.slow
@pytest.mark.parametrize("cell", REST)
def test_remaining_cells_match_reference(full_report: dict, cell: str) -> None:
    """The stage x EP x tying cells `--cells quick` leaves out: losses and gradient norms."""
    _check_losses(full_report["cells"][cell])
    _check_grad_norms(full_report["cells"][cell])


def test_control_is_far_from_tolerance(report: dict) -> None:
    """A trainer that silently untied the experts after init would fail the cells above."""
    assert report["control_untied_copy_loss_diff"] > 3e-5


def test_muon_control_flattened_bank_is_far_from_tolerance(report: dict) -> None:
    """Muon orthogonalising each expert bank as one flattened matrix would fail the muon cells above."""
    assert report["control_muon_flat_bank_loss_diff"] > 3e-5


def test_muon_bf16_trains_close_to_fp32_reference(report: dict) -> None:
    """Muon with bf16 weights (fp32 master weights and Newton-Schulz): the bf16 tolerance of the other cells."""
    c = report["cells"]["zero3-ep2-tied-muon-bf16"]
    assert 0 < c["max_abs_loss_diff"] <= 5e-2 and c["followers_share_leader_bank"]


@pytest.fixture(scope="module")
def muon_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parity_muon") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "trainer.parity", "--cells", "muon", "--steps", "8", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("cell", sorted(muon_cells()))
def test_every_muon_cell_matches_reference(muon_report: dict, cell: str) -> None:
    """ZeRO {0,1,2,3} x EP {1,2} x {tied g=2, untied} (fp32: 1e-5) and bf16 at every stage (5e-2): about 3.5
    minutes on 2 cores, so CI runs the subset above (`MUON_CI_CELLS`) and this runs with `-m slow`."""
    c = muon_report["cells"][cell]
    assert len(c["losses"]) == 8 and c["followers_share_leader_bank"]
    assert c["max_abs_loss_diff"] <= (5e-2 if cell.endswith("bf16") else 1e-5), (c["losses"], c["reference"])
    assert muon_report["control_muon_flat_bank_loss_diff"] > 3e-5


def test_tied_bank_gradient_is_sum_over_layers(report: dict) -> None:
    assert report["sgd_grad_max_abs"] > 1e-5  # a real gradient, not zeros
    assert report["sgd_grad_max_abs_diff"] <= 1e-7


@pytest.mark.parametrize("ep", [1, 2])
def test_zero3_expert_memory_per_rank_is_banks_over_layers(report: dict, ep: int) -> None:
    tied = report["cells"][f"zero3-ep{ep}-tied"]
    untied = report["cells"][f"zero3-ep{ep}-untied"]
    # measured from the partitioned tensors (ds_tensor) on every rank
    for t, u in zip(tied["expert_elements_per_rank"], untied["expert_elements_per_rank"]):
        assert t * tied["moe_layers"] == u * tied["expert_banks"]
    assert untied["expert_elements_per_rank"][0] == untied["expert_elements_per_rank_if_untied"]
    assert tied["expert_elements_per_rank_if_untied"] == untied["expert_elements_per_rank"][0]


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bf16_trains_close_to_fp32_reference(report: dict, zero: int) -> None:
    """bf16 with fp32 master weights: same trajectory up to bf16 rounding, not exactly."""
    c = report["cells"][f"zero{zero}-ep2-tied-bf16"]
    assert 0 < c["max_abs_loss_diff"] <= 5e-2
    # The loose bf16 tolerance cannot tell a tied from an untied trainer, so assert the tying itself:
    # followers run the leader's module and each rank holds banks/layers of the untied expert elements.
    assert c["followers_share_leader_bank"]
    for held in c["expert_elements_per_rank"]:
        assert held * c["moe_layers"] == c["expert_elements_per_rank_if_untied"] * c["expert_banks"]


@pytest.mark.parametrize("ep", [1, 2])
def test_zero3_tied_bank_gathered_once_per_group(report: dict, ep: int) -> None:
    """Expert all-gather traffic per step falls to (at most) banks / MoE layers of the untied model."""
    comm = report[f"comm_ep{ep}"]
    assert comm["expert_gather_ratio_tied_over_untied"] <= comm["goal_banks_over_layers"] + 1e-9
    assert comm["tied_expert_gathers"] < comm["untied_expert_gathers"]


@pytest.mark.parametrize("cell", CELLS)
def test_grad_norm_matches_reference_clip_grad_norm(report: dict, cell: str) -> None:
    """The logged global gradient norm (before clipping, each tied tensor once) equals
    torch.nn.utils.clip_grad_norm_ over the reference model's parameters: exactly on the first step
    (same weights), closely after (router top-k flips amplify 1e-7 weight differences)."""
    _check_grad_norms(report["cells"][cell])


def test_grad_norm_control_counting_tied_banks_per_use_is_far_off(report: dict) -> None:
    assert report["control_per_use_grad_norm_rel_diff"] > 1e-3


def test_few_steps_still_pass(tmp_path) -> None:
    """`--steps 2` failed a correct engine: the flattened-bank control, run for the same 2 steps, had not yet
    drifted 3x the tolerance away, and the report said only FAIL. The controls now run at least 8 steps."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "trainer.parity", "--cells", "muon", "--only", "zero0-ep1-tied-muon",
                           "--steps", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("PASS"), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["cells"]["zero0-ep1-tied-muon"]["losses"]) == 2
    assert report["control_muon_flat_bank_loss_diff"] > 3e-5
