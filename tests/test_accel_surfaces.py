"""accel on the other surfaces: the edit server (launch default and per-request field), the Gradio app's Advanced
settings, the Python API (RePlanPipeline)."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from replan.pipeline import RePlanPipeline
from replan.plan import RegionPlan

ROOT = Path(__file__).resolve().parents[1]
DESK = ROOT / "assets/examples/desk.png"
EVERYTHING = {"mode": "regione", "threshold": 1.0, "cache_threshold": 0}  # every token edited: the stock edit
PARTIAL = {"mode": "regione", "threshold": 0.0, "erosion_dilation": False, "cache_threshold": 0}


def image_of(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_server_accel_default_and_per_request():
    pytest.importorskip("fastapi")
    from replan.serve import ServeConfig
    from tests.test_serve import Server

    with pytest.raises(ValueError, match="threshold .* must be in \\[-1, 1\\]"):
        ServeConfig(backbone="tiny", planner="none", accel={"mode": "regione", "threshold": 3})
    with pytest.raises(ValueError, match="cannot be compiled"):
        ServeConfig(backbone="tiny", planner="none", accel="regione", compile=True)
    ServeConfig(backbone="tiny", planner="none", accel="cache-dit", compile=True)  # full passes only: fine
    config = ServeConfig(backbone="tiny", planner="none", device="cpu", accel=PARTIAL)
    with Server(config) as server:
        server.wait_for("ready")

        def post(**fields):
            with open(DESK, "rb") as f:
                return server.http.post("/v1/images/edits", files={"image": ("desk.png", f, "image/png")},
                                        data={"prompt": "make it snowy", "no_plan": "true", "steps": "8", **fields})

        default = post()
        assert default.status_code == 200, default.text
        record = default.json()["replan"]["accel"]
        assert record["mode"] == "regione" and 0 < record["edited_tokens"] < record["tokens"]
        stock = post(accel="none").json()
        assert stock["replan"]["accel"] is None
        everything = post(accel=json.dumps(EVERYTHING)).json()
        assert np.array_equal(image_of(everything["data"][0]["b64_json"]), image_of(stock["data"][0]["b64_json"]))
        bad = post(accel="turbo")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "accel"
        assert "accel must be one of" in bad.json()["error"]["message"]
        bad = post(accel='{"mode": "regione", "refresh": "2"}')
        assert bad.status_code == 400 and "refresh step 2 is not inside the region phase" in bad.text


def test_app_advanced_acceleration():
    pytest.importorskip("gradio")
    from replan.app.callbacks import default_matrix, plan_to_annotator
    from replan.app.ui import build_app

    demo = build_app(RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu"))
    run = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "run")
    image = Image.open(DESK).convert("RGB").resize((160, 128))
    value = plan_to_annotator(image, RegionPlan("warm", image_size=(160, 128)))
    quiet = {"progress": lambda *a, **k: None}
    stock, _, submitted, _ = run(value, "warm", default_matrix(0, False), 0.0, 0.15, 8, 2.5, 0, **quiet)
    assert submitted["accel"] is None
    same, _, submitted, status = run(value, "warm", default_matrix(0, False), 0.0, 0.15, 8, 2.5, 0, "regione", 1.0,
                                     0.0, **quiet)
    assert np.array_equal(np.asarray(same), np.asarray(stock))
    assert submitted["accel"]["pattern"] == "FPCCRCCF" and "accel regione: 8 full" in status
    result, _, _, status = run(value, "warm", default_matrix(0, False), 0.0, 0.15, 8, 2.5, 0, "regione", 5.0, None,
                               **quiet)
    assert "threshold" in status and "[-1, 1]" in status


def test_python_api_accel():
    pipe = RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu")
    image = Image.open(DESK).convert("RGB").resize((160, 128))
    plan = RegionPlan("make it snowy", image_size=image.size)
    out = pipe(image, plan=plan, steps=8, accel=PARTIAL)
    assert out.edit.extras["accel"]["pattern"] == "FPCCRCCF"
    assert out.edit.extras["accel"]["edited_passes"] == 4
