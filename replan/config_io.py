"""YAML configs that map 1:1 to dataclasses, shared by every entry point that reads one, and the run guard: a run
folder records its settings in ``run_config.json`` and refuses a run made with other settings.

    data = apply_overrides(read_yaml("configs/train/stage1.yaml"), ["grpo.max_steps=2", "model.path=tiny"])
    check_keys(data, TrainConfig, "stage1.yaml")
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

from replan.io import write_text

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


# ---------------------------------------------------------------------------------------------------- run guard
RUN_CONFIG = "run_config.json"


def recorded_settings(out: str | Path) -> dict | None:
    """The settings recorded in ``out/run_config.json`` (None when there is no record; {} when it is unreadable)."""
    path = Path(out) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (ValueError, AttributeError, OSError):
        return {}
    return settings if isinstance(settings, dict) else {}


def settings_diff(old: dict, new: dict, prefix: str = "") -> str:
    """``"a.b: 1 → 2; c: 'x' → 'y'"`` over the keys that differ (nested mappings by dotted key)."""
    parts = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = settings_diff(a, b, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{key}: {a!r} → {b!r}")
    return "; ".join(parts)


def check_run_settings(out: str | Path, settings: dict, *, force: bool = False,
                       way_out: str = "use another output_dir") -> bool:
    """Refuse (one-line ``ValueError``) to reuse a folder whose ``run_config.json`` records other settings.

    Returns True when the folder already records exactly ``settings``, False when it records none (or ``force``).
    Every writer of a run folder — eval generation, GRPO, learnable-regions training — goes through this check, so
    a run never resumes or mixes with a different one."""
    old = recorded_settings(out)
    if old is None:
        return False
    normalised = json.loads(json.dumps(settings))  # tuples → lists, as they read back from JSON
    if old == normalised:
        return True
    if not force:
        diff = settings_diff(old, normalised) or f"unreadable {RUN_CONFIG}"
        raise ValueError(f"{out} holds a run made with other settings ({diff}); {way_out}")
    return False


def record_run_settings(out: str | Path, settings: dict, **extra) -> Path:
    """Write ``out/run_config.json`` = ``{**extra, "settings": settings}`` atomically (staged in ``out`` itself)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_text(out / RUN_CONFIG, json.dumps({**extra, "settings": settings}, indent=2) + "\n")
