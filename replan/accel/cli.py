"""The ``--accel`` command-line flags, shared by every entry point that edits (infer, serve, calibrate, benchmarks).

    add_accel_arguments(parser)
    config = accel_from_args(args)            # AccelConfig; ranges are checked by config.resolved(...)
    flags = accel_flags(config)               # the same settings as command-line flags (replay commands)
"""

from __future__ import annotations

import argparse

from replan.accel.config import MODES, AccelConfig

# flag suffix → (AccelConfig field, type, help)
PARAMS = {
    "warmup": ("warmup", int, "full-pass steps before the partition (RegionE W; default 6 at 28 steps)"),
    "post": ("post", int, "full-pass steps at the end (RegionE P; default 2 at 28 steps)"),
    "refresh": ("refresh", str, "forced-refresh steps, 1-based, comma-separated, or 'none' (default '16' at 28)"),
    "threshold": ("threshold", float, "partition: cosine similarity <= this is edited, in [-1, 1] "
                                      "(default 0.93 FLUX, 0.80 Qwen)"),
    "cache_threshold": ("cache_threshold", float, "velocity cache error budget in [0, 1); 0 = off "
                                                  "(default 0.04 FLUX.1 Kontext, 0.03 Qwen)"),
    "gamma": ("gamma", str, "velocity decay table: a published name or a calibration JSON"),
    "pin": ("pin_background", str, "on/off: hold unedited tokens on the reference image's trajectory "
                                   "(default on for the plan modes)"),
    "margin": ("margin", int, "plan modes: token rings added around the plan's regions (default 1)"),
    "erosion_dilation": ("erosion_dilation", str, "on/off: clean the partition (default on)"),
}


def add_accel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("acceleration", "RegionE and plan-guided acceleration (docs/acceleration.md)")
    group.add_argument("--accel", choices=MODES, default="none",
                       help="none: the stock editor; regione: RegionE; plan: the plan's regions are the edited "
                            "set; plan+regione: both; cache-dit: cache-dit's step cache (optional package)")
    for suffix, (_, kind, text) in PARAMS.items():
        group.add_argument(f"--accel_{suffix}", type=kind, default=None, help=text)


def accel_from_args(args) -> AccelConfig:
    """An ``AccelConfig`` from parsed flags; parameters without a region mode are an error."""
    params = {field: getattr(args, f"accel_{suffix}", None) for suffix, (field, _, _) in PARAMS.items()}
    given = [f"--accel_{s}" for s, (f, _, _) in PARAMS.items() if params[f] is not None]
    mode = getattr(args, "accel", "none") or "none"
    if given and mode not in ("regione", "plan", "plan+regione"):
        raise ValueError(f"{', '.join(given)} need --accel regione, plan or plan+regione (got --accel {mode})")
    return AccelConfig.from_options(mode, **params)


def accel_flags(config: AccelConfig | None) -> list[str]:
    """Command-line flags that reproduce ``config`` (empty for ``none``)."""
    if config is None or config.mode == "none":
        return []
    flags = ["--accel", config.mode]
    for suffix, (field, _, _) in PARAMS.items():
        value = getattr(config, field)
        if value is None or (field == "margin" and value == AccelConfig.margin) or (
                field == "erosion_dilation" and value is True):
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value) if field == "refresh" else ",".join(map(str, value))
            if field == "refresh" and not value:
                value = "none"
        flags += [f"--accel_{suffix}", str(value)]
    return flags
