"""Learnable regions training: loss goes down, mask head moves, resume is exact, bad samples are counted, a run
folder never mixes two runs, a config without data fails before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replan.regions.model import RegionGenerator
from replan.regions.train import build_config, load_config, main, train
from replan.testing.regions import save_tiny_regions_backbones, tiny_image_text_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions_train")
    save_tiny_regions_backbones(root / "bb")
    tiny_image_text_dataset(8).save_to_disk(str(root / "good"))
    tiny_image_text_dataset(6, bad_empty_caption=2, bad_image=3).save_to_disk(str(root / "bad"))
    return root


def overrides(root, out, **extra):
    items = {"model.clip": str(root / "bb" / "clip"), "model.t5": str(root / "bb" / "t5"), "model.image_size": 32,
             "model.heads": 2, "model.mlp_hidden": 16, "model.g_hidden": 32, "data.path": str(root / "good"),
             "data.num_workers": 0, "descriptions.llm": "offline", "descriptions.cache": None,
             "generator.kind": "offline", "output_dir": str(out), "batch_size": 4, "mixed_precision": "no",
             "frozen_dtype": "float32", "device": "cpu", "epochs": 20, "max_steps": 6, "save_every": 3,
             "lr": 1e-2, "warmup_steps": 0, "progress": False, "log_every": 1, **extra}
    return [f"{k}={'null' if v is None else v}" for k, v in items.items()]


def cfg_for(root, out, **extra):
    return load_config("configs/regions/base.yaml", overrides(root, out, **extra))


def test_training_reduces_loss_and_moves_mask_head(setup, tmp_path):
    torch.manual_seed(0)
    cfg = cfg_for(setup, tmp_path / "run", max_steps=8)
    torch.manual_seed(cfg.seed)  # same seed → the same initial head as train()
    before = RegionGenerator.from_pretrained(config=cfg.model)
    result = train(cfg)
    losses = result["losses"]
    assert result["steps"] == 8 and len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    after = RegionGenerator.load(tmp_path / "run" / "final")
    # L_sa never reaches the mask MLP: its change proves the §6.4 gradient path (straight-through) works
    for name in ("mlp.1.weight", "mlp.3.weight", "cross.0.attn.in_proj_weight", "g.mlp.1.weight"):
        assert not torch.allclose(before.head.state_dict()[name], after.head.state_dict()[name]), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {"sa", "sa_e", "sa_o", "clip", "dir", "struct", "mask_frac", "loss_total", "lr"} <= set(rows[0])


@pytest.mark.parametrize("mask_grad, batch", [("ste", 4), ("reinforce", 1)])
def test_resume_gives_identical_next_step_losses(setup, tmp_path, mask_grad, batch):
    """Batch 1 with reinforce runs on the running baseline and the sampler's RNG, whose states the checkpoint must
    carry (the leave-one-out baseline of larger batches has no state)."""
    extra = {"loss.mask_grad": mask_grad, "batch_size": batch}
    full = train(cfg_for(setup, tmp_path / "full", **extra))
    assert (tmp_path / "full" / "checkpoints" / "step-3" / "trainer.pt").is_file()
    # an interrupted run: stop after step 3, then continue from its newest checkpoint
    first = train(cfg_for(setup, tmp_path / "cut", max_steps=3, **extra))
    assert first["losses"] == full["losses"][:3]
    resumed = train(cfg_for(setup, tmp_path / "cut", **extra))  # resume: auto is the default
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == full["losses"][3:]
    assert [h["objective"] for h in resumed["history"]] == [h["objective"] for h in full["history"][3:]]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))


def test_a_run_folder_is_never_shared_by_two_runs(setup, tmp_path, capsys):
    out = tmp_path / "a"
    train(cfg_for(setup, out, max_steps=1, save_every=1))
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["settings"]["model"]["theta"] == 0.5 and "max_steps" not in recorded["settings"]
    with pytest.raises(ValueError, match=r"other settings \(model.theta: 0.5 → 0.3\)"):
        train(cfg_for(setup, out, **{"model.theta": 0.3}))
    with pytest.raises(ValueError, match="holds checkpoints of a run.*resume=auto continues it"):
        train(cfg_for(setup, out, resume=None))
    # the same settings continue (max_steps may grow: it says when to stop, not what the run is)
    assert train(cfg_for(setup, out, max_steps=2, save_every=1))["steps"] == 2
    # the CLI: one line, exit 2, before any model is loaded
    capsys.readouterr()
    assert main(["--config", "configs/regions/base.yaml", *overrides(setup, out, **{"model.theta": 0.3})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "model.theta" in err
    assert not list((out / "checkpoints").glob(".step-*"))  # no partial checkpoint left
    with pytest.raises(ValueError, match="no trainer.pt"):
        train(cfg_for(setup, tmp_path / "b", resume=str(tmp_path)))


def test_bad_samples_are_skipped_and_counted(setup, tmp_path):
    # 6 good + 2 empty captions + 3 undecodable images; batch 11 covers them all in one step
    res = train(cfg_for(setup, tmp_path / "bad", batch_size=11, max_steps=2, **{"data.path": str(setup / "bad")}))
    assert res["steps"] == 2
    assert res["skipped"] == {"empty_caption": 4, "bad_image": 6, "bad_shard": 0, "bad_description": 0,
                              "empty_batch": 0}
    # a batch with nothing usable is skipped, not a crash
    only_bad = tiny_image_text_dataset(0, bad_image=2)
    only_bad.save_to_disk(str(tmp_path / "only_bad"))
    res = train(cfg_for(setup, tmp_path / "none", batch_size=1, max_steps=None, epochs=1,
                        **{"data.path": str(tmp_path / "only_bad")}))
    assert res["steps"] == 0
    assert res["skipped"] == {"empty_caption": 0, "bad_image": 2, "bad_shard": 0, "bad_description": 0,
                              "empty_batch": 2}


def test_unusable_llm_replies_are_skipped_and_counted(setup, tmp_path):
    from replan.regions.descriptions import Describer, DescriptionConfig

    def llm(prompt):  # answers for red/blue captions only; garbage (no JSON) otherwise
        if "red" in prompt or "blue" in prompt:
            return '{"instruction": "make it purple", "edited_caption": "a purple shape"}'
        return "I cannot help with that."

    res = train(cfg_for(setup, tmp_path / "llm", batch_size=8, max_steps=2), describer=Describer(DescriptionConfig(),
                                                                                                  llm=llm))
    assert res["steps"] == 2 and res["skipped"]["bad_description"] == 8  # 4 of 8 per step, 2 steps


def test_config_errors_and_cli(setup, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown loss key"):
        build_config({"loss": {"gamma": 1}})
    with pytest.raises(ValueError, match="mask_grad"):
        build_config({"loss": {"mask_grad": "gumbel"}})
    assert build_config({"mixed_precision": False, "data": {"path": "tiny"}}).mixed_precision == "no"
    assert main(["--config", "configs/regions/base.yaml", *overrides(setup, tmp_path / "cli", max_steps=2)]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["--config", "configs/regions/base.yaml", "nonsense=1"]) == 2


def test_no_data_fails_in_one_line_before_any_model_loads():
    """The base config has data.path: null; the check runs on the config alone (no CLIP/T5, no accelerate)."""
    code = ("import sys; from replan.regions.train import main; rc = main(['--config', 'configs/regions/base.yaml']); "
            "print(rc, 'transformers' in sys.modules, 'accelerate' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "data.path" in err and "tiny" in err


def test_tiny_config_runs_as_written(tmp_path, capsys):
    """configs/regions/tiny.yaml needs nothing but the checkout (only the output folder is moved off the repo)."""
    assert main(["--config", "configs/regions/tiny.yaml", f"output_dir={tmp_path / 'tiny'}", "progress=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] >= 1 and (tmp_path / "tiny" / "final" / "region_head.safetensors").is_file()
    assert json.loads((tmp_path / "tiny" / "run_config.json").read_text())["settings"]["data"]["path"] == "tiny"


def test_webdataset_shards(setup, tmp_path):
    import io
    import tarfile

    from replan.testing.regions import shape_image

    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for i, (colour, caption) in enumerate([("red", "a red square"), ("blue", "a blue square"), ("green", ""),
                                                ("yellow", "a yellow square")]):
            buf = io.BytesIO()
            shape_image(colour, "square").save(buf, format="JPEG")
            payload = buf.getvalue() if i != 3 else b"broken"
            for name, data in ((f"{i:05d}.jpg", payload), (f"{i:05d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    res = train(cfg_for(setup, tmp_path / "wds", max_steps=2, **{"data.path": None,
                                                                  "data.webdataset": str(shard.parent / "*.tar")}))
    assert res["steps"] == 2  # one epoch = one batch of the 2 usable pairs
    assert res["skipped"] == {"empty_caption": 2, "bad_image": 2, "bad_shard": 0, "bad_description": 0,
                              "empty_batch": 0}
