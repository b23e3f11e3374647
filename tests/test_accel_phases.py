"""RegionE's phase controller and velocity decay schedule: exact step indices, the §8 skip tables, jump factors."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from replan.accel import AccelConfig, Phases, StepPlan, load_gamma
from replan.accel.gamma import PUBLISHED_GAMMA

KONTEXT_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                         num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                      num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, shift_terminal=0.02,
                      time_shift_type="exponential")


def stock_sigmas(config, tokens=4096, steps=28):
    """The sigmas a stock FLUX/Qwen edit pipeline sets for ``tokens`` noisy tokens (its calculate_shift + linspace)."""
    c = config
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    mu = tokens * m + c["base_shift"] - m * c["base_image_seq_len"]
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.tolist()


def published_plan(backbone, family, delta, sigmas):
    cfg = AccelConfig.from_options("regione", cache_threshold=delta).resolved(backbone, family, 28)
    phases = Phases.from_config(cfg, 28)
    return StepPlan.build(phases, sigmas, load_gamma(cfg.gamma).for_schedule(sigmas), cfg.cache_threshold)


def test_default_phase_indices():
    phases = Phases(28, 6, 2, (16,))
    kinds = [phases.kind(i) for i in range(28)]
    assert kinds[:5] == ["full"] * 5
    assert kinds[5] == "partition"
    assert kinds[6:15] == ["region"] * 9 and kinds[16:26] == ["region"] * 10
    assert kinds[15] == "refresh"
    assert kinds[26:] == ["smooth"] * 2
    assert phases.targets == (15, 26)  # refresh list [16, 27] in RegionE's 1-based bookkeeping
    assert phases.jump_target(5) == 15 and phases.jump_target(15) == 26
    with pytest.raises(ValueError, match="only partition and refresh steps jump"):
        phases.jump_target(7)
    two = Phases(28, 6, 2, (12, 20))
    assert two.refresh_steps == (11, 19) and two.targets == (11, 19, 26)
    assert [two.jump_target(i) for i in (5, 11, 19)] == [11, 19, 26]


@pytest.mark.parametrize("backbone,family,scheduler,delta,pattern,skipped,full,edited", [
    ("flux_kontext", "flux_kontext", KONTEXT_SCHEDULER, 0.04, "FFFFFPCsCssCsCsRsssssssCssFF", 14, 9, 5),
    ("flux_kontext", "flux_kontext", KONTEXT_SCHEDULER, 0.01, "FFFFFPCsCssCsCsRsssCsCsCsCFF", 11, 9, 8),
    ("qwenimageedit", "qwen_image_edit", QWEN_SCHEDULER, 0.03, "FFFFFPCCssCCssCRCssssCsCsCFF", 10, 9, 9),
])
def test_skip_pattern_equals_the_published_table(backbone, family, scheduler, delta, pattern, skipped, full, edited):
    plan = published_plan(backbone, family, delta, stock_sigmas(scheduler))
    assert plan.pattern == pattern
    assert plan.counts() == {"full": full, "edited": edited, "skipped": skipped}


def test_skip_pattern_needs_float16_gamma():
    """RegionE stores gamma as float16; with the unrounded table one Kontext step flips (why we round)."""
    sigmas = stock_sigmas(KONTEXT_SCHEDULER)
    exact = StepPlan.build(Phases(28, 6, 2, (16,)), sigmas, PUBLISHED_GAMMA["flux_kontext"], 0.04)
    assert exact.pattern != "FFFFFPCsCssCsCsRsssssssCssFF"
    assert load_gamma("flux_kontext").values != PUBLISHED_GAMMA["flux_kontext"]


def test_skip_ratio_and_accumulated_error_by_hand():
    # 10 steps, uniform sigmas 1, .9, …, .1, 0; gamma 1 everywhere: ratio = 1 - 0.1 = 0.9 on every step
    sigmas = [1 - k / 10 for k in range(10)] + [0.0]
    phases = Phases(10, 2, 1, ())
    plan = StepPlan.build(phases, sigmas, [1.0] * 9, delta=0.2)
    # steps 0 full, 1 partition, 2 first region step (never skipped), 3: acc .9 → err .1 <= .2 skip,
    # 4: acc .81 → err .19 skip, 5: acc .729 → .271 > .2 compute (reset), 6 skip, 7 skip, 8 compute, 9 smooth
    assert plan.pattern == "FPCssCssCF"
    assert plan.ratios[3] == pytest.approx(0.9) and plan.ratios[4] == pytest.approx(0.9)
    assert plan.ratios[5] == 1.0 and plan.ratios[2] == 1.0
    # ratio >= 1 always computes; delta 0 never skips
    assert StepPlan.build(phases, sigmas, [1.2] * 9, delta=0.5).pattern == "FPCCCCCCCF"
    assert StepPlan.build(phases, sigmas, [1.0] * 9, delta=0.0).pattern == "FPCCCCCCCF"


def test_jump_scale_by_hand():
    sigmas = [1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]  # 9 steps
    plan = StepPlan.build(Phases(9, 2, 1, (5,)), sigmas)
    # partition at index 1 → target index 4 (refresh step 5); the jump is applied at index 2:
    # (σ4 - σ2) / (σ3 - σ2) = (0.5 - 0.75) / (0.6 - 0.75)
    assert plan.jump_scale[2] == pytest.approx((0.5 - 0.75) / (0.6 - 0.75))
    # refresh at index 4 → target N - P = 8, applied at index 5: (σ8 - σ5) / (σ6 - σ5)
    assert plan.jump_scale[5] == pytest.approx((0.1 - 0.4) / (0.3 - 0.4))
    assert [i for i, s in enumerate(plan.jump_scale) if s] == [2, 5]
    # together with the scheduler's step at the partition index the unedited tokens move (σ4 - σ1)·v
    moved = (sigmas[2] - sigmas[1]) + (sigmas[3] - sigmas[2]) * plan.jump_scale[2]
    assert moved == pytest.approx(sigmas[4] - sigmas[1])
    # no smooth stage: the last jump goes to sigma 0
    none = StepPlan.build(Phases(9, 2, 0, ()), sigmas)
    assert none.jump_scale[2] == pytest.approx((0.0 - 0.75) / (0.6 - 0.75))


def test_step_plan_checks_its_inputs():
    phases = Phases(10, 2, 1, ())
    with pytest.raises(ValueError, match="need 11 sigmas"):
        StepPlan.build(phases, [1.0] * 10)
    with pytest.raises(ValueError, match="needs 9 gamma values"):
        StepPlan.build(phases, torch.linspace(1, 0, 11).tolist(), [1.0] * 3, delta=0.1)
    with pytest.raises(ValueError, match="inconsistent phases"):
        Phases(10, 2, 1, (3,))
