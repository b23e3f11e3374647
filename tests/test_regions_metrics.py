"""Emu Edit / MagicBrush metrics (replan.regions.metrics), loaders (benchmarks) and the evaluation CLI (evaluate),
on hand-made numbers and on tiny random CLIP / DINO checkpoints loaded with the real from_pretrained."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from replan.regions import benchmarks, evaluate, metrics
from replan.testing.vision import (
    edited_image,
    save_tiny_clip,
    save_tiny_dino,
    save_tiny_emu,
    save_tiny_magicbrush,
    synthetic_image,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {"clip": str(save_tiny_clip(root / "clip")), "dino": str(save_tiny_dino(root / "dino"))}


@pytest.fixture(scope="module")
def scorers(models):
    return metrics.ClipScorer(models["clip"], "cpu"), metrics.DinoScorer(models["dino"], "cpu")


# ---------------------------------------------------------------------------------------------------- pure maths
def test_cosine_and_direction_by_hand():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    assert float(metrics.cosine(a, b)) == pytest.approx(24 / 25)
    assert float(metrics.cosine(a, torch.zeros(2))) == 0.0
    # normalised first: î_in = (1, 0), î_out = (0, 1) → Δi = (−1, 1); t̂_in = (1, 0), t̂_out = (0.6, 0.8) → Δt = (−.4, .8)
    i_in, i_out = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 5.0])
    t_in, t_out = torch.tensor([7.0, 0.0]), torch.tensor([3.0, 4.0])
    expected = (0.4 + 0.8) / (math.sqrt(2) * math.sqrt(0.16 + 0.64))
    assert float(metrics.clip_direction(i_in, i_out, t_in, t_out)) == pytest.approx(expected)
    # the edit direction reversed (images or captions swapped) flips the sign
    assert float(metrics.clip_direction(i_out, i_in, t_in, t_out)) == pytest.approx(-expected)
    assert float(metrics.clip_direction(i_in, i_out, t_out, t_in)) == pytest.approx(-expected)
    # unnormalised differences would give another value: normalisation happens before the difference
    raw = float(metrics.cosine(i_out - i_in, t_out - t_in))
    assert raw != pytest.approx(expected)


def test_l1_l2_by_hand_and_resize():
    a = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))  # 2×1
    b = Image.fromarray(np.array([[[51, 51, 51], [255, 255, 0]]], dtype=np.uint8))
    # |d| per channel: 0.2 ×3, 0, 0, 1 → mean 1.6/6; d²: 0.04 ×3 + 1 → 1.12/6
    assert metrics.l1_distance(a, b) == pytest.approx(1.6 / 6)
    assert metrics.l2_distance(a, b) == pytest.approx(1.12 / 6)
    assert metrics.l1_distance(a, a) == 0.0 and metrics.l2_distance(a, a) == 0.0
    # the second image is brought to the first one's size (bicubic): a flat image stays flat
    big = Image.new("RGB", (8, 6), (255, 0, 0))
    small = Image.new("RGB", (4, 3), (255, 0, 0))
    assert metrics.l1_distance(big, small) == 0.0
    assert metrics.pixels(small, big.size).shape == (3, 6, 8)
    assert metrics.l1_distance(Image.new("RGB", (4, 3), (0, 0, 0)), Image.new("RGB", (9, 9), (255, 255, 255))) == 1.0


def test_dino_preprocess_matches_manual():
    img = synthetic_image(3, (64, 48))
    out = metrics.dino_preprocess(img, crop=32)  # shorter side → round(32·256/224) = 37, crop 32
    resized = np.asarray(img.resize((49, 37), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    left, top = round((49 - 32) / 2), round((37 - 32) / 2)
    manual = (resized[top : top + 32, left : left + 32] - metrics.IMAGENET_MEAN) / metrics.IMAGENET_STD
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.from_numpy(manual.astype(np.float32)).permute(2, 0, 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- models
def test_clip_embeddings_are_the_projected_features(scorers):
    clip, _ = scorers
    img = synthetic_image(1)
    pv = clip.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    assert pv.shape[-2:] == (32, 32)
    with torch.no_grad():
        pooled = clip.model.vision_model(pixel_values=pv).pooler_output
        expected = clip.model.visual_projection(pooled)
        tok = clip.tokenizer(["a red box"], return_tensors="pt")
        text = clip.model.text_projection(clip.model.text_model(**tok).pooler_output)
    assert torch.allclose(clip.images([img]), expected, atol=1e-5)
    assert torch.allclose(clip.texts(["a red box"]), text, atol=1e-5)
    assert clip.texts(["x " * 200]).shape == (1, 16)  # truncated to the 77 positions


def test_dino_uses_the_cls_token(scorers):
    _, dino = scorers
    img = synthetic_image(2)
    with torch.no_grad():
        hidden = dino.model(pixel_values=metrics.dino_preprocess(img, 32)[None]).last_hidden_state
    assert torch.allclose(dino.images([img]), hidden[:, 0], atol=1e-6)
    assert not hasattr(dino.model, "pooler") or dino.model.pooler is None


def test_emu_metrics_invariances(scorers):
    clip, dino = scorers
    src = synthetic_image(4)
    same = metrics.emu_metrics(src, src.copy(), "a box", "a red box", clip, dino)
    assert same["l1"] == 0.0 and same["clip_img"] == pytest.approx(1.0) and same["dino"] == pytest.approx(1.0)
    assert same["clip_dir"] == 0.0  # no image change: no direction
    out = edited_image(src, 4)
    fwd = metrics.emu_metrics(src, out, "a box", "a red box", clip, dino)
    back = metrics.emu_metrics(out, src, "a box", "a red box", clip, dino)
    assert fwd["clip_dir"] == pytest.approx(-back["clip_dir"], abs=1e-6)
    assert fwd["clip_dir"] != 0.0
    emb_i, emb_t = clip.images([src, out]), clip.texts(["a box", "a red box"])
    assert fwd["clip_out"] == pytest.approx(float(metrics.cosine(emb_i[1], emb_t[1])), abs=1e-6)
    assert fwd["clip_dir"] == pytest.approx(float(metrics.clip_direction(emb_i[0], emb_i[1], emb_t[0], emb_t[1])),
                                            abs=1e-6)
    assert fwd["clip_img"] == pytest.approx(float(metrics.cosine(emb_i[0], emb_i[1])), abs=1e-6)
    assert fwd["l1"] == pytest.approx(metrics.l1_distance(src, out))
    assert -1 <= fwd["dino"] < 1
    none = metrics.emu_metrics(src, out, "", "a red box", clip, dino)
    assert none["clip_dir"] is None and none["clip_out"] == pytest.approx(fwd["clip_out"])
    assert metrics.emu_metrics(src, out, "a", None, clip, dino)["clip_out"] is None


def test_magicbrush_metrics_resize_generated_to_gt(scorers):
    clip, dino = scorers
    gt = Image.new("RGB", (40, 40), (10, 200, 30))
    gen = Image.new("RGB", (20, 20), (10, 200, 30))
    m = metrics.magicbrush_metrics(gt, gen, clip, dino)
    assert m["l1"] == 0.0 and m["l2"] == 0.0
    assert m["clip_i"] == pytest.approx(1.0, abs=1e-5) and m["dino"] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- loaders
def test_loaders_both_magicbrush_layouts(tmp_path):
    official = benchmarks.load_magicbrush(str(save_tiny_magicbrush(tmp_path / "o")))
    hf = benchmarks.load_magicbrush(str(save_tiny_magicbrush(tmp_path / "h", layout="hf")), "test")
    for recs in (official, hf):
        assert [(r.id, r.session, r.turn, r.num_turns) for r in recs] == [
            ("300_1", "300", 1, 1), ("301_1", "301", 1, 2), ("301_2", "301", 2, 2),
            ("302_1", "302", 1, 3), ("302_2", "302", 2, 3), ("302_3", "302", 3, 3)]
    # turn t starts from the GT output of turn t−1
    assert metrics.l1_distance(official[4].source, official[3].target) == 0.0
    assert metrics.l1_distance(hf[5].target, official[5].target) == 0.0
    assert len(benchmarks.load_magicbrush(str(tmp_path / "o"), limit=2)) == 3
    emu = benchmarks.load_emu(str(save_tiny_emu(tmp_path / "e")), "validation")
    assert [r.id for r in emu] == ["100", "101", "102", "103"] and emu[0].task == "background"
    assert emu[-1].input_caption == "" and emu[0].output_caption.startswith("a picture")


# ---------------------------------------------------------------------------------------------------- end to end
def test_evaluate_emu_end_to_end(tmp_path, models):
    data = save_tiny_emu(tmp_path / "emu")
    records = benchmarks.load_emu(str(data))
    run = tmp_path / "run"
    for i, r in enumerate(records[:3]):  # 103 missing
        (run / r.id).mkdir(parents=True)
        (r.source if i == 0 else edited_image(r.source, i)).save(run / r.id / "result.png")
    out = tmp_path / "emu.json"
    rc = evaluate.main(["--benchmark", "emu", "--results_dir", str(run), "--dataset", str(data), "--clip",
                        models["clip"], "--dino", models["dino"], "--output_json", str(out), "--label", "mine"])
    assert rc == 0
    res = json.loads(out.read_text())
    s = res["scores"]["emu"]
    assert (s["count"], s["missing"], s["total"]) == (3, 1, 4) and res["missing"]["emu"] == ["103"]
    assert res["checkpoints"]["clip"].endswith("clip") and res["checkpoints"]["dino"].endswith("dino")
    first = res["samples"][0]
    assert first["l1"] == 0.0 and first["clip_img"] == pytest.approx(1.0) and first["dino"] == pytest.approx(1.0)
    assert s["l1"] == pytest.approx(np.mean([x["l1"] for x in res["samples"]]))
    assert s["n_clip_dir"] == 3 and s["n_clip_out"] == 3
    assert set(res["breakdowns"]["task"]) == {"background", "global", "style"}
    md = out.with_suffix(".md").read_text()
    assert "| Method | CLIPdir | CLIPout | L1 | CLIPimg | DINO | n | missing |" in md
    assert "| mine |" in md and "paper: Ours (5M) | 0.1088 |" in md


def test_evaluate_magicbrush_single_and_multi_turn(tmp_path, models):
    data = save_tiny_magicbrush(tmp_path / "mb")
    records = benchmarks.load_magicbrush(str(data))
    run = tmp_path / "run"
    for r in records:
        if r.id == "302_2":
            continue  # single-turn image missing
        (run / r.id).mkdir(parents=True)
        r.target.save(run / r.id / "result.png")  # perfect single-turn edits
    (run / "301").mkdir()
    records[0].source.save(run / "301" / "turn_1.png")
    (run / "302").mkdir()
    for t in (1, 2):
        records[3].source.save(run / "302" / f"turn_{t}.png")  # not scored: only the final turn counts
    records[5].target.save(run / "302" / "turn_3.png")  # the final GT: perfect; session 300 and 301 final missing
    res = evaluate.evaluate("magicbrush", run, str(data), clip=models["clip"], dino=models["dino"], device="cpu")
    single, multi = res["scores"]["single_turn"], res["scores"]["multi_turn"]
    assert (single["count"], single["missing"], single["total"]) == (5, 1, 6)
    assert res["missing"]["single_turn"] == ["302_2"]
    assert single["l1"] == 0.0 and single["l2"] == 0.0 and single["clip_i"] == pytest.approx(1.0)
    assert (multi["count"], multi["missing"], multi["total"]) == (1, 2, 3)
    assert res["missing"]["multi_turn"] == ["300/turn_1.png", "301/turn_2.png"]
    assert multi["l1"] == 0.0 and multi["dino"] == pytest.approx(1.0)
    # a wrong multi-turn result is scored against the final GT
    records[5].source.save(run / "302" / "turn_3.png")
    res2 = evaluate.evaluate("magicbrush", run, str(data), clip=models["clip"], dino=models["dino"],
                             device="cpu", settings=("multi_turn",))
    assert set(res2["scores"]) == {"multi_turn"}
    assert res2["scores"]["multi_turn"]["l1"] == pytest.approx(metrics.l1_distance(records[5].target,
                                                                                   records[5].source))
    assert res2["scores"]["multi_turn"]["l2"] > 0
    md = evaluate.markdown([res, res2], ["a", "b"])
    assert "| Settings | Method | L1 | L2 | CLIP-I | DINO | n | missing |" in md
    assert "| Single-turn | a | 0.0000 | 0.0000 |" in md and "| Multi-turn | b |" in md
    assert res["checkpoints"] == {"clip": metrics.checkpoint_name(models["clip"]),
                                  "dino": metrics.checkpoint_name(models["dino"])}


def test_cli_tiny_everything_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPLAN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "mb.json"
    argv = ["--benchmark", "magicbrush", "--results_dir", str(run), "--dataset", "tiny", "--clip", "tiny",
            "--dino", "tiny", "--output_json", str(out), "--setting", "multi"]
    # nothing to score: one line, exit 2, no output written, no model loaded
    assert evaluate.main(argv) == 2 and not out.exists() and not (tmp_path / "cache" / "tiny-clip").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: nothing to score") and "\n" not in err and "turn_" in err
    final = [r for r in benchmarks.load_magicbrush("tiny") if r.turn == r.num_turns]
    (run / final[0].session).mkdir()
    (run / final[0].session / f"turn_{final[0].turn}.png").write_bytes(b"not a png")   # unreadable: still nothing
    assert evaluate.main(argv) == 2 and "nothing could be scored" in capsys.readouterr().err
    final[0].target.save(run / final[0].session / f"turn_{final[0].turn}.png")
    assert evaluate.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["scores"]["multi_turn"]["count"] == 1 and res["scores"]["multi_turn"]["l1"] == 0.0
    assert "tiny-clip" in res["checkpoints"]["clip"] and "tiny-dino" in res["checkpoints"]["dino"]
    rc = evaluate.main(["--benchmark", "magicbrush", "--results_dir", str(run), "--output_json", str(out)])
    assert rc == 2 and "needs --dataset" in capsys.readouterr().err
    rc = evaluate.main(["--benchmark", "emu", "--results_dir", str(tmp_path / "nope"), "--output_json", str(out)])
    assert rc == 2
