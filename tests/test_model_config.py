"""Config validation, parameter accounting (from the config alone) and the `models.summary` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.accounting import account
from models.config import from_dict, from_preset
from models.transformer import MoETransformer, build_model

ROOT = Path(__file__).resolve().parents[1]


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,field", [
    (dict(n_heads=5), "n_heads"),  # 64 % 5 != 0
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(top_k=9), "top_k"),  # 8 experts
    (dict(tie_groups=[[2, 3], [3, 4]]), "tie_groups"),  # overlapping
    (dict(tie_groups=[[6, 7, 8]]), "tie_groups"),  # layer 8 does not exist
    (dict(tie_groups=[[-1, 0]]), "tie_groups"),
    (dict(tie_groups=[[2, 4]]), "tie_groups"),  # not consecutive
    (dict(tie_groups=[[3, 2]]), "tie_groups"),  # not ascending
    (dict(tie_groups=[[]]), "tie_groups"),
    (dict(widen_factor=0), "widen_factor"),
    (dict(tie_group_size=0), "tie_group_size"),
    (dict(tie_group_size=2, untied_first=4, untied_last=5), "untied_first"),  # 9 > 8 MoE layers
    (dict(qk_norm="layer"), "qk_norm"),
    (dict(head_dim=7), "head_dim"),
    (dict(first_k_dense=8, dense_ffn_dim=64), "first_k_dense"),
    (dict(first_k_dense=1), "dense_ffn_dim"),
    (dict(n_shared_experts=1, shared_expert_ffn_dim=0), "shared_expert_ffn_dim"),
])
def test_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^model\.{field}="):
        from_preset("olmoe_tiny", **overrides)


def test_tie_groups_may_not_include_dense_layers() -> None:
    with pytest.raises(ValueError, match=r"^model\.tie_groups=.*MoE layer indices in \[1, 7\]"):
        from_preset("deepseek_moe_tiny", tie_groups=[[0, 1]])


def test_unknown_preset_and_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"^model\.preset='olmo'.*olmoe"):
        from_preset("olmo")
    with pytest.raises(ValueError, match=r"^model\.n_expert: unknown field"):
        from_preset("olmoe_tiny", n_expert=4)
    with pytest.raises(ValueError, match=r"^model\.bogus: unknown field"):
        from_dict({"bogus": 1})


def test_untied_first_last_only_matter_when_tying() -> None:
    from_preset("olmoe_tiny", untied_first=5, untied_last=5)  # tie_group_size=1: nothing to check
    from_preset("olmoe_tiny", tie_group_size=2, untied_first=4, untied_last=4)  # all 8 untied: allowed


# --- accounting -----------------------------------------------------------------------------------

TINY_CONFIGS = {
    "olmoe_untied": ("olmoe_tiny", {}),
    "olmoe_tied": ("olmoe_tiny", dict(tie_group_size=2)),
    "olmoe_tie_router": ("olmoe_tiny", dict(tie_group_size=2, tie_router=True)),
    "olmoe_tie_attention": ("olmoe_tiny", dict(tie_group_size=3, tie_attention=True)),
    "olmoe_widened": ("olmoe_tiny", dict(tie_group_size=2, widen_factor=3)),
    "olmoe_tied_embeddings": ("olmoe_tiny", dict(tie_embeddings=True, tie_group_size=4)),
    "qwen3_tied_gqa": ("qwen3_moe_tiny", dict(tie_group_size=2, tie_router=True, tie_attention=True)),
    "deepseek_untied": ("deepseek_moe_tiny", {}),
    "deepseek_tied": ("deepseek_moe_tiny", dict(tie_group_size=2, widen_factor=2, first_k_dense=2)),
    "explicit_groups": ("olmoe_tiny", dict(tie_groups=[[0, 1, 2], [4, 5]], tie_router=True)),
}


def params_of_every_use(model: MoETransformer) -> int:
    """Walk each layer's modules by attribute (borrowed ones included) and count them at every use."""
    total = model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        total += model.lm_head.weight.numel()
    for layer in model.model.layers:
        modules = [layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn]
        if layer.plan.ffn == "dense":
            modules.append(layer.mlp)
        else:
            modules += [layer.mlp.gate, layer.mlp.experts]
            modules += [layer.mlp.shared_expert] if hasattr(layer.mlp, "shared_expert") else []
        total += sum(p.numel() for m in modules for p in m.parameters())
    return total


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_account_matches_the_built_model(name: str) -> None:
    preset, overrides = TINY_CONFIGS[name]
    cfg = from_preset(preset, **overrides)
    model = build_model(cfg)
    acc = account(cfg)
    assert acc.unique_params == sum(p.numel() for p in model.parameters())
    assert acc.untied_params == params_of_every_use(model)
    layers = model.model.layers
    assert acc.expert_banks == len({id(layer.mlp.experts) for layer in layers if layer.plan.ffn == "moe"})
    assert acc.moe_layers == sum(layer.plan.ffn == "moe" for layer in layers)
    if any(layer.plan.is_tied_follower for layer in layers):
        assert acc.unique_params < acc.untied_params and acc.ffn_reduction > 0
    else:
        assert acc.unique_params == acc.untied_params and acc.ffn_reduction == 0


