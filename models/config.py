"""Model configuration, presets and the layer plan.

Every architecture (OLMoE-, Qwen3-MoE-, DeepSeek-MoE-style) is one `ModelConfig`; presets are plain
dictionaries of field values. Expert tying is decided here and only here: `layer_plan()` turns the
config into a per-layer list saying which expert bank, router and attention each layer uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

QKNorm = Literal["none", "full", "per_head"]


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer. Field names follow the paper / HF where they can."""

    # --- backbone ---
    vocab_size: int = 50304  # embedding rows; may exceed the tokenizer's vocab (padding)
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    head_dim: int | None = None  # None: d_model // n_heads
    qk_norm: QKNorm = "full"  # "full": OLMoE (norm over all heads), "per_head": Qwen3
    clip_qkv: float | None = None  # OLMoE clamps q, k, v to [-clip, clip]
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    init_std: float = 0.02  # init="normal": every matrix ~ N(0, init_std)
    # "paper": depth-scaled Xavier (epfml/looped-moe): xavier_uniform with gain 1/sqrt(3 n_layers) on every
    # matrix and on each expert of a bank on its own; norms stay 1
    init: Literal["normal", "paper"] = "normal"
    # --- MoE ---
    n_experts: int = 64  # routed experts per MoE layer (before widening)
    top_k: int = 8
    expert_ffn_dim: int = 1024
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to one
    n_shared_experts: int = 0  # DeepSeek-MoE always-on experts (fused into one SwiGLU MLP)
    shared_expert_ffn_dim: int = 0  # hidden width of each shared expert
    first_k_dense: int = 0  # the first k layers use a dense SwiGLU MLP instead of MoE
    dense_ffn_dim: int = 0  # hidden width of those dense MLPs
    # --- expert tying (the paper's method) ---
    tie_group_size: int = 1  # g consecutive MoE layers share one expert bank; 1 = untied
    untied_first: int = 2  # MoE layers at the start kept untied (paper default 2)
    untied_last: int = 2  # MoE layers at the end kept untied (paper default 2)
    tie_groups: list[list[int]] | None = None  # explicit groups of layer indices; overrides the three above
    tie_router: bool = False  # ablation: followers also use the leader's router
    tie_attention: bool = False  # ablation: followers also use the leader's attention
    widen_factor: int = 1  # heterogeneous widening: tied layers get widen_factor x n_experts experts
    # equal-parameter untied baseline: the MoE layers a tied model would tie (between untied_first and
    # untied_last) get n_experts / narrow_factor experts each (paper: narrow_factor = g); needs tie_group_size 1
    narrow_factor: int = 1

    def __post_init__(self) -> None:
        validate(self)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerPlan:
    """What one layer uses. Owners are layer indices: a layer owning its module has owner == index."""

    index: int
    ffn: Literal["dense", "moe"]
    expert_owner: int | None  # layer whose expert bank this layer uses (None for dense layers)
    n_experts: int  # routed experts in that bank (0 for dense layers)
    router_owner: int | None
    attention_owner: int

    @property
    def is_tied_follower(self) -> bool:
        return self.expert_owner is not None and self.expert_owner != self.index


FLOAT_FIELDS = ("clip_qkv", "rope_theta", "norm_eps", "init_std")


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"model.{name}={value!r}: expected {expected}")


