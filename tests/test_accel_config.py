"""The acceleration switch: defaults per backbone and step count, and clear errors before any model work."""

import json
import re

import pytest

from replan.accel import AccelConfig, default_phases, parse_refresh


def resolved(mode="regione", backbone="flux_kontext", family="flux_kontext", steps=28, **params):
    return AccelConfig.from_options(mode, **params).resolved(backbone, family, steps)


def test_published_defaults_per_backbone():
    kontext = resolved()
    assert (kontext.warmup, kontext.post, kontext.refresh) == (6, 2, (16,))
    assert (kontext.threshold, kontext.cache_threshold, kontext.gamma) == (0.93, 0.04, "flux_kontext")
    assert kontext.erosion_dilation and not kontext.pin_background
    qwen = resolved(backbone="qwenimageedit", family="qwen_image_edit")
    assert (qwen.threshold, qwen.cache_threshold, qwen.gamma) == (0.80, 0.03, "qwenimageedit")
    assert resolved(backbone="qwenimageedit2509", family="qwen_image_edit").gamma == "qwenimageedit2509"
    assert resolved(backbone="firerededit", family="qwen_image_edit").gamma == "qwenimageedit2509"
    # klein: no published table → the velocity cache is off unless asked for
    klein = resolved(backbone="flux_klein_base", family="flux2_klein", steps=50)
    assert klein.gamma is None and klein.cache_threshold == 0.0 and klein.threshold == 0.93
    # the plan modes pin the background by default; regione does not
    assert resolved("plan").pin_background and resolved("plan+regione").pin_background
    assert not resolved("plan", pin_background="off").pin_background
    assert resolved("regione", pin_background=True).pin_background
    # none / cache-dit: nothing to resolve
    assert resolved("none") == AccelConfig() and not AccelConfig().enabled
    assert resolved("cache-dit").mode == "cache-dit" and not resolved("cache-dit").regional


def test_phases_scale_with_the_step_count():
    assert default_phases(28) == {"warmup": 6, "post": 2, "refresh": (16,)}
    assert default_phases(50) == {"warmup": 11, "post": 4, "refresh": (29,)}  # 10.7, 3.6, 28.6 rounded half up
    assert default_phases(8) == {"warmup": 2, "post": 1, "refresh": (5,)}
    assert default_phases(5) == {"warmup": 1, "post": 0, "refresh": (3,)}
    assert default_phases(4) is None
    with pytest.raises(ValueError, match="do not fit in 4 steps.*at least 5"):
        resolved(steps=4)
    # explicit phases are used as given, at any step count where they fit
    cfg = resolved(steps=4, warmup=1, post=0, refresh="")
    assert (cfg.warmup, cfg.post, cfg.refresh) == (1, 0, ())


def test_parse_refresh_forms():
    assert parse_refresh("16") == (16,)
    assert parse_refresh("20, 12") == (12, 20)
    assert parse_refresh([12, 20]) == (12, 20)
    assert parse_refresh(16) == (16,)
    assert parse_refresh("") == () and parse_refresh("none") == ()
    with pytest.raises(ValueError, match="accel refresh must be a whole number, got 'a'"):
        parse_refresh("12,a")


@pytest.mark.parametrize("params,message", [
    ({"threshold": 1.5}, r"threshold \(cosine similarity tau\) must be in \[-1, 1\], got 1.5"),
    ({"threshold": -1.01}, r"must be in \[-1, 1\]"),
    ({"refresh": "7"}, r"refresh step 7 is not inside the region phase: .* must lie in 8..25"),
    ({"refresh": "26"}, r"refresh step 26 is not inside the region phase"),
    ({"refresh": "12,13"}, r"refresh steps 12 and 13 are adjacent"),
    ({"refresh": "12,12"}, r"adjacent \(or repeated\)"),
    ({"warmup": 0}, r"warmup must be in 1..25"),
    ({"warmup": 26, "refresh": ""}, r"warmup must be in 1..25"),
    ({"post": 27}, r"post \(smooth-stage steps\) must be in 0..26"),
    ({"cache_threshold": 1.0}, r"cache_threshold \(delta\) must be in \[0, 1\)"),
    ({"cache_threshold": -0.1}, r"cache_threshold"),
    ({"margin": -1}, r"margin .* must be >= 0"),
    ({"warmup": 2.5}, r"accel warmup must be a whole number, got 2.5"),
    ({"threshold": "high"}, r"accel threshold must be a number, got 'high'"),
    ({"threshold": float("nan")}, r"accel threshold must be finite"),
    ({"erosion_dilation": "maybe"}, r"erosion_dilation must be on/off"),
])
def test_bad_parameters_name_the_parameter_and_range(params, message):
    with pytest.raises(ValueError, match=message):
        resolved(**params)