def test_tying_saves_memory_not_compute() -> None:
    untied, tied = account(from_preset("olmoe")), account(from_preset("olmoe", tie_group_size=2))
    assert tied.active_params_per_token == untied.active_params_per_token
    assert tied.train_flops_per_token == untied.train_flops_per_token
    assert tied.untied_params == untied.untied_params
    # 16 MoE layers, 2 + 2 untied, the middle 12 in 6 pairs: 10 banks instead of 16.
    assert (tied.expert_banks, tied.moe_layers) == (10, 16)
    assert tied.ffn_reduction == pytest.approx(6 / 16)


def test_olmoe_1b_7b_published_sizes() -> None:
    """OLMoE-1B-7B (arXiv 2409.02060): 6.9B total, 1.3B active parameters."""
    acc = account(from_preset("olmoe"))
    assert 6.85e9 <= acc.unique_params <= 6.95e9
    assert acc.unique_params == acc.untied_params
    assert 1.27e9 <= acc.active_params_per_token <= 1.30e9
    # By hand: 16 layers x (attention 4 * 2048^2 + norms + q/k norms 2 * 2048 + router 64 * 2048 + 8 of 64 experts
    # of 3 * 1024 * 2048) + embeddings and head 2 * 50304 * 2048 + final norm.
    per_layer = 4 * 2048**2 + 4 * 2048 + 64 * 2048
    assert acc.active_params_per_token == 16 * (per_layer + 8 * 3 * 1024 * 2048) + 2 * 50304 * 2048 + 2048
    assert acc.unique_params == 16 * (per_layer + 64 * 3 * 1024 * 2048) + 2 * 50304 * 2048 + 2048


# --- summary CLI ----------------------------------------------------------------------------------

def _summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models.summary", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_summary_prints_a_table() -> None:
    result = _summary("olmoe", "tie_group_size=2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == "olmoe tie_group_size=2"
    for row in ("unique params", "params if untied", "active params / token", "FFN reduction vs untied",
                "expert banks / MoE layers", "train FLOPs / token"):
        assert row in out
    assert "37.5%" in out and "10 / 16" in out and "[2, 3]" in out and "[12, 13]" in out


def test_summary_bad_key_is_a_one_line_error() -> None:
    result = _summary("olmoe", "n_expert=4")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.n_expert")


@pytest.mark.parametrize("args, says", [
    (["--world", "6", "--ep", "3"], "error: ep=3: expected a divisor of the expert count 64"),
    (["--world", "6", "--ep", "4"], "error: world=6: expected a multiple of ep=4"),
    (["--world", "0"], "error: world=0: expected a positive integer"),
    (["--world", "8", "--ep", "0"], "error: ep=0: expected a positive integer"),
    (["--world", "8", "--zero", "4"], "error: zero=4: expected 0, 1, 2 or 3"),
    (["--world", "8", "--precision", "fp16"], "error: precision='fp16'"),
    (["--world", "abc"], "error: argument --world: invalid int value"),
    (["--ep", "2"], "error: --ep, --zero and --precision describe a layout: give --world too"),
    (["widen_factor=2", "--world", "32", "--ep", "32"], None),  # 64 and 128 experts: fine
    (["widen_factor=2", "tie_group_size=2", "--world", "128", "--ep", "128"], "error: ep=128: expected a divisor of "
                                                                              "the expert count 64"),
])
def test_summary_refuses_a_layout_that_cannot_exist(args: list[str], says: str | None) -> None:
    """Issue 16: one error line, exit 2, nothing printed on stdout (not even the size table)."""
    result = _summary("olmoe", *args)
    if says is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(says), result.stderr



@pytest.mark.parametrize("override, says", [
    ("init_std=nan", "model.init_std=nan: expected a finite number"),  # YAML's string 'nan': a TypeError traceback
    ("rope_theta=x", "model.rope_theta='x': expected a finite number"),
    ("norm_eps=.nan", "model.norm_eps=nan: expected a finite number"),  # was accepted: NaN in every norm
    ("init_std=.inf", "model.init_std=inf: expected a finite number"),
    ("tie_router=3", "model.tie_router=3: expected true or false"),  # was accepted as truthy
    ("head_dim=x", "model.head_dim='x': expected an integer or null"),
    # not a list of lists: were TypeError tracebacks ('int' object is not iterable)
    ("tie_groups=5", "model.tie_groups=5: expected a list of non-empty lists of layer indices, e.g. [[2, 3], [4, 5]]"),
    ("tie_groups=[2,3]",
     "model.tie_groups=[2, 3]: expected a list of non-empty lists of layer indices, e.g. [[2, 3], [4, 5]]"),
    ("tie_groups=[[2,3],4]",
     "model.tie_groups=[[2, 3], 4]: expected a list of non-empty lists of layer indices, e.g. [[2, 3], [4, 5]]"),
])
def test_summary_refuses_non_numbers_in_one_line(override: str, says: str) -> None:
    result = _summary("olmoe_tiny", override)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {says}", result.stderr


def test_exponent_without_a_dot_is_a_number() -> None:
    """PyYAML reads `2e-2` as a string: `models.summary olmoe init_std=2e-2` (and `memory plan ... rope_theta=1e6`)
    ended in a TypeError traceback."""
    assert from_preset("olmoe_tiny", init_std="2e-2", rope_theta="1e6").init_std == 0.02
    result = _summary("qwen3_moe_tiny", "rope_theta=1e6", "--help")
    assert result.returncode == 0 and "python -m models.summary" in result.stdout, result.stderr  # --help after args
    assert _summary("olmoe_tiny", "init_std=2e-2").returncode == 0

# --- narrow equal-parameter baseline --------------------------------------------------------------

def test_narrow_baseline_plan_gives_middle_layers_n_experts_over_factor() -> None:
    from models.config import layer_plan

    cfg = from_preset("olmoe_tiny", narrow_factor=2)  # 8 MoE layers, 2 + 2 at the ends stay full
    assert [p.n_experts for p in layer_plan(cfg)] == [8, 8, 4, 4, 4, 4, 8, 8]
    assert not any(p.is_tied_follower for p in layer_plan(cfg))
    model = build_model(cfg)
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers] == [8, 8, 4, 4, 4, 4, 8, 8]
    assert account(cfg).unique_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("g", [2, 4])
