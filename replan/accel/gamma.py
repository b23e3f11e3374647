"""The velocity decay factors γ: RegionE's published tables, tables fitted by calibration, and their transfer to
other step counts.

``γ[i-1]`` belongs to step ``i`` (``i = 1 … N-1``): the velocity cache predicts ``v_i ≈ γ[i-1] · (1 - Δσ_i) · v_{i-1}``
on edited tokens, ``Δσ_i = σ_{i-1} - σ_i`` (regione-spec §8). The published tables (27 values, 28 steps) are kept
as RegionE stores them: rounded to float16 (the skip patterns of §8 depend on that rounding).

Calibration (``fit_gamma``) follows the same definition: over a set of unaccelerated edits, the edited-token
velocity ratio between adjacent steps, averaged over images, divided by ``(1 - Δσ_i)``. ``statistic="norm"`` uses
``‖v_i‖ / ‖v_{i-1}‖`` over the edited tokens, ``"projection"`` the least-squares factor
``<v_i, v_{i-1}> / ‖v_{i-1}‖²`` (the scalar that best predicts ``v_i`` from ``v_{i-1}``).

A table fitted for one step count is carried to another (``transfer``) through its decay rate per unit of sigma:
``ρ = ln(γ (1 - Δσ)) / Δσ`` at each step's sigma midpoint, linearly interpolated at the new midpoints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# regione-spec §8, γ[0] … γ[26] for 28 steps
PUBLISHED_GAMMA: dict[str, tuple[float, ...]] = {
    "flux_kontext": (
        0.8352, 0.9986, 1.0090, 1.0097, 1.0161, 1.0152, 1.0160, 1.0173, 1.0177, 1.0199, 1.0213, 1.0203, 1.0257,
        1.0236, 1.0235, 1.0278, 1.0302, 1.0311, 1.0352, 1.0371, 1.0391, 1.0459, 1.0498, 1.0581, 1.0693, 1.0866,
        1.1090),
    "qwenimageedit": (
        1.0195, 1.0233, 1.0243, 1.0185, 1.0321, 1.0208, 1.0260, 1.0233, 1.0258, 1.0292, 1.0316, 1.0306, 1.0289,
        1.0347, 1.0329, 1.0402, 1.0378, 1.0384, 1.0413, 1.0444, 1.0526, 1.0400, 1.0555, 1.0439, 1.0357, 1.0118,
        0.7603),
    "qwenimageedit2509": (
        1.0186, 1.0241, 1.0236, 1.0205, 1.0298, 1.0221, 1.0248, 1.0246, 1.0269, 1.0275, 1.0323, 1.0311, 1.0298,
        1.0353, 1.0343, 1.0397, 1.0387, 1.0393, 1.0404, 1.0458, 1.0507, 1.0418, 1.0518, 1.0426, 1.0311, 1.0068,
        0.7628),
}
# The 28-step schedules the published tables belong to (1024² output, 4096 tokens): the stock scheduler configs,
# (dynamic-shift mu, shift_terminal).
PUBLISHED_SCHEDULES = {
    "flux_kontext": (1.15, None),
    "qwenimageedit": (0.5 + 3840 * 0.4 / 7936, 0.02),
    "qwenimageedit2509": (0.5 + 3840 * 0.4 / 7936, 0.02),
}
STATISTICS = ("norm", "projection")


def as_float16(values: Sequence[float]) -> tuple[float, ...]:
    """Round to float16 as RegionE stores its tables."""
    return tuple(float(v) for v in torch.tensor(list(values), dtype=torch.float16).float())


def shifted_sigmas(steps: int, mu: float, shift_terminal: float | None = None) -> list[float]:
    """The flow-matching schedule of the stock editors: ``linspace(1, 1/N, N)``, exponential time shift by ``mu``,
    optionally stretched to end at ``shift_terminal``, terminal 0 appended (as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps``, computed in float32)."""
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    if shift_terminal:
        one_minus = 1.0 - s
        s = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    return [float(v) for v in np.asarray(s, dtype=np.float32)] + [0.0]


@dataclass(frozen=True)
class GammaTable:
    """γ for one schedule: ``values[i-1]`` for step ``i``; ``sigmas`` the ``N + 1`` sigmas it was fitted on."""

    values: tuple[float, ...]
    sigmas: tuple[float, ...] | None = None
    source: str = ""

    @property
    def steps(self) -> int:
        return len(self.values) + 1

    def for_schedule(self, sigmas: Sequence[float]) -> tuple[float, ...]:
        """The table for a run with these ``N + 1`` sigmas: as is when the step count matches (RegionE uses its
        28-step table at any resolution), otherwise ``transfer``-ed (needs the fitting schedule)."""
        n = len(sigmas) - 1
        if n == self.steps:
            return self.values
        if self.sigmas is None:
            raise ValueError(f"the gamma table {self.source or ''} has {len(self.values)} values ({self.steps} steps) "
                             f"and no schedule to transfer it to {n} steps: refit it for {n} steps")
        return transfer(self.values, self.sigmas, sigmas)

    def to_json(self) -> dict:
        return {"gamma": list(self.values), "sigmas": None if self.sigmas is None else list(self.sigmas),
                "source": self.source}


def published(name: str) -> GammaTable:
    if name not in PUBLISHED_GAMMA:
        raise ValueError(f"no published gamma table {name!r}; published: {', '.join(sorted(PUBLISHED_GAMMA))}")
    mu, terminal = PUBLISHED_SCHEDULES[name]
    return GammaTable(as_float16(PUBLISHED_GAMMA[name]), tuple(shifted_sigmas(28, mu, terminal)), f"published:{name}")


def load_gamma(source) -> GammaTable:
    """A table from a published name, a JSON file (``{"gamma": [...], "sigmas": [...]}`` as the calibration command
    writes it), a sequence of numbers or their comma-separated text. ``ValueError`` with the fix when it cannot be
    read."""
    if isinstance(source, GammaTable):
        return source
    if isinstance(source, (list, tuple)):
        values = tuple(float(v) for v in source)
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("accel gamma values must be positive finite numbers")
        return GammaTable(values, None, "given")
    name = str(source)
    if "," in name and not Path(name).is_file():  # numbers on a command line: "1.0,1.02,…"
        try:
            return load_gamma([float(v) for v in name.split(",") if v.strip()])
        except ValueError:
            raise ValueError(f"accel gamma {name!r}: a comma-separated list must hold numbers only") from None
    if name in PUBLISHED_GAMMA:
        return published(name)
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"accel gamma {name!r} is neither a published table ({', '.join(sorted(PUBLISHED_GAMMA))}) "
                         "nor a JSON file written by `python -m replan.eval.calibrate`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        values = tuple(float(v) for v in data["gamma"])
        sigmas = data.get("sigmas")
        sigmas = None if sigmas is None else tuple(float(s) for s in sigmas)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"accel gamma file {path} is not a calibration JSON with a 'gamma' list: {e}") from None
    if sigmas is not None and len(sigmas) != len(values) + 2:
        raise ValueError(f"accel gamma file {path}: {len(values)} gamma values need {len(values) + 2} sigmas, "
                         f"got {len(sigmas)}")
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"accel gamma file {path}: gamma values must be positive finite numbers")
    return GammaTable(values, sigmas, str(path))


def transfer(values: Sequence[float], from_sigmas: Sequence[float], to_sigmas: Sequence[float]) -> tuple[float, ...]:
    """Carry a γ table fitted on ``from_sigmas`` to the schedule ``to_sigmas`` (both ``N + 1`` values, decreasing,
    terminal 0), through the decay rate per unit of sigma at each step's midpoint."""
    src = np.asarray(from_sigmas, dtype=np.float64)
    dst = np.asarray(to_sigmas, dtype=np.float64)
    if len(values) != len(src) - 2:
        raise ValueError(f"{len(values)} gamma values need {len(values) + 2} sigmas, got {len(src)}")
    d_src = src[:-2] - src[1:-1]  # Δσ_i for i = 1 … N-1
    mid_src = (src[:-2] + src[1:-1]) / 2
    rate = np.log(np.asarray(values, dtype=np.float64) * (1 - d_src)) / d_src
    d_dst = dst[:-2] - dst[1:-1]
    mid_dst = (dst[:-2] + dst[1:-1]) / 2
    order = np.argsort(mid_src)
    rate_dst = np.interp(mid_dst, mid_src[order], rate[order])
    return tuple(float(v) for v in np.exp(rate_dst * d_dst) / (1 - d_dst))


