"""The tied Hugging Face layout: each tied tensor stored once on disk and ONE tensor in memory.

In process, no ranks: a tiny model is written with `models.hf_convert.save_hf(..., "tied")` and
loaded back the way a user would, `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`,
offline (conftest sets HF_HUB_OFFLINE). About 10 s.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models.config import from_preset
from models.hf_convert import default_layout, param_bytes, save_hf, tied_weight_map, to_hf_state_dict
from models.transformer import build_model

CASES = {
    "olmoe-g2": ("olmoe_tiny", {"tie_group_size": 2}),
    "qwen3-g2": ("qwen3_moe_tiny", {"tie_group_size": 2}),
    "olmoe-g4-router-attention": ("olmoe_tiny", {"tie_group_size": 4, "untied_first": 0, "untied_last": 0,
                                                  "tie_router": True, "tie_attention": True}),
    "qwen3-untied": ("qwen3_moe_tiny", {"tie_group_size": 1}),
}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _file_keys(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("case", list(CASES))
def test_tied_hf_stores_and_holds_each_bank_once(tmp_path, case: str) -> None:
    preset, overrides = CASES[case]
    model = build_model(from_preset(preset, vocab_size=512, **overrides), seed=3).eval()
    tied = tied_weight_map(model)
    assert bool(tied) == (case != "qwen3-untied")
    save_hf(model, tmp_path / "hf", "tied", {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0})

    # on disk: the copied layout's keys minus every follower tensor; the modeling file travels along
    assert _file_keys(tmp_path / "hf") == set(to_hf_state_dict(model)) - set(tied)
    assert (tmp_path / "hf" / "modeling_tiedmoe.py").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tied_weights"] == tied

    # in memory: each follower IS its leader's Parameter (one storage), nothing randomly initialised
    hf = _load(tmp_path / "hf")
    params = dict(hf.named_parameters(remove_duplicate=False))
    for follower, leader in tied.items():
        assert params[follower] is params[leader] and params[follower].data_ptr() == params[leader].data_ptr()
    n_unique = len({p.data_ptr() for p in hf.parameters()})
    assert n_unique == len(list(model.parameters()))
    loaded_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # parameters() deduplicates
    assert loaded_bytes == param_bytes(model)["tied"]

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, rtol=0, atol=1e-5)

    # save_pretrained of the loaded model and reload: still tied, same logits
    hf.save_pretrained(str(tmp_path / "again"))
    assert _file_keys(tmp_path / "again") == _file_keys(tmp_path / "hf")
    again = _load(tmp_path / "again")
    params = dict(again.named_parameters(remove_duplicate=False))
    assert all(params[f] is params[lead] for f, lead in tied.items())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours, rtol=0, atol=1e-5)


def test_tied_layout_needs_trust_remote_code(tmp_path) -> None:
    """Without it transformers refuses, instead of loading followers as random weights."""
    from transformers import AutoModelForCausalLM

    model = build_model(from_preset("olmoe_tiny", vocab_size=512, tie_group_size=2)).eval()
    save_hf(model, tmp_path, "tied")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_default_layout_and_sizes() -> None:
    tied = from_preset("olmoe_tiny", vocab_size=512, tie_group_size=2)
    untied = from_preset("olmoe_tiny", vocab_size=512, tie_group_size=1)
    assert (default_layout(tied), default_layout(untied)) == ("tied", "copied")
    sizes = param_bytes(build_model(tied))
    # 2 of 8 layers borrow a bank: exactly two banks fewer than the copied layout
    bank = 2 * 8 * 3 * tied.expert_ffn_dim * tied.d_model * 4
    assert sizes["copied"] - sizes["tied"] == bank
    assert param_bytes(build_model(untied))["tied"] == param_bytes(build_model(untied))["copied"]


@pytest.mark.parametrize("layout", ["tied", "copied"])
def test_sizes_count_tied_embeddings_once(tmp_path, layout: str) -> None:
    """With tie_embeddings the copied layout's size counted lm_head besides embed_tokens, though HF holds them as
    one tensor: export.json said copied 6,316,288 parameter bytes where the copied model loads 4,219,136."""
    model = build_model(from_preset("olmoe_tiny", vocab_size=512, tie_group_size=2, tie_embeddings=True)).eval()
    save_hf(model, tmp_path / "hf", layout)
    hf = _load(tmp_path / "hf")
    assert sum(p.numel() * p.element_size() for p in hf.parameters()) == param_bytes(model)[layout]
