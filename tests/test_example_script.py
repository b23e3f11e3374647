"""The offline example path: a saved plan executed by the tiny Kontext editor through scripts/example_edit.py."""

import importlib.util
from pathlib import Path

from PIL import Image

from replan.plan import RegionPlan

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("example_edit", ROOT / "scripts" / "example_edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_offline(tmp_path):
    script = load_script()
    out = tmp_path / "out"
    rc = script.main(["--tiny", "--image", str(ROOT / "assets/examples/desk.png"),
                      "--plan", str(ROOT / "assets/examples/desk.plan.json"), "--output_dir", str(out), "--steps", "2"])
    assert rc == 0
    assert Image.open(out / "result.png").size == (640, 480)
    assert Image.open(out / "overlay.png").size == (640, 480)
    assert RegionPlan.load(out / "plan.json") == RegionPlan.load(ROOT / "assets/examples/desk.plan.json")


def test_example_reports_bad_input(tmp_path, capsys):
    script = load_script()
    plan = str(ROOT / "assets/examples/desk.plan.json")
    rc = script.main(["--tiny", "--image", str(tmp_path / "nope.png"), "--plan", plan])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