def validate(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field for any inconsistent setting."""
    positive = ["vocab_size", "d_model", "n_layers", "n_heads", "n_experts", "top_k", "expert_ffn_dim",
                "tie_group_size", "widen_factor", "narrow_factor", "max_seq_len"]
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(name, value, "a positive integer")
    for name in ["untied_first", "untied_last", "n_shared_experts", "shared_expert_ffn_dim", "first_k_dense",
                 "dense_ffn_dim"]:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(name, value, "a non-negative integer")
    for name in ("n_kv_heads", "head_dim"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            _fail(name, value, "an integer or null")
    for name in FLOAT_FIELDS:  # a string or nan here was a TypeError in the range checks below, or NaN weights
        value = getattr(cfg, name)
        if not (value is None and name == "clip_qkv") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            _fail(name, value, "a finite number" + (" or null" if name == "clip_qkv" else ""))
    for name in ("tie_embeddings", "norm_topk_prob", "tie_router", "tie_attention"):
        if not isinstance(getattr(cfg, name), bool):
            _fail(name, getattr(cfg, name), "true or false")
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        _fail("n_heads", cfg.n_heads, f"a divisor of d_model={cfg.d_model} (or set head_dim)")
    if cfg.head_dim is not None and (cfg.head_dim < 2 or cfg.head_dim % 2):
        _fail("head_dim", cfg.head_dim, "an even integer >= 2 (RoPE rotates pairs)")
    if cfg.attn_head_dim % 2:
        _fail("n_heads", cfg.n_heads, "a head count giving an even head_dim (RoPE rotates pairs)")
    if cfg.n_kv_heads is not None and (cfg.n_kv_heads < 1 or cfg.n_heads % cfg.n_kv_heads):
        _fail("n_kv_heads", cfg.n_kv_heads, f"a positive divisor of n_heads={cfg.n_heads}")
    if cfg.init not in ("normal", "paper"):
        _fail("init", cfg.init, "one of 'normal', 'paper'")
    if cfg.qk_norm not in ("none", "full", "per_head"):
        _fail("qk_norm", cfg.qk_norm, "one of 'none', 'full', 'per_head'")
    if cfg.clip_qkv is not None and cfg.clip_qkv <= 0:
        _fail("clip_qkv", cfg.clip_qkv, "a positive number or null")
    if cfg.rope_theta <= 0:
        _fail("rope_theta", cfg.rope_theta, "a positive number")
    if cfg.norm_eps <= 0:
        _fail("norm_eps", cfg.norm_eps, "a positive number")
    if cfg.init_std < 0:
        _fail("init_std", cfg.init_std, "a non-negative number")
    if cfg.top_k > cfg.n_experts:
        _fail("top_k", cfg.top_k, f"at most n_experts={cfg.n_experts}")
    if cfg.n_shared_experts and not cfg.shared_expert_ffn_dim:
        _fail("shared_expert_ffn_dim", cfg.shared_expert_ffn_dim, "> 0 when n_shared_experts > 0")
    if cfg.first_k_dense >= cfg.n_layers:
        _fail("first_k_dense", cfg.first_k_dense, f"fewer than n_layers={cfg.n_layers} (at least one MoE layer)")
    if cfg.first_k_dense and not cfg.dense_ffn_dim:
        _fail("dense_ffn_dim", cfg.dense_ffn_dim, "> 0 when first_k_dense > 0")
    tie_groups(cfg)  # validates grouping fields
    if cfg.narrow_factor > 1:
        _validate_narrow(cfg)


def _validate_narrow(cfg: ModelConfig) -> None:
    """The narrow baseline is untied by definition and needs a whole number of experts, at least top_k."""
    if cfg.tie_group_size > 1 or cfg.tie_groups is not None:
        _fail("narrow_factor", cfg.narrow_factor, "1 when layers are tied (the narrow baseline is untied; "
              "set tie_group_size=1 and tie_groups=null)")
    if cfg.n_experts % cfg.narrow_factor or cfg.n_experts // cfg.narrow_factor < cfg.top_k:
        _fail("narrow_factor", cfg.narrow_factor, f"a divisor of n_experts={cfg.n_experts} leaving at least "
              f"top_k={cfg.top_k} experts")
    if cfg.untied_first + cfg.untied_last > len(moe_layers(cfg)):
        _fail("untied_first", cfg.untied_first, f"untied_first + untied_last <= {len(moe_layers(cfg))} MoE layers "
              f"(untied_last={cfg.untied_last})")


def moe_layers(cfg: ModelConfig) -> list[int]:
    return list(range(cfg.first_k_dense, cfg.n_layers))


def middle_layers(cfg: ModelConfig) -> list[int]:
    """MoE layers between the `untied_first` and `untied_last` ones: where tying (or narrowing) happens."""
    moe = moe_layers(cfg)
    return moe[cfg.untied_first:len(moe) - cfg.untied_last]


def tie_groups(cfg: ModelConfig) -> list[list[int]]:
    """Groups of MoE layer indices sharing one expert bank (singletons are untied layers)."""
    moe = moe_layers(cfg)
    if cfg.tie_groups is not None:
        # Shape first: `tie_groups=5` or `tie_groups=[2,3]` (a flat list) was a TypeError traceback below.
        if not isinstance(cfg.tie_groups, (list, tuple)) or any(
                not isinstance(g, (list, tuple)) for g in cfg.tie_groups):
            _fail("tie_groups", cfg.tie_groups, "a list of non-empty lists of layer indices, e.g. [[2, 3], [4, 5]]")
        groups = [list(g) for g in cfg.tie_groups]
        seen: set[int] = set()
        for group in groups:
            if not group or any(not isinstance(i, int) or isinstance(i, bool) for i in group):
                _fail("tie_groups", cfg.tie_groups, "a list of non-empty lists of layer indices")
            if group != list(range(group[0], group[0] + len(group))):
                _fail("tie_groups", group, "consecutive ascending layer indices")
            for i in group:
                if i not in moe:
                    _fail("tie_groups", group, f"MoE layer indices in [{moe[0]}, {moe[-1]}]")
                if i in seen:
                    _fail("tie_groups", cfg.tie_groups, f"non-overlapping groups (layer {i} appears twice)")
                seen.add(i)
        singles = [[i] for i in moe if i not in seen]
        return sorted(groups + singles)
    if cfg.tie_group_size == 1:
        return [[i] for i in moe]
    if cfg.untied_first + cfg.untied_last > len(moe):
        _fail("untied_first", cfg.untied_first,
              f"untied_first + untied_last <= {len(moe)} MoE layers (untied_last={cfg.untied_last})")
    head = moe[:cfg.untied_first]
    middle = middle_layers(cfg)
    tail = moe[len(moe) - cfg.untied_last:]
    groups = [[i] for i in head]
    groups += [middle[s:s + cfg.tie_group_size] for s in range(0, len(middle), cfg.tie_group_size)]
    groups += [[i] for i in tail]
    return groups


def layer_plan(cfg: ModelConfig) -> list[LayerPlan]:
    """Per-layer ownership of expert bank, router and attention, and expert counts (widening, narrowing);
    the single place tying is decided."""
    owner = {i: g[0] for g in tie_groups(cfg) for i in g}
    tied = {i for g in tie_groups(cfg) if len(g) > 1 for i in g}
    narrow = set(middle_layers(cfg)) if cfg.narrow_factor > 1 else set()
    plan = []
    for i in range(cfg.n_layers):
        if i < cfg.first_k_dense:
            plan.append(LayerPlan(i, "dense", None, 0, None, i))
            continue
        lead = owner[i]
        n_exp = cfg.n_experts * (cfg.widen_factor if i in tied else 1) // (cfg.narrow_factor if i in narrow else 1)
        plan.append(LayerPlan(
            index=i, ffn="moe", expert_owner=lead, n_experts=n_exp,
            router_owner=lead if cfg.tie_router else i,
            attention_owner=lead if cfg.tie_attention else i,
        ))
    return plan


# Every field that ties something, at its untied value.
UNTIED_FIELDS: dict[str, Any] = {"tie_group_size": 1, "tie_groups": None, "tie_router": False, "tie_attention": False}


def untied(cfg: ModelConfig) -> ModelConfig:
    """The same architecture with every layer owning its modules: the baseline a tied model is compared with."""
    return dataclasses.replace(cfg, **UNTIED_FIELDS)


def plan_notes(cfg: ModelConfig) -> list[str]:
    """Human-readable remarks on the tying layout (e.g. a short last group)."""
    notes = []
    groups = [g for g in tie_groups(cfg) if len(g) > 1]
    if cfg.tie_groups is None and cfg.tie_group_size > 1:
        if not groups:
            notes.append("tie_group_size > 1 but no layers are tied (too few middle MoE layers)")
        else:
            # The middle's last chunk; a chunk of one layer is a singleton, so look at the middle, not `groups`.
            moe = moe_layers(cfg)
            middle = moe[cfg.untied_first:len(moe) - cfg.untied_last]
            last = middle[len(middle) - len(middle) % cfg.tie_group_size:]
            if last:
                untied = " (so it stays untied)" if len(last) == 1 else ""
                notes.append(f"last tie group {last} has {len(last)} layers, fewer than "
                             f"tie_group_size={cfg.tie_group_size}{untied}")
    if not groups:
        unused = {"widen_factor": cfg.widen_factor > 1, "tie_router": cfg.tie_router,
                  "tie_attention": cfg.tie_attention}
        notes += [f"{name} has no effect: no tied layers" for name, is_set in unused.items() if is_set]
    return notes


# ---------------------------------------------------------------------------------------------
# Presets. Sizes from the issue; the rest from the paper's code (epfml/looped-moe, moe_train.py:
# get_olmoe_config / get_qwen3moe_config / get_deepseek_config) unless noted. The paper uses the
# cl100k vocab (100277); our presets keep the OLMoE tokenizer-sized 50304 and the user's tokenizer
# decides at run time (data.vocab must fit model.vocab_size).
# ---------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # OLMoE-1B-7B (arXiv 2409.02060; HF allenai/OLMoE-1B-7B-0924 config): 16 layers, d 2048, 16 heads,
    # 64 experts top-8, expert FFN 1024, q/k RMSNorm over the full width, clip_qkv 8, no renormalisation.
    "olmoe": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, qk_norm="full", clip_qkv=8.0,
                  rope_theta=10000.0, norm_eps=1e-5, n_experts=64, top_k=8, expert_ffn_dim=1024,
                  norm_topk_prob=False, max_seq_len=4096),
    # Paper's Qwen3-MoE-style model (looped-moe get_qwen3moe_config): 28 layers, d 1536, 24 q / 4 kv heads
    # (head_dim 64), per-head q/k norm, 60 experts top-4 with moe_intermediate_size 768, norm_topk_prob,
    # rms eps 1e-6, rope theta 1e4 (the paper's value; public Qwen3-MoE uses 1e6).
    "qwen3_moe": dict(vocab_size=50304, d_model=1536, n_layers=28, n_heads=24, n_kv_heads=4, qk_norm="per_head",
                      clip_qkv=None, rope_theta=10000.0, norm_eps=1e-6, n_experts=60, top_k=4,
                      expert_ffn_dim=768, norm_topk_prob=True, max_seq_len=4096),
    # DeepSeek-MoE-style (arXiv 2401.06066): fine-grained routed experts plus always-on shared experts and
    # a dense first layer. Width/depth from looped-moe get_deepseek_config (16 layers, d 2048, 64 experts
    # top-6, expert FFN 1024). Shared experts (2) and one dense first layer (FFN 4096) are our choice,
    # following DeepSeekMoE's layout; the paper's code leaves them out.
    "deepseek_moe": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, qk_norm="full", clip_qkv=8.0,
                         rope_theta=10000.0, norm_eps=1e-5, n_experts=64, top_k=6, expert_ffn_dim=1024,
                         norm_topk_prob=False, n_shared_experts=2, shared_expert_ffn_dim=1024, first_k_dense=1,
                         dense_ffn_dim=4096, max_seq_len=4096),
}
_TINY = dict(vocab_size=8192, d_model=64, n_layers=8, n_heads=4, expert_ffn_dim=32, max_seq_len=512,
             untied_first=2, untied_last=2)
PRESETS["olmoe_tiny"] = {**PRESETS["olmoe"], **_TINY, "n_experts": 8, "top_k": 2}
PRESETS["qwen3_moe_tiny"] = {**PRESETS["qwen3_moe"], **_TINY, "n_kv_heads": 2, "n_experts": 8, "top_k": 2}
PRESETS["deepseek_moe_tiny"] = {**PRESETS["deepseek_moe"], **_TINY, "n_experts": 8, "top_k": 2,
                                "n_shared_experts": 1, "shared_expert_ffn_dim": 32, "first_k_dense": 1,
                                "dense_ffn_dim": 128}


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a config from a preset plus field overrides (unknown fields are an error)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}: expected one of {sorted(PRESETS)}")
    return from_dict({**PRESETS[name], **overrides})


def from_dict(values: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    return ModelConfig(**{k: _as_float(v) if k in FLOAT_FIELDS else v for k, v in values.items()})


def _as_float(value: Any) -> Any:
    """PyYAML reads `2e-2` or `1e6` (no dot) as a string: `models.summary olmoe init_std=2e-2` must mean the number.
    Anything else is left for `validate` to refuse."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


