"""YAML configs that map 1:1 to dataclasses, shared by every entry point that reads one.

    data = apply_overrides(read_yaml("configs/train/stage1.yaml"), ["grpo.max_steps=2", "model.path=tiny"])
    check_keys(data, TrainConfig, "stage1.yaml")
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(data, cls, source: str, section: str | None = None) -> dict:
    """``data`` as a dict holding only ``cls``'s field names; ``ValueError`` naming the unknown keys otherwise."""
    what = f"{section} " if section else ""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {what or 'the config '}must be a mapping ({', '.join(field_names(cls))})")
    unknown = sorted(set(data) - set(field_names(cls)))
    if unknown:
        raise ValueError(f"{source}: unknown {what}key(s) {', '.join(map(str, unknown))}; "
                         f"valid: {', '.join(field_names(cls))}")
    return dict(data)


def coerce_numbers(value):
    """YAML 1.1 reads ``1e-6`` (no dot) as a string: make it the number it means, in nested values too."""
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    return coerce_numbers(data)


def apply_overrides(data: dict, overrides) -> dict:
    """``["steps=4", "planner.ckpt=tiny"]`` → a new mapping; values are parsed as YAML, dotted keys nest."""
    data = json.loads(json.dumps(data))
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. steps=4 or planner.ckpt=tiny)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        target = data
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = coerce_numbers(yaml.safe_load(value)) if value.strip() else None
    return data
