"""Acceleration in IV-Edit runs: the accel config key, its record per sample, and fidelity-with-speed against the
unaccelerated run of the same seed (RegionE's protocol)."""

import json
import math
from pathlib import Path

import pytest

from replan.eval.fidelity import measure
from replan.eval.generate import main

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "configs/eval/tiny.yaml")


def gen(out, *extra):
    return main(["--config", TINY_YAML, f"output_dir={out}", "dataset=tiny", "steps=8", "device=cpu",
                 "method=baseline", "limit=1", *extra])


def test_accelerated_run_against_its_vanilla_run(tmp_path):
    vanilla, fast, partial = tmp_path / "vanilla", tmp_path / "fast", tmp_path / "partial"
    assert gen(vanilla) == 0
    assert gen(fast, "accel={mode: regione, threshold: 1.0, cache_threshold: 0}") == 0
    assert gen(partial, "accel={mode: regione, threshold: 0.0, erosion_dilation: false}") == 0
    settings = json.loads((fast / "run_config.json").read_text())["settings"]
    assert settings["accel"]["mode"] == "regione" and settings["accel"]["refresh"] == [5]
    assert "accel" not in json.loads((vanilla / "run_config.json").read_text())["settings"]
    ids = sorted(p.name for p in fast.iterdir() if (p / "result.png").is_file())
    record = json.loads((fast / ids[0] / "config.json").read_text())
    assert record["accel"]["pattern"] == "FPCCRCCF"

    same = measure(fast, vanilla, lpips="off")
    assert same["aggregate"]["reference"]["identical"] == 1  # every token edited, no velocity cache: the stock edit
    speed = same["speed"]
    assert speed["count"] == 1 and speed["speedup"] == pytest.approx(speed["reference_edit_s"] / speed["run_edit_s"])
    assert speed["accel"]["full_passes"] == 8 and speed["accel"]["edited_share"] == 1.0

    report = measure(partial, vanilla, lpips="off")
    ref = report["aggregate"]["reference"]
    assert ref["identical"] == 0 and math.isfinite(ref["psnr"])
    accel = report["speed"]["accel"]  # default delta 0.04 with Kontext's gamma carried to 8 steps: some skips
    assert accel["edited_passes"] + accel["skipped_passes"] == 4 and accel["skipped_passes"] > 0
    assert 0 < accel["edited_share"] < 1
    assert "background" in report["aggregate"]  # background PSNR against the input, from the run's dataset


def test_bad_accel_in_a_config_exits_2_before_loading(tmp_path, capsys):
    assert gen(tmp_path / "o", "accel={mode: regione, threshold: 7}") == 2
    assert "threshold (cosine similarity tau) must be in [-1, 1]" in capsys.readouterr().err
    assert gen(tmp_path / "o", "accel=regione", "steps=4") == 2
    assert "do not fit in 4 steps" in capsys.readouterr().err
    assert gen(tmp_path / "o", "accel=plan", "compile=true") == 2
    assert "cannot be compiled" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_regione_rows_are_their_rows_plus_accel():
    """Each RegionE row is its unaccelerated row with accel: regione and its own output_dir (nothing else differs,
    so fidelity compares like with like)."""
    import yaml

    rows = sorted((ROOT / "configs/eval").glob("*_regione.yaml"))
    assert len(rows) == 10
    for path in rows:
        fast = yaml.safe_load(path.read_text())
        base = yaml.safe_load(path.with_name(path.name.replace("_regione", "")).read_text())
        assert fast.pop("accel") == "regione" and base.pop("accel") == "none"
        assert fast.pop("output_dir") == f"outputs/eval/{path.stem}"
        base.pop("output_dir")
        assert fast == base, path.name
