"""python -m replan.eval.calibrate: velocities logged from the stock pipeline, gamma fitted, resumable, usable."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from replan.accel import fit_gamma, load_gamma
from replan.backbones import load_editor
from replan.eval.calibrate import TrajectoryRecorder, main
from replan.plan import RegionPlan


def test_recorded_velocity_is_the_transformers_output(tiny_kontext_dir):
    editor = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs={"max_area": 128 * 128})
    editor.pipe.set_progress_bar_config(disable=True)
    outputs = []
    handle = editor.pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().clone()))
    recorder = TrajectoryRecorder(editor.pipe.transformer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    try:
        result = editor.edit(image, RegionPlan("make it blue"), steps=4, seed=0, callback=recorder,
                             max_sequence_length=16)
    finally:
        recorder.close()
        handle.remove()
    w, h = result.generation_size
    n = (w // 16) * (h // 16)
    sigmas = editor.pipe.scheduler.sigmas.tolist()
    x = [recorder.first[:, :n]] + recorder.latents
    for i in range(4):  # no CFG on Kontext: the step's velocity is the transformer's output on the noisy rows
        v = (x[i + 1] - x[i]) / (sigmas[i + 1] - sigmas[i])
        assert torch.allclose(v, outputs[i][:, :n], atol=2e-4, rtol=1e-4)


def test_calibration_run_is_resumable_and_its_table_drives_the_cache(tmp_path, capsys):
    out = tmp_path / "cal"
    args = ["--backbone", "tiny", "--steps", "8", "--dataset", "tiny", "--limit", "1", "--device", "cpu",
            "--output_dir", str(out), "--threshold", "0.3"]
    assert main(args) == 0
    table = json.loads((out / "gamma.json").read_text())
    assert len(table["gamma"]) == 7 and len(table["sigmas"]) == 9 and table["steps"] == 8
    assert all(np.isfinite(table["gamma"])) and all(g > 0 for g in table["gamma"])
    samples = sorted((out / "samples").glob("*.json"))
    assert len(samples) == 1 and table["samples"] == sorted(p.stem for p in samples)
    records = [json.loads(p.read_text()) for p in samples]
    assert fit_gamma([r["ratios"] for r in records], table["sigmas"]) == pytest.approx(table["gamma"])
    stamps = [p.stat().st_mtime_ns for p in samples]
    assert main(args) == 0  # a rerun reuses the finished samples
    assert [p.stat().st_mtime_ns for p in samples] == stamps
    assert load_gamma(str(out / "gamma.json")).values == pytest.approx(table["gamma"])

    editor = load_editor("tiny", device="cpu")
    editor.pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    result = editor.edit(image, RegionPlan("make it blue"), steps=8, accel={
        "mode": "regione", "gamma": str(out / "gamma.json"), "cache_threshold": 0.9, "threshold": 0.0,
        "erosion_dilation": False})
    assert result.extras["accel"]["pattern"].startswith("FP")
    capsys.readouterr()
    assert main(args[:-2] + ["--steps", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_too_few_steps_is_named_as_such_before_anything_loads(tmp_path, capsys):
    args = ["--backbone", "tiny", "--steps", "2", "--dataset", "tiny", "--device", "cpu",
            "--output_dir", str(tmp_path / "cal")]
    assert main(args) == 2
    assert "calibration needs at least 3 steps (--steps), got 2" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()


def test_a_device_that_is_not_there_is_refused_before_anything_loads(tmp_path, capsys):
    args = ["--backbone", "tiny", "--steps", "8", "--dataset", "tiny", "--device", "tpu:7",
            "--output_dir", str(tmp_path / "cal")]
    assert main(args) == 2
    assert "--device 'tpu:7'" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()
