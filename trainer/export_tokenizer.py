"""The run's tokenizer, shipped with every export so the exported model can be used on text.

Training documents are separated by one end-of-text token (`data_prep.build` appends it after each
document), so that token is the model's eos; it also serves as bos and pad, as in GPT-2, because the
model never saw any other special token. A run on random token ids (`data.source=random`) has no
tokenizer: its export says so instead of shipping one that would encode text the model never saw.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


@dataclasses.dataclass(frozen=True)
class RunTokenizer:
    """Where a run's tokenizer lies (None: the run had none) and why / where it came from."""

    path: Path | None
    eos_token: str | None
    note: str


def run_tokenizer(cfg: Any) -> RunTokenizer:
    """The tokenizer the run's data was made with: the shards' `tokenizer.json` or `data.tokenizer`."""
    from data_prep.tokenizer import find_eos_id, load_tokenizer
    from trainer.config import REPO_ROOT
    from trainer.data import data_dir

    if cfg.data.source == "random":
        return RunTokenizer(None, None, "data.source=random: the model was trained on random token ids, "
                                        "so no tokenizer was exported")
    if cfg.data.source == "stream":
        path = Path(cfg.data.tokenizer)
        path = path if path.is_absolute() else REPO_ROOT / path
        if not path.is_file():
            return RunTokenizer(None, None, f"data.tokenizer {path} not found: no tokenizer was exported")
        tokenizer = load_tokenizer(path)
        return RunTokenizer(path, tokenizer.id_to_token(find_eos_id(tokenizer)), f"data.tokenizer {path}")
    manifest_path = data_dir(cfg) / "manifest.json"
    if not manifest_path.is_file():
        return RunTokenizer(None, None, f"{manifest_path} not found (data moved?): no tokenizer was exported")
    info = json.loads(manifest_path.read_text())["tokenizer"]
    return RunTokenizer(data_dir(cfg) / info["file"], info["eos_token"], f"{data_dir(cfg) / info['file']}")


def special_token_ids(tokenizer_json: Path, eos_token: str) -> dict[str, int]:
    """eos / bos / pad ids (all the end-of-text token: the only special token training used)."""
    from data_prep.tokenizer import load_tokenizer

    eos_id = load_tokenizer(tokenizer_json).token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"tokenizer {tokenizer_json}: has no token {eos_token!r}")
    return {"eos_token_id": eos_id, "bos_token_id": eos_id, "pad_token_id": eos_id}


def check_fits(rt: RunTokenizer, model_vocab: int) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding does not have."""
    from data_prep.tokenizer import load_tokenizer

    if rt.path is None:
        return
    vocab = load_tokenizer(rt.path).get_vocab_size()
    if vocab > model_vocab:
        raise ValueError(f"tokenizer {rt.path}: vocab {vocab} does not fit the model's vocab_size {model_vocab}")


def write_tokenizer(out_dir: Path, rt: RunTokenizer, max_len: int) -> dict[str, Any]:
    """Copy tokenizer.json and write the HF tokenizer config into `out_dir`; returns what to record.

    `tokenizer_config.json` names `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(out_dir)`
    needs no custom code and no hub access.
    """
    if rt.path is None:
        return {"file": None, "note": rt.note}
    ids = special_token_ids(rt.path, rt.eos_token)
    shutil.copyfile(rt.path, out_dir / TOKENIZER_FILE)
    tokens = {"eos_token": rt.eos_token, "bos_token": rt.eos_token, "pad_token": rt.eos_token}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "model_max_length": max_len,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1))
    (out_dir / SPECIAL_TOKENS_MAP).write_text(json.dumps(tokens, indent=1))
    return {"file": TOKENIZER_FILE, "source": rt.note, **tokens, **ids}


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    """Put an export's tokenizer files into another directory of it (e.g. `hf/`)."""
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
