"""Fidelity metrics (whole image, background outside the plan's boxes, LPIPS guard) and the Markdown/PNG report."""

import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from replan.eval import fidelity, report
from replan.eval.dataset import load_samples
from replan.plan import Region, RegionPlan
from replan.testing.ivedit import save_tiny_ivedit

BOX = (40.5, 30.2, 90.0, 70.0)  # fractional: pixels 40..89 x 30..69 are inside


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dataset, a run that copies the inputs ("same") and one that changes only the pixels inside BOX ("boxed")."""
    root = tmp_path_factory.mktemp("fidelity")
    dataset = str(save_tiny_ivedit(root / "ds", n=4, filtered=0))
    same, boxed = root / "same", root / "boxed"
    for sample in load_samples(dataset, "test"):
        arr = np.asarray(sample.image).copy()
        for run, image in ((same, sample.image), (boxed, None)):
            (run / sample.image_id).mkdir(parents=True)
            plan = RegionPlan("keep remaining part of image unchanged.", (Region(BOX, "a star"),),
                              image_size=sample.image.size)
            plan.save(run / sample.image_id / "plan.json")
            if image is None:
                arr[30:70, 41:90] = 255 - arr[30:70, 41:90]  # inside BOX only
                image = Image.fromarray(arr)
            image.save(run / sample.image_id / "result.png")
    (same / ".1000.tmp").mkdir()  # leftovers of a killed run and unfinished samples are ignored
    (same / "9999").mkdir()
    return {"dataset": dataset, "same": same, "boxed": boxed}


def test_box_mask_rounds_outwards_and_clips():
    mask = fidelity.box_mask((100, 80), [BOX, (95.5, 75, 120, 90)])
    assert mask[30:70, 40:90].all() and mask.sum() == 40 * 50 + 5 * 5
    assert not mask[29].any() and not mask[:, 39].any() and not mask[:, 90:95].any()


def test_identical_runs_give_infinite_psnr_and_ssim_one(runs):
    out = fidelity.measure(runs["same"], reference=runs["same"], dataset=runs["dataset"], lpips="off")
    assert out["count"] == 4 and [s["image_id"] for s in out["samples"]] == ["1000", "1001", "1002", "1003"]
    ref = out["aggregate"]["reference"]
    assert math.isinf(ref["psnr"]) and ref["psnr_finite"] is None and ref["identical"] == 4
    assert ref["ssim"] == pytest.approx(1.0, abs=1e-6)
    for group in ("original", "background"):  # the "same" run is the input itself
        assert math.isinf(out["aggregate"][group]["psnr"]) and out["aggregate"][group]["ssim"] == pytest.approx(1.0)


def test_a_run_that_differs_only_inside_the_boxes(runs):
    out = fidelity.measure(runs["boxed"], reference=runs["same"], dataset=runs["dataset"], lpips="off")
    agg = out["aggregate"]
    assert math.isinf(agg["background"]["psnr"]) and agg["background"]["identical"] == 4
    assert math.isfinite(agg["original"]["psnr"]) and agg["original"]["identical"] == 0
    assert agg["reference"]["psnr"] == pytest.approx(agg["original"]["psnr"])  # "same" is the input
    assert agg["background"]["ssim"] > agg["original"]["ssim"]  # the SSIM window near the box still sees it
    s = out["samples"][0]
    w, h = 160, 120
    assert s["background"]["fraction"] == pytest.approx(1 - 40 * 50 / (w * h)) and s["background"]["boxes"] == 1
    # the whole-image PSNR by hand
    a = fidelity.to_tensor(Image.open(runs["boxed"] / "1000" / "result.png"))
    b = fidelity.to_tensor(Image.open(runs["same"] / "1000" / "result.png"))
    mse = float(((a - b) ** 2).mean())
    assert s["original"]["psnr"] == pytest.approx(10 * math.log10(255**2 / mse))
    # with no boxes the whole image is background: finite
    assert math.isfinite(fidelity.psnr(a, b, ~fidelity.box_mask((w, h), [])))
    assert fidelity.psnr(a, b, fidelity.box_mask((w, h), [(0, 0, w, h)]) & False) is None


def test_cli_writes_json_and_reads_the_dataset_from_run_config(runs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for image_id in ("1000", "1001"):
        (run / image_id).symlink_to(runs["boxed"] / image_id)
    (run / "run_config.json").write_text(json.dumps({"settings": {"dataset": runs["dataset"], "split": "test"}}))
    out = tmp_path / "f.json"
    assert fidelity.main(["--run", str(run), "--reference", str(runs["same"]), "--output_json", str(out)]) == 0
    data = json.loads(out.read_text())  # Infinity round-trips through Python's json
    assert data["metric"] == "fidelity" and data["dataset"] == runs["dataset"] and data["count"] == 2
    assert math.isinf(data["aggregate"]["background"]["psnr"])
    assert data["missing"] == {"not_in_run": ["1002", "1003"]}
    assert data["lpips"]["status"] in ("computed", "skipped")
    err = capsys.readouterr().err
    assert "background: n=2" in err and "wrote" in err
    assert fidelity.main(["--run", str(runs["same"]), "--output_json", str(tmp_path / "x.json")]) == 2
    assert "nothing to compare with" in capsys.readouterr().err
    # a run_config dataset that cannot be loaded only drops the input/background metrics when a reference is given
    (run / "run_config.json").write_text(json.dumps({"settings": {"dataset": str(tmp_path / "gone")}}))
    assert fidelity.main(["--run", str(run), "--reference", str(runs["same"]), "--output_json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "cannot be loaded" in data["inputs_skipped"] and set(data["aggregate"]) == {"reference"}
    assert fidelity.main(["--run", str(run), "--dataset", str(tmp_path / "gone"), "--output_json", str(out)]) == 2
    assert "cannot load the inputs" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_lpips_is_skipped_with_a_reason_and_never_downloads(runs, tmp_path, capsys):
    out = fidelity.measure(runs["boxed"], reference=runs["same"], lpips="auto")
    assert out["lpips"] == {"status": "skipped", "net": "alex", "reason": "torchvision is not installed "
                                                                          "(pip install torchvision)"}
    assert all(s["reference"]["lpips"] is None for s in out["samples"]) and "lpips" not in out["aggregate"]["reference"]
    rc = fidelity.main(["--run", str(runs["boxed"]), "--reference", str(runs["same"]), "--lpips", "on",
                        "--output_json", str(tmp_path / "l.json")])
    assert rc == 2 and "LPIPS requested (--lpips on) but unavailable: torchvision" in capsys.readouterr().err


def test_lpips_guard_without_cached_weights(monkeypatch, tmp_path):
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" in fidelity.unavailable_reason("alex")
    else:
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
        assert "not cached" in fidelity.unavailable_reason("alex")
    assert "unknown LPIPS net" in fidelity.unavailable_reason("resnet")


# ---------------------------------------------------------------------------------------------------- report
def evaluation(results_dir, scores, breakdown, failed=0):
    keys = ("quality", "target", "effect", "consistency", "overall", "weighted")
    return {
        "judge_model": "gemini-2.5-pro", "dataset": "TainU/IV-Edit", "split": "test", "results_dir": results_dir,
        "samples": [{"image_id": "1"}, {"image_id": "2"}], "aggregate": dict(zip(keys, scores)),
        "judged_only": dict(zip(keys, [s + 0.5 for s in scores])), "failed": failed,
        "breakdowns": {"referring_type": {v: {"count": c, **dict(zip(keys, sc))} for v, c, sc in breakdown}},
    }


def test_report_tables_and_charts(runs, tmp_path, capsys):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    rubrics = {d: {"name": f"official:{d}.txt@bc51afc", "sha256": f"{i}" * 64}
               for i, d in enumerate(("quality", "target_following", "effect", "consistency"))}
    a.write_text(json.dumps({**evaluation("outputs/eval/replan_flux_kontext/", [3.456, 4.0, 3.0, 3.5, 3.489, 2.7],
                                          [("Spatial", 3, [3, 4, 3, 3, 3.25, 2.5]),
                                           ("Text", 1, [4, 5, 4, 4, 4.25, 3.5])]),
                             "score_parse": "official", "off_scale": {"used": 7, "failed": 0}, "templates": rubrics}))
    b.write_text(json.dumps(evaluation("outputs/eval/baseline_flux_kontext", [3.0, 4.2, 2.5, 2.0, 2.931, 2.1],
                                       [("Spatial", 3, [2, 4, 2, 2, 2.5, 1.5])], failed=1)))
    fid = tmp_path / "fid.json"
    fid.write_text(json.dumps(fidelity.measure(runs["boxed"], reference=runs["same"], dataset=runs["dataset"],
                                               lpips="off")))
    out = tmp_path / "report"
    assert report.main([str(a), str(b), str(fid), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| Method | Quality | Target | Effect | Consistency | Overall | Weighted |" in md
    assert "| replan_flux_kontext | **3.46** | 4.00 | **3.00** | **3.50** | **3.49** | **2.70** |" in md
    assert "| baseline_flux_kontext | 3.00 | **4.20** | 2.50 | 2.00 | 2.93 | 2.10 |" in md
    assert "| replan_flux_kontext | **3.96** | 4.50 |" in md  # judged_only
    run = r"\| gemini-2.5-pro \| TainU/IV-Edit:test \| 2 \| "
    assert re.search(r"\| baseline_flux_kontext " + run + r"1 \| – \| – \| – \|", md)
    assert re.search(r"\| replan_flux_kontext " + run + r"0 \| – \| official \| 7 \|", md)
    assert ("| replan_flux_kontext | official:quality.txt@bc51afc (000000000000) | "
            "official:target_following.txt@bc51afc (111111111111) |") in md
    assert "| baseline_flux_kontext | – | – | – | – |" in md  # an older run without rubric records
    assert "## Breakdown by referring_type" in md
    assert "| Spatial | 3 | **3.25** | 2.50 |" in md and "| Text | 1 | 4.25 | – |" in md  # Overall
    assert "| Spatial | 3 | **2.50** | 1.50 |" in md  # Weighted
    row = next(line for line in md.splitlines() if line.startswith("| boxed |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "same" and cells[4] == "–" and cells[7] == "inf"  # no LPIPS; background untouched
    assert float(cells[2]) == pytest.approx(json.loads(fid.read_text())["aggregate"]["reference"]["psnr"], abs=0.01)
    for name in ("scores.png", "breakdown_referring_type.png", "fidelity.png"):
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_report_labels_and_bad_input(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(evaluation("x", [1, 2, 3, 4, 2.5, 2.0], [])))
    out = tmp_path / "r"
    assert report.main([str(a), "--labels", "RePlan (Kontext)", "--out", str(out), "--no_plots"]) == 0
    md = (out / "report.md").read_text()
    assert "| RePlan (Kontext) | 1.00 | 2.00 | 3.00 | 4.00 | 2.50 | 2.00 |" in md  # one run: nothing in bold
    assert not list(out.glob("*.png"))
    capsys.readouterr()
    assert report.main([str(a), "--labels", "a,b", "--out", str(out)]) == 2
    assert "--labels has 2 entries for 1 input files" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert report.main([str(bad), "--out", str(out)]) == 2
    assert "neither a replan.eval.evaluate nor a replan.eval.fidelity output" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_ssim_7x7_is_skimages_default_computed_window_by_window():
    """RegionE's SSIM (skimage defaults): every 7×7 window inside the image, sample statistics (ddof 1), per
    channel, averaged — written out with loops here, against the pooled implementation; identical images give 1."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 12, 10)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 40, x.shape), 0, 255).round()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for c in range(3):
        values = []
        for i in range(12 - 6):
            for j in range(10 - 6):
                wx, wy = x[c, i:i + 7, j:j + 7].ravel(), y[c, i:i + 7, j:j + 7].ravel()
                mx, my = wx.mean(), wy.mean()
                vx, vy = wx.var(ddof=1), wy.var(ddof=1)
                cxy = ((wx - mx) * (wy - my)).sum() / 48
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    a, b = torch.from_numpy(x)[None].float(), torch.from_numpy(y)[None].float()
    assert fidelity.ssim_7x7(a, b) == pytest.approx(float(np.mean(per_channel)), rel=1e-9)
    assert fidelity.ssim_7x7(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 7x7"):
        fidelity.ssim_7x7(a[..., :6, :], b[..., :6, :])
