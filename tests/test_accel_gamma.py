"""Velocity decay tables: the stock schedules, transfer to other step counts, and the calibration fit by hand."""

import json
import math

import numpy as np
import pytest
import torch

from replan.accel import GammaTable, fit_gamma, load_gamma, transfer, velocity_ratios
from replan.accel.gamma import PUBLISHED_SCHEDULES, as_float16, shifted_sigmas
from tests.test_accel_phases import KONTEXT_SCHEDULER, QWEN_SCHEDULER, stock_sigmas


@pytest.mark.parametrize("name,scheduler", [("flux_kontext", KONTEXT_SCHEDULER), ("qwenimageedit", QWEN_SCHEDULER)])
@pytest.mark.parametrize("steps", [28, 50, 9])
def test_published_schedules_equal_the_stock_scheduler(name, scheduler, steps):
    mu, terminal = PUBLISHED_SCHEDULES[name]
    assert shifted_sigmas(steps, mu, terminal) == stock_sigmas(scheduler, 4096, steps)


def test_published_tables_are_float16_rounded():
    table = load_gamma("flux_kontext")
    assert len(table.values) == 27 and table.steps == 28 and len(table.sigmas) == 29
    assert table.values[0] == float(torch.tensor(0.8352, dtype=torch.float16))
    assert as_float16([1.0]) == (1.0,)
    # same step count: used as is at any resolution (RegionE's behaviour)
    assert table.for_schedule(stock_sigmas(KONTEXT_SCHEDULER, 1024)) == table.values


def decaying_velocity_gamma(sigmas, a):
    """γ of a velocity whose norm is exactly exp(a·σ) along the schedule: ratio_i = exp(a(σ_i - σ_{i-1}))."""
    s = np.asarray(sigmas)
    d = s[:-2] - s[1:-1]
    return tuple(np.exp(-a * d) / (1 - d))


def test_transfer_is_exact_for_a_constant_decay_rate():
    s28 = shifted_sigmas(28, 1.15)
    s50 = shifted_sigmas(50, 1.15)
    g28, g50 = decaying_velocity_gamma(s28, 0.7), decaying_velocity_gamma(s50, 0.7)
    assert transfer(g28, s28, s50) == pytest.approx(g50, rel=1e-12)
    assert transfer(g28, s28, s28) == pytest.approx(g28, rel=1e-12)
    table = GammaTable(g28, tuple(s28))
    assert table.for_schedule(s50) == pytest.approx(g50, rel=1e-12)
    with pytest.raises(ValueError, match="no schedule to transfer it to 50 steps"):
        GammaTable(g28).for_schedule(s50)


def test_velocity_ratios_by_hand():
    edited = torch.tensor([True, False, True])
    v0 = torch.tensor([[[3.0, 0.0], [100.0, 100.0], [0.0, 4.0]]])  # edited rows: norm 5
    v1 = torch.tensor([[[6.0, 0.0], [1.0, 1.0], [0.0, 8.0]]])  # 2 × v0 on edited rows
    v2 = torch.tensor([[[6.0, 8.0], [0.0, 0.0], [0.0, 0.0]]])  # norm 10, <v2, v1> = 36
    assert velocity_ratios([v0, v1, v2], edited) == pytest.approx([2.0, 1.0])
    assert velocity_ratios([v0, v1, v2], edited, "projection") == pytest.approx([2.0, 36 / 100])
    zero = torch.zeros_like(v0)
    assert math.isnan(velocity_ratios([zero, v1], edited)[0])
    with pytest.raises(ValueError, match="statistic must be one of"):
        velocity_ratios([v0, v1], edited, "max")


def test_fit_gamma_by_hand():
    sigmas = [1.0, 0.8, 0.5, 0.0]  # 3 steps: Δσ_1 = 0.2, Δσ_2 = 0.3
    gamma = fit_gamma([[0.9, 1.2], [1.1, float("nan")]], sigmas)
    assert gamma == pytest.approx([1.0 / 0.8, 1.2 / 0.7])
    with pytest.raises(ValueError, match="no image gave a velocity ratio for step\\(s\\) \\[2\\]"):
        fit_gamma([[1.0, float("nan")]], sigmas)
    with pytest.raises(ValueError, match="shape \\(images, 2\\)"):
        fit_gamma([[1.0]], sigmas)


def test_load_gamma_sources(tmp_path):
    path = tmp_path / "g.json"
    table = GammaTable((1.0, 1.1), (1.0, 0.5, 0.2, 0.0), "fit")
    path.write_text(json.dumps(table.to_json()))
    loaded = load_gamma(str(path))
    assert loaded.values == (1.0, 1.1) and loaded.sigmas == (1.0, 0.5, 0.2, 0.0)
    assert load_gamma([1.0, 1.05]).values == (1.0, 1.05)
    with pytest.raises(ValueError, match="positive finite"):
        load_gamma([1.0, -1.0])
    path.write_text(json.dumps({"gamma": [1.0, 1.1], "sigmas": [1.0, 0.0]}))
    with pytest.raises(ValueError, match="2 gamma values need 4 sigmas, got 2"):
        load_gamma(str(path))
    with pytest.raises(ValueError, match="published table"):
        load_gamma("step1x")
