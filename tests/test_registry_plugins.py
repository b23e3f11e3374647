"""The backbone registry lists real models only; the offline tiny backbones register themselves from
``replan.testing.backbones`` when a name the table lacks is asked for, and then work like any other name."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from replan.backbones import registry

ROOT = Path(__file__).resolve().parents[1]
TINY = ("tiny", "tiny_klein", "tiny_qwen")


def test_the_table_holds_real_models_and_the_tiny_ones_arrive_on_first_lookup():
    code = ("import json; from replan.backbones import registry as r; before = sorted(r.BACKBONES); "
            "spec = r.resolve('TINY'); print(json.dumps([before, sorted(r.BACKBONES), spec.name, spec.builder]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=300)
    before, after, name, builder = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [n for n in before if n.startswith("tiny")] and "flux_kontext" in before
    assert set(after) - set(before) == set(TINY)
    assert (name, builder) == ("tiny", "replan.testing:save_tiny_kontext")


def test_tiny_names_resolve_and_are_listed():
    assert set(TINY) <= set(registry.names())
    for name in TINY:
        spec = registry.resolve(name)
        assert spec.builder.startswith("replan.testing") and spec.dtype == "float32"
    assert registry.resolve("tiny").pipeline_class == registry.resolve("flux").pipeline_class
    assert registry.resolve("tiny_qwen").family == "qwen_image_edit"
    assert registry.resolve("tiny_klein").family == "flux2_klein"
    with pytest.raises(ValueError, match="valid names: .*tiny"):
        registry.resolve("tiny_sd")


def test_register_refuses_a_taken_name():
    spec = registry.resolve("flux_kontext")
    assert registry.register(spec) is spec  # the same spec again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        registry.register(replace(spec, steps=3))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(replace(spec, name="flux"))  # an alias