def test_bad_mode_and_unknown_parameter():
    with pytest.raises(ValueError, match="accel must be one of none, regione, plan, plan\\+regione, cache-dit"):
        AccelConfig.from_options("fast")
    with pytest.raises(ValueError, match="unknown acceleration parameter\\(s\\) tau; valid: "):
        AccelConfig.from_options("regione", tau=0.9)
    assert AccelConfig.from_options({"mode": "RegionE", "threshold": "0.9"}).threshold == 0.9
    assert AccelConfig.from_options(None).mode == "none"


def test_velocity_cache_needs_a_gamma_table(tmp_path):
    with pytest.raises(ValueError, match="needs a gamma table and flux_klein has no published one: fit one with "
                                         "`python -m replan.eval.calibrate"):
        resolved(backbone="flux_klein", family="flux2_klein", steps=28, cache_threshold=0.02)
    with pytest.raises(ValueError, match="neither a published table .* nor a JSON file"):
        resolved(gamma=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"values": [1, 2]}))
    with pytest.raises(ValueError, match="not a calibration JSON with a 'gamma' list"):
        resolved(gamma=str(bad))
    good = tmp_path / "gamma.json"
    good.write_text(json.dumps({"gamma": [1.0] * 27, "sigmas": None}))
    cfg = resolved(backbone="flux_klein", family="flux2_klein", gamma=str(good), cache_threshold=0.02)
    assert cfg.gamma == str(good)


def test_describe_is_json_ready():
    record = resolved("plan", refresh="12,20").describe()
    assert json.loads(json.dumps(record))["refresh"] == [12, 20]
    assert record["mode"] == "plan" and record["pin_background"] is True


def test_edited_only_passes_refuse_compile_and_flex():
    for mode in ("regione", "plan", "plan+regione"):
        message = re.escape(f"accel {mode} runs edited-only passes eagerly and cannot be compiled")
        with pytest.raises(ValueError, match=message):
            AccelConfig(mode).check_editor_options(compile=True)
        with pytest.raises(ValueError, match="a FlexAttention BlockMask cannot do: use attention dense"):
            AccelConfig(mode).check_editor_options(attention="flex")
        AccelConfig(mode).check_editor_options()
    for mode in ("none", "cache-dit"):
        AccelConfig(mode).check_editor_options(compile=True, attention="flex")


def test_gamma_without_a_schedule_must_match_the_step_count(tmp_path):
    """A table without sigmas cannot be transferred to another step count: refused while resolving (before any
    model loads), not at the first transformer call."""
    with pytest.raises(ValueError, match=r"accel gamma has 3 values \(4 steps\).* 28 steps needs 27"):
        resolved(gamma="1.0,1.02,0.99")
    no_schedule = tmp_path / "gamma.json"
    no_schedule.write_text(json.dumps({"gamma": [1.0] * 9, "sigmas": None}))
    with pytest.raises(ValueError, match=r"accel gamma has 9 values \(10 steps\)"):
        resolved(gamma=str(no_schedule))
    assert resolved(steps=10, gamma=str(no_schedule)).gamma == str(no_schedule)
    assert resolved(steps=10, gamma="1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0").gamma == (1.0,) * 9
    assert resolved(steps=10).gamma == "flux_kontext"  # a published table carries its schedule: transferred
    assert resolved(steps=10, cache_threshold=0, gamma="1.0,1.0").cache_threshold == 0  # cache off: unused


def test_one_step_is_refused_without_a_contradictory_range():
    for params in ({"warmup": 1, "post": 0, "refresh": "none"}, {"post": 0}):
        with pytest.raises(ValueError, match="accel regione needs at least 2 steps .* got 1: use more steps"):
            resolved(steps=1, **params)
    assert resolved(steps=2, warmup=1, post=0, refresh="none").warmup == 1  # the fewest that fit
