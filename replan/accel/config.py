"""One acceleration switch and its parameters: ``AccelConfig``, its per-backbone defaults and its validation.

    cfg = AccelConfig.from_options("regione", threshold=0.9)        # what --accel / accel= give
    cfg = cfg.resolved(backbone="flux_kontext", family="flux_kontext", steps=28)  # defaults filled, checked

Modes (``--accel``):

* ``none``: the stock pipeline, untouched.
* ``regione``: RegionE (regione-spec): full passes for ``warmup`` steps, an adaptive region partition at the last
  of them, edited-only passes with the region-instruction K/V cache and the velocity decay cache, forced refresh
  passes, ``post`` full passes at the end.
* ``plan``: the same phases, with the edited set taken from the plan's expanded boxes / region masks (plus
  ``margin`` token rings) instead of the partition; by default the rest is pinned to the reference image's latent
  at the matching noise level (exact background).
* ``plan+regione``: the union of both edited sets.
* ``cache-dit``: cache-dit's DBCache on full passes (optional package), as a step-cache baseline.

Defaults are RegionE's published ones (regione-spec §10), given for 28 steps: warmup 6, post 2, refresh "16",
threshold 0.93 / velocity-cache threshold 0.04 (FLUX families), 0.80 / 0.03 (Qwen family). At another step count
warmup, post and refresh scale with it (rounded); explicit values are used as given. Every value is checked here,
before any model work, with a message that names the parameter and its allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from replan.accel.gamma import load_gamma

MODES = ("none", "regione", "plan", "plan+regione", "cache-dit")
REGION_MODES = ("regione", "plan", "plan+regione")
PUBLISHED_STEPS = 28  # the step count RegionE's defaults and gamma tables are given for
PUBLISHED_PHASES = {"warmup": 6, "post": 2, "refresh": (16,)}
MIN_DEFAULT_STEPS = 5  # the fewest steps the scaled default phases fit in

# (threshold tau, velocity-cache threshold delta) per family (regione-spec §10). FLUX.2 klein has no published
# values: the FLUX.1 Kontext ones are used.
FAMILY_THRESHOLDS = {
    "flux_kontext": (0.93, 0.04),
    "flux2_klein": (0.93, 0.04),
    "qwen_image_edit": (0.80, 0.03),
}
# Which published gamma table a backbone uses by default (replan.accel.gamma.PUBLISHED_GAMMA). Qwen-Image-Edit-2511
# and FireRed-Image-Edit have none of their own: they borrow 2509's (same EditPlus architecture); refit for best
# results. FLUX.2 klein has none: its velocity cache needs a calibrated table (python -m replan.eval.calibrate).
BACKBONE_GAMMA = {
    "flux_kontext": "flux_kontext",
    "tiny": "flux_kontext",
    "qwenimageedit": "qwenimageedit",
    "tiny_qwen": "qwenimageedit",
    "qwenimageedit2509": "qwenimageedit2509",
    "qwenimageedit2511": "qwenimageedit2509",
    "firerededit": "qwenimageedit2509",
}


@dataclass(frozen=True)
class AccelConfig:
    """Acceleration settings. ``None`` fields take the backbone's default in ``resolved``.

    Args:
        mode: one of ``MODES``.
        warmup: W, full-pass steps at the start; the last of them (0-based step W-1) is the partition step.
        post: P, full-pass steps at the end (the smooth stage).
        refresh: forced-refresh steps, 1-based as RegionE counts them (step r runs at 0-based index r-1), each in
            W+2 .. N-P-1 and no two adjacent; ``()`` for none.
        threshold: tau in [-1, 1]; a token whose one-step estimate has cosine similarity <= tau with the reference
            latent is edited. Larger is safer (more edited tokens) and slower.
        cache_threshold: delta in [0, 1); the velocity decay cache skips a step while the accumulated decay error
            stays <= delta. 0 turns the velocity cache off.
        erosion_dilation: clean the partition (3x3 cross erosion, then 5x5 square dilation).
        gamma: the velocity decay table: a published table name, a JSON file written by the calibration command,
            or a sequence of N-1 numbers; default the backbone's published table (transferred to N steps when N is
            not 28), none for backbones without one (then the velocity cache is off unless delta was given).
        pin_background: keep every unedited token on the reference image's noising trajectory (exact background);
            default on for the plan modes, off for ``regione`` (RegionE moves it with one Euler jump instead).
        margin: plan modes: token rings added around the plan's regions.
        cache_dit: keyword arguments for cache-dit's ``DBCacheConfig`` (mode ``cache-dit``).
    """

    mode: str = "none"
    warmup: int | None = None
    post: int | None = None
    refresh: tuple[int, ...] | None = None
    threshold: float | None = None
    cache_threshold: float | None = None
    erosion_dilation: bool = True
    gamma: str | tuple[float, ...] | None = None
    pin_background: bool | None = None
    margin: int = 1
    cache_dit: Mapping | None = None

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_options(cls, accel: str | AccelConfig | Mapping | None = None, **params) -> AccelConfig:
        """Build from what a user gives: a mode name (``"regione"``), a mapping ``{"mode": ..., ...}`` or a ready
        config, plus keyword overrides (``None`` values are ignored). Types are checked; ranges in ``resolved``."""
        if isinstance(accel, AccelConfig):
            base = dataclasses.asdict(accel)
        elif isinstance(accel, Mapping):
            base = dict(accel)
        else:
            base = {"mode": "none" if accel is None else accel}
        base.update({k: v for k, v in params.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - names)
        if unknown:
            raise ValueError(f"unknown acceleration parameter(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
        mode = str(base.get("mode") or "none").strip().lower()
        if mode not in MODES:
            raise ValueError(f"accel must be one of {', '.join(MODES)}, got {base.get('mode')!r}")
        base["mode"] = mode
        if base.get("refresh") is not None:
            base["refresh"] = parse_refresh(base["refresh"])
        gamma = base.get("gamma")
        if isinstance(gamma, str) and "," in gamma and not Path(gamma).is_file():  # "1.0,1.02,…" from a flag
            base["gamma"] = [v for v in gamma.split(",") if v.strip()]
        if isinstance(base.get("gamma"), (list, tuple)):
            base["gamma"] = tuple(_number("gamma entries", g) for g in base["gamma"])
        for key in ("warmup", "post", "margin"):
            if base.get(key) is not None:
                base[key] = _integer(key, base[key])
        for key in ("threshold", "cache_threshold"):
            if base.get(key) is not None:
                base[key] = _number(key, base[key])
        for key in ("erosion_dilation", "pin_background"):
            if base.get(key) is not None:
                base[key] = _flag(key, base[key])
        return cls(**base)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def regional(self) -> bool:
        """Modes that run edited-only passes (everything but ``none`` and ``cache-dit``)."""
        return self.mode in REGION_MODES

    @property
    def uses_plan(self) -> bool:
        return self.mode in ("plan", "plan+regione")

    @property
    def uses_partition(self) -> bool:
        return self.mode in ("regione", "plan+regione")

    def check_editor_options(self, compile: bool = False, attention: str = "dense") -> None:
        """Refuse what edited-only passes cannot run with, before any model loads: ``compile`` (their token count
        changes from edit to edit and the K/V cache is Python state a compiled block would retrace) and FlexAttention
        (a ``BlockMask`` cannot be restricted to the edited rows). ``none`` and ``cache-dit`` take both."""
        if self.regional and compile:
            raise ValueError(f"accel {self.mode} runs edited-only passes eagerly and cannot be compiled: drop "
                             "--compile (compile: false), or use accel none or cache-dit")
        if self.regional and attention == "flex":
            raise ValueError(f"accel {self.mode} restricts region masks to the edited rows, which a FlexAttention "
                             "BlockMask cannot do: use attention dense")

    # ------------------------------------------------------------------------------------------------ resolving
    def resolved(self, backbone: str, family: str, steps: int) -> AccelConfig:
        """Every ``None`` filled with the backbone's default for ``steps`` steps, and every value range-checked.

        Raises ``ValueError`` naming the parameter and its allowed range."""
        if not self.regional:
            return self
        steps = _integer("steps", steps)
        tau, delta = FAMILY_THRESHOLDS.get(family, FAMILY_THRESHOLDS["flux_kontext"])
        phases = default_phases(steps)
        explicit = {k: getattr(self, k) for k in ("warmup", "post", "refresh") if getattr(self, k) is not None}
        if not explicit and phases is None:
            raise ValueError(
                f"RegionE's phases do not fit in {steps} steps (the scaled defaults need at least "
                f"{MIN_DEFAULT_STEPS}): use more steps or set accel warmup, post and refresh yourself"
            )
        phases = {**(phases or PUBLISHED_PHASES), **explicit}
        gamma = self.gamma if self.gamma is not None else BACKBONE_GAMMA.get(backbone)
        if gamma is None and self.cache_threshold is None:
            delta = 0.0  # no table for this backbone: the velocity cache stays off unless asked for
        cfg = dataclasses.replace(
            self,
            warmup=phases["warmup"],
            post=phases["post"],
            refresh=tuple(phases["refresh"]),
            threshold=tau if self.threshold is None else self.threshold,
            cache_threshold=delta if self.cache_threshold is None else self.cache_threshold,
            gamma=gamma,
            pin_background=self.uses_plan if self.pin_background is None else self.pin_background,
        )
        cfg.check(steps)
        if cfg.cache_threshold > 0 and cfg.gamma is not None:
            table = load_gamma(cfg.gamma)  # a missing or malformed table fails here, before any model work
            if table.sigmas is None and table.steps != steps:  # nothing to transfer it with (GammaTable.for_schedule)
                raise ValueError(
                    f"accel gamma has {len(table.values)} values ({table.steps} steps) and no schedule to transfer "
                    f"it with; {steps} steps needs {steps - 1} values: refit it with `python -m replan.eval.calibrate "
                    f"--steps {steps}`, or pass {steps - 1} values"
                )
        if cfg.cache_threshold > 0 and cfg.gamma is None:
            raise ValueError(
                f"the velocity cache (accel cache_threshold {cfg.cache_threshold}) needs a gamma table and "
                f"{backbone} has no published one: fit one with `python -m replan.eval.calibrate --backbone "
                f"{backbone}` and pass accel gamma=<file.json>, or set cache_threshold 0"
            )
        return cfg

    def check(self, steps: int) -> None:
        """Range checks of a resolved config against ``steps`` (regione-spec §3 constraints)."""
        n, w, p, refresh = steps, self.warmup, self.post, self.refresh
        if n < 2:  # (else the post range below reads "0..0, got 0")
            raise ValueError(f"accel {self.mode} needs at least 2 steps (a partition step, then a region step), got "
                             f"{n}: use more steps or accel none")
        if p < 0 or p > n - 2:
            raise ValueError(f"accel post (smooth-stage steps) must be in 0..{max(0, n - 2)} for {n} steps, got {p}")
        if w < 1 or w > n - p - 1:
            raise ValueError(
                f"accel warmup must be in 1..{n - p - 1} for {n} steps with post {p} (at least one region step "
                f"must follow the partition step), got {w}"
            )
        lo, hi = w + 2, n - p - 1
        for r in refresh:
            if not lo <= r <= hi:
                where = f"{lo}..{hi}" if lo <= hi else "none: the region phase is too short for a refresh step"
                raise ValueError(
                    f"accel refresh step {r} is not inside the region phase: with {n} steps, warmup {w} and post {p} "
                    f"refresh steps (1-based) must lie in {where}"
                )
        for a, b in zip(refresh, refresh[1:]):
            if b - a < 2:
                raise ValueError(f"accel refresh steps {a} and {b} are adjacent (or repeated); leave at least one "
                                 "region step between two refresh steps")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"accel threshold (cosine similarity tau) must be in [-1, 1], got {self.threshold}")
        if not 0.0 <= self.cache_threshold < 1.0:
            raise ValueError(f"accel cache_threshold (delta) must be in [0, 1), 0 = velocity cache off; "
                             f"got {self.cache_threshold}")
        if self.margin < 0:
            raise ValueError(f"accel margin (token rings around the plan's regions) must be >= 0, got {self.margin}")

    def describe(self) -> dict:
        """A JSON-ready record of the settings (saved next to outputs)."""
        out = dataclasses.asdict(self)
        out["refresh"] = list(self.refresh) if self.refresh is not None else None
        if isinstance(self.gamma, tuple):
            out["gamma"] = list(self.gamma)
        return out


def default_phases(steps: int) -> dict | None:
    """RegionE's default phases scaled to ``steps`` (the published ones at 28), or None when they do not fit."""
    if steps == PUBLISHED_STEPS:
        return dict(PUBLISHED_PHASES)
    scale = steps / PUBLISHED_STEPS
    w = max(1, int(PUBLISHED_PHASES["warmup"] * scale + 0.5))  # rounded half up
    p = int(PUBLISHED_PHASES["post"] * scale + 0.5)
    r = int(PUBLISHED_PHASES["refresh"][0] * scale + 0.5)
    if not (w + 2 <= r <= steps - p - 1):
        return None
    return {"warmup": w, "post": p, "refresh": (r,)}


def parse_refresh(value) -> tuple[int, ...]:
    """``"16"``, ``"12,20"``, ``16``, ``[12, 20]`` or ``""``/``"none"`` (no refresh) → sorted 1-based step tuple."""
    if isinstance(value, str):
        text = value.strip().lower()
        items: Iterable = [] if text in ("", "none") else [s for s in text.replace(" ", "").split(",") if s]
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value)
    steps = sorted(_integer("refresh", v) for v in items)
    return tuple(steps)


def _integer(name: str, value) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError):
        raise ValueError(f"accel {name} must be a whole number, got {value!r}") from None


def _number(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"accel {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"accel {name} must be finite, got {value!r}")
    return number


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"accel {name} must be on/off (true/false), got {value!r}")