# ---------------------------------------------------------------------------------------------------- calibration
def velocity_ratios(velocities: Sequence[torch.Tensor], edited: torch.Tensor, statistic: str = "norm") -> list[float]:
    """Per step ``i = 1 … N-1``, the edited-token ratio of ``v_i`` to ``v_{i-1}`` (``velocities``: N tensors
    ``(1, L, C)``; ``edited``: ``(L,)`` bool)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    rows = [v.reshape(-1, v.shape[-1])[edited.reshape(-1)].double() for v in velocities]
    out = []
    for prev, cur in zip(rows, rows[1:]):
        denom = float((prev * prev).sum())
        if denom == 0:
            out.append(float("nan"))
        elif statistic == "norm":
            out.append(math.sqrt(float((cur * cur).sum()) / denom))
        else:
            out.append(float((cur * prev).sum()) / denom)
    return out


def fit_gamma(ratios: Sequence[Sequence[float]], sigmas: Sequence[float]) -> tuple[float, ...]:
    """γ from per-image velocity ratios (each ``N - 1`` values, NaN where undefined): the mean over images of
    step ``i``'s ratio divided by ``(1 - Δσ_i)``."""
    table = np.asarray(ratios, dtype=np.float64)
    n = len(sigmas) - 1
    if table.ndim != 2 or table.shape[1] != n - 1 or table.shape[0] == 0:
        raise ValueError(f"need ratios of shape (images, {n - 1}) for {n} steps, got {table.shape}")
    counts = np.sum(~np.isnan(table), axis=0)
    if np.any(counts == 0):
        missing = [int(i) + 1 for i in np.nonzero(counts == 0)[0]]
        raise ValueError(f"no image gave a velocity ratio for step(s) {missing}")
    mean = np.nanmean(table, axis=0)
    s = np.asarray(sigmas, dtype=np.float64)
    return tuple(float(v) for v in mean / (1 - (s[:-2] - s[1:-1])))
