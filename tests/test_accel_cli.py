"""--accel on the command line: flags round-trip, bad values exit 2 before any model loads, the edit records it."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import replan.infer as infer
from replan.accel import AccelConfig
from replan.accel.cli import accel_flags, accel_from_args, add_accel_arguments

ROOT = Path(__file__).resolve().parents[1]
DESK = str(ROOT / "assets/examples/desk.png")
TINY = ["--backbone", "tiny", "--steps", "8", "--device", "cpu", "--no_plan", "--instruction", "make it snowy"]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_accel_arguments(parser)
    return accel_from_args(parser.parse_args(argv))


def test_flags_round_trip():
    cfg = parse(["--accel", "plan+regione", "--accel_refresh", "12,20", "--accel_threshold", "0.9",
                 "--accel_pin", "off", "--accel_margin", "2", "--accel_gamma", "1.0,1.1"])
    assert cfg == AccelConfig("plan+regione", refresh=(12, 20), threshold=0.9, pin_background=False, margin=2,
                              gamma=(1.0, 1.1))
    assert parse(accel_flags(cfg)) == cfg
    assert parse(accel_flags(parse(["--accel", "regione", "--accel_refresh", "none"]))).refresh == ()
    assert accel_flags(AccelConfig()) == [] and parse([]) == AccelConfig()
    with pytest.raises(ValueError, match="--accel_threshold need --accel regione, plan or plan\\+regione"):
        parse(["--accel_threshold", "0.5"])


def test_bad_accel_exits_2_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    for extra, message in [(["--accel", "regione", "--accel_threshold", "3"], "must be in [-1, 1], got 3.0"),
                           (["--accel", "regione", "--accel_refresh", "2"], "refresh step 2 is not inside"),
                           (["--accel", "regione", "--steps", "4"], "do not fit in 4 steps"),
                           (["--accel_cache_threshold", "0.1"], "need --accel"),
                           (["--accel", "plan", "--compile"], "cannot be compiled: drop --compile"),
                           (["--accel", "regione", "--attention", "flex"], "use attention dense"),
                           (["--accel", "plan", "--ulysses", "2"], "cannot run under context parallelism")]:
        assert infer.main(["--image", DESK, "--output_dir", str(tmp_path / "o")] + TINY + extra) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_accelerated_edit_records_its_settings(tmp_path):
    base, fast = tmp_path / "base", tmp_path / "fast"
    assert infer.main(["--image", DESK, "--output_dir", str(base)] + TINY) == 0
    assert infer.main(["--image", DESK, "--output_dir", str(fast), "--accel", "regione", "--accel_threshold", "1",
                       "--accel_cache_threshold", "0"] + TINY) == 0
    # every token edited and no velocity cache: the stock edit, pixel for pixel
    assert np.array_equal(np.asarray(Image.open(base / "result.png")), np.asarray(Image.open(fast / "result.png")))
    config = json.loads((fast / "config.json").read_text())
    assert config["edit_options"]["accel"]["mode"] == "regione"
    assert config["accel"]["pattern"] == "FPCCRCCF"
    assert "--accel regione" in config["replay"] and "--accel_threshold 1.0" in config["replay"]
    assert json.loads((base / "config.json").read_text())["accel"] is None