def test_narrow_baseline_has_the_expert_parameters_of_the_tied_model(g: int) -> None:
    """Same unique expert parameters as tying g layers per bank; only the routers are smaller."""
    cfg_tied = from_preset("olmoe_tiny", n_layers=12, tie_group_size=g)
    cfg_narrow = from_preset("olmoe_tiny", n_layers=12, narrow_factor=g)

    def expert_params(cfg) -> int:
        return sum(p.numel() for n, p in build_model(cfg).named_parameters() if ".experts." in n)

    assert expert_params(cfg_tied) == expert_params(cfg_narrow)
    router_rows_saved = 8 * (8 - 8 // g)  # 8 middle layers, each router E -> E/g rows
    assert account(cfg_tied).unique_params - account(cfg_narrow).unique_params == router_rows_saved * 64


@pytest.mark.parametrize("overrides,message", [
    (dict(narrow_factor=2, tie_group_size=2), "narrow_factor=2: expected 1 when layers are tied"),
    (dict(narrow_factor=3), "narrow_factor=3: expected a divisor of n_experts=8"),
    (dict(narrow_factor=8), "narrow_factor=8: expected a divisor of n_experts=8 leaving at least top_k=2"),
    (dict(narrow_factor=2, untied_first=5, untied_last=4), "untied_first=5"),
    (dict(narrow_factor=0), "narrow_factor=0: expected a positive integer"),
])
def test_narrow_baseline_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_preset("olmoe_tiny", **overrides)


@pytest.mark.parametrize("key", ["model.tie_group_size", "model.overrides.tie_group_size"])
def test_summary_takes_the_trainers_spelling_of_a_model_field(key: str) -> None:
    """`model.tie_group_size=4` (as ./run.sh spells it) was 'model.model.tie_group_size: unknown field'."""
    plain = _summary("olmoe", "tie_group_size=4")
    prefixed = _summary("olmoe", f"{key}=4")
    assert prefixed.returncode == 0, prefixed.stderr
    assert prefixed.stdout.splitlines()[1:] == plain.stdout.splitlines()[1:]


def test_memory_plan_takes_the_trainers_spelling_of_a_model_field() -> None:
    from trainer.memory_plan import model_and_layout, plan_parser

    args = plan_parser().parse_intermixed_args(["olmoe_tiny", "--gpus", "2", "--gpu-mem-gib", "80", "model.n_experts=16"])
    assert model_and_layout(args)[1].n_experts == 16
