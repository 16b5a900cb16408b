"""`key=value` command-line overrides; values are parsed as YAML scalars/lists (`8`, `true`, `[1, 2]`)."""

from __future__ import annotations

from typing import Any

import yaml


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: it spans several (a caret under the column), and every tool's bad-input
    error must be one line, wherever it is printed."""
    return " ".join(str(err).split())


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a.b": 1, "c": "x"} (keys stay dotted; callers nest them)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {key}: cannot parse value {raw!r} ({yaml_problem(err)})") from None
    return out


def model_field_overrides(items: list[str]) -> dict[str, Any]:
    """Overrides of one model's fields (`tie_group_size=4`); the trainer's spellings `model.tie_group_size=4`
    and `model.overrides.tie_group_size=4` name the same field, so they are accepted too. An empty value
    (`tie_group_size=`) is refused as typed: read as null, its error named `model.tie_group_size=None`, which
    nobody typed (`null` sets a field that takes none)."""
    empty = next((item for item in items if item.partition("=")[1] and not item.partition("=")[2].strip()), None)
    if empty is not None:
        raise ValueError(f"override {empty!r}: no value after '='; expected {empty.partition('=')[0].strip()}=VALUE "
                         f"(null for a field that takes none)")
    out = {}
    for key, value in parse_overrides(items).items():
        out[key.removeprefix("model.").removeprefix("overrides.") if key.startswith("model.") else key] = value
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}. A key given both a value and sub-keys is refused, in either order:
    whichever came later would replace the other unchecked. A mapping value and sub-keys are joined."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{dotted}: {'.'.join(parents[:depth])} is given a value, not sub-keys; "
                                 f"give one or the other")
        if isinstance(node.get(leaf), dict):  # sub-keys came first: a mapping joins them, anything else is refused
            if not isinstance(value, dict):
                raise ValueError(f"{dotted}: given both a value and sub-keys ({dotted}.{next(iter(node[leaf]), '')}"
                                 f"=...); give one or the other")
            value = merge(node[leaf], value)
        node[leaf] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
