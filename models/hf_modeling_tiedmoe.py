"""Tied OLMoE / Qwen3-MoE for Hugging Face transformers: each tied expert bank stored and held once.

Shipped as `modeling_tiedmoe.py` inside a tied HF export (`python -m trainer.export RUN --hf`) and
registered through `auto_map`, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
builds these classes offline. It imports nothing but transformers: it runs without tiedmoe installed.

Why this works with transformers' own machinery: the config carries `tied_weights`, a
{follower parameter: leader parameter} map (experts, and router / attention when those are tied too).
`get_expanded_tied_weights_keys` adds it to the model's tied-weights mapping, the same mechanism that
ties `lm_head` to the embeddings. `from_pretrained` then points every follower at its leader's
Parameter (one tensor in memory; the follower keys are absent from the safetensors file), and
`save_pretrained` drops the followers again, so a save and reload keeps the tie. Forward is the
parent class's, so logits are exactly those of the untied OLMoE / Qwen3-MoE with copied banks.
The model_type differs from the parent's on purpose: without trust_remote_code transformers refuses
the directory instead of loading a model whose tied layers would be randomly initialised.
"""

from __future__ import annotations

from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM


class TiedOlmoeConfig(OlmoeConfig):
    model_type = "tiedmoe_olmoe"


class TiedQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "tiedmoe_qwen3_moe"


def _tied_banks(config: object) -> dict[str, str]:
    return dict(getattr(config, "tied_weights", None) or {})


def _with_tied_banks(keys: dict[str, str], config: object, all_submodels: bool) -> dict[str, str]:
    """The parent's mapping (embeddings) plus the config's tied banks, at the top-level model only."""
    return keys if all_submodels else {**keys, **_tied_banks(config)}


class TiedOlmoeForCausalLM(OlmoeForCausalLM):
    config_class = TiedOlmoeConfig

    def __init__(self, config: TiedOlmoeConfig) -> None:
        super().__init__(config)
        # save_pretrained reads this attribute to know which shared tensors to write once
        self._tied_weights_keys = {**(OlmoeForCausalLM._tied_weights_keys or {}), **_tied_banks(config)}

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        return _with_tied_banks(super().get_expanded_tied_weights_keys(all_submodels), self.config, all_submodels)


class TiedQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = TiedQwen3MoeConfig

    def __init__(self, config: TiedQwen3MoeConfig) -> None:
        super().__init__(config)
        self._tied_weights_keys = {**(Qwen3MoeForCausalLM._tied_weights_keys or {}), **_tied_banks(config)}

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        return _with_tied_banks(super().get_expanded_tied_weights_keys(all_submodels), self.config, all_submodels)
