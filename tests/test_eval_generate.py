"""python -m replan.eval.generate on the offline IV-Edit fixture with the tiny backbone and the tiny planner."""

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from replan.backbones.registry import resolve
from replan.eval.generate import (
    METHODS,
    GenerateConfig,
    PlannerConfig,
    clean_rephrase,
    load_config,
    main,
    sample_seed,
)
from replan.pipeline import RePlanPipeline
from replan.planner import load_template
from replan.testing.ivedit import tiny_ivedit_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs/eval"
TINY_YAML = str(CONFIGS / "tiny.yaml")
IDS = ["1000", "1001", "1002", "1003"]  # 5 rows, the last one filtered


def save_rows(rows, path: Path) -> str:
    import datasets

    (path / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "extra_info": datasets.Value("string"),
                                  "image_id": datasets.Value("int64"), "status": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path / "data" / "test-00000-of-00001.parquet"))
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return save_rows(tiny_ivedit_rows(5, filtered=1), tmp_path_factory.mktemp("ivedit"))


def gen(out, dataset, *extra, method="baseline"):
    return main(["--config", TINY_YAML, f"output_dir={out}", f"dataset={dataset}", "steps=2", "device=cpu",
                 "planner.max_new_tokens=16",
                 f"method={method}", *extra])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def mtimes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baseline_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "baseline"
    assert gen(out, dataset) == 0
    return out


# ---------------------------------------------------------------------------------------------------- configs
def test_every_eval_config_maps_one_to_one_onto_the_dataclass():
    rows = {p.stem for p in CONFIGS.glob("*.yaml")}
    backbones = ["flux_kontext", "qwenimageedit", "qwenimageedit2509", "qwenimageedit2511", "firerededit",
                 "flux_klein", "flux_klein_4b"]
    expected = {f"{m}_{b}" for m in ("replan", "baseline") for b in backbones} | {"rephrase_flux_kontext", "tiny"}
    assert rows == expected
    top = set(GenerateConfig.__dataclass_fields__)
    for path in CONFIGS.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        assert set(raw) == top, path.name
        assert set(raw["planner"]) == set(PlannerConfig.__dataclass_fields__), path.name
        cfg = load_config(path)
        assert cfg.to_dict() == raw
        assert cfg.method in METHODS and cfg.output_dir.endswith(path.stem)
        if path.stem != "tiny":
            assert cfg.backbone == path.stem.split("_", 1)[1] and cfg.seed == 42 and cfg.dataset == "TainU/IV-Edit"
            assert cfg.expand is None and cfg.switch is None and cfg.steps is None  # the backbone's eval values
            resolve(cfg.backbone)
    assert load_config(CONFIGS / "rephrase_flux_kontext.yaml").planner.ckpt == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert load_config(CONFIGS / "replan_qwenimageedit.yaml").planner.ckpt == "TainU/RePlan-Qwen2.5-VL-7B"


@pytest.mark.parametrize("args, message", [
    (["bogus=1"], "unknown key(s) bogus"),
    (["planner.nope=1"], "unknown planner key(s) nope"),
    (["method=magic"], "method must be one of"),
    (["backbone=sdxl"], "unknown backbone"),
    (["steps"], "key=value"),
    (["parse=exact"], "unknown parse mode 'exact'"),
    (["strict_plan=true"], "strict_plan is now parse: strict"),
    (["planner.lora_path=x"], "planner.lora_path is now planner.vlm_lora_path"),
    (["lora_path=/no/such/lora"], "editor LoRA /no/such/lora does not exist"),
    (["planner.template=/no/such/prompt.txt"], "planner template /no/such/prompt.txt does not exist"),
])
def test_bad_config_exits_2(tmp_path, capsys, args, message):
    assert main(["--config", TINY_YAML, f"output_dir={tmp_path / 'o'}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sample_seed_is_stable_and_hash_free():
    assert sample_seed(42, "1000") == 1042
    assert sample_seed(42, "abc") == sample_seed(42, "abc") == 42 + 891568578  # zlib.crc32(b"abc")
    assert sample_seed(0, "-5") != sample_seed(0, "5")


def test_clean_rephrase():
    assert clean_rephrase('  "Make the left cup blue."  ') == "Make the left cup blue."
    assert clean_rephrase("   ") == ""


# ---------------------------------------------------------------------------------------------------- methods
def test_replan_writes_every_file_per_sample(tmp_path, dataset, capsys):
    out = tmp_path / "replan"
    assert gen(out, dataset, method="replan") == 0
    assert "4 done, 0 skipped, 0 failed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == IDS + ["run_config.json"]
    for image_id, row in zip(IDS, tiny_ivedit_rows(5, filtered=1)):
        files = {p.name for p in (out / image_id).iterdir()}
        assert files == {"result.png", "plan.json", "planner_response.txt", "config.json"}
        assert Image.open(out / image_id / "result.png").size == row["image"].size
        config = json.loads((out / image_id / "config.json").read_text())
        assert config["seed"] == 42 + int(image_id) and config["instruction"] == row["prompt"]
        assert config["settings"]["switch"] == 0.0 and config["settings"]["expand"] == 0.15  # the eval entry point
        plan = json.loads((out / image_id / "plan.json").read_text())
        assert plan["raw_text"] == (out / image_id / "planner_response.txt").read_text()
        # which template made the plan, and how its boxes were read
        assert plan["planner"] == config["planner_provenance"] and plan["planner"]["box_frame"] == "processor"
        assert plan["planner"]["template"] == "replan:planner/prompt.txt"
        assert plan["planner"]["template_sha256"] == hashlib.sha256(load_template().encode()).hexdigest()
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["settings"]["method"] == "replan" and run_config["settings"]["steps"] == 2
    assert run_config["settings"]["planner"]["template"] == "replan:planner/prompt.txt"
    assert run_config["settings"]["planner"]["box_frame"] == "processor"
    # the paper rows read replies as the official code; the tiny planner's noise becomes a global edit, said so
    assert run_config["settings"]["parse"] == "official" and run_config["settings"]["lora_path"] is None
    assert all("official" in json.loads((out / i / "plan.json").read_text())["repairs"][-1] for i in IDS)


def test_baseline_is_the_stock_pipeline(baseline_run, dataset):
    assert not (baseline_run / "1001" / "planner_response.txt").exists()
    plan = json.loads((baseline_run / "1001" / "plan.json").read_text())
    row = tiny_ivedit_rows(5, filtered=1)[1]
    assert plan["regions"] == [] and plan["global_prompt"] == row["prompt"]
    editor = RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu").editor
    image = row["image"]
    w, h = editor.generation_size(image.size)
    stock = editor.pipe(image=editor.pipe.image_processor.resize(image, h, w), prompt=row["prompt"], height=h,
                        width=w, max_area=w * h, _auto_resize=False, num_inference_steps=2, guidance_scale=2.5,
                        generator=torch.Generator().manual_seed(sample_seed(42, "1001"))).images[0]
    assert np.array_equal(pixels(baseline_run / "1001" / "result.png"),
                          np.asarray(stock.resize(image.size, Image.BICUBIC)))


def test_rephrase_with_the_tiny_planner_and_fallback_on_planner_failure(tmp_path, dataset, baseline_run,
                                                                       monkeypatch):
    out = tmp_path / "rephrase"
    assert gen(out, dataset, "--limit", "2", method="rephrase") == 0
    config = json.loads((out / "1000" / "config.json").read_text())
    assert config["rephrase"]["fallback"] is False and config["rephrase"]["rephrased"]
    assert config["plan"]["global_prompt"] == config["rephrase"]["rephrased"]
    assert (out / "1000" / "planner_response.txt").is_file()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    failed = tmp_path / "fallback"
    assert gen(failed, dataset, "--limit", "2", "planner.kind=openai", f"planner.base_url=http://127.0.0.1:{port}/v1",
               "planner.max_retries=0", method="rephrase") == 0
    config = json.loads((failed / "1001" / "config.json").read_text())
    assert config["rephrase"]["fallback"] is True and "PlannerError" in config["rephrase"]["reason"]
    assert config["plan"]["global_prompt"] == config["instruction"]
    # the original instruction with the same seed: exactly the baseline's image
    assert np.array_equal(pixels(failed / "1001" / "result.png"), pixels(baseline_run / "1001" / "result.png"))


# ---------------------------------------------------------------------------------------------------- runs
def test_sharding_covers_every_sample_once_with_the_same_images(tmp_path, dataset, baseline_run, monkeypatch):
    shard0, shard1 = tmp_path / "s0", tmp_path / "s1"
    assert gen(shard0, dataset, "--rank", "0", "--world", "2") == 0
    monkeypatch.setenv("RANK", "1")  # as under torchrun / accelerate launch
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert gen(shard1, dataset) == 0
    done0 = {p.parent.name for p in shard0.glob("*/result.png")}
    done1 = {p.parent.name for p in shard1.glob("*/result.png")}
    assert done0 == {"1000", "1002"} and done1 == {"1001", "1003"}
    for image_id in IDS:
        shard = shard0 if image_id in done0 else shard1
        assert np.array_equal(pixels(shard / image_id / "result.png"), pixels(baseline_run / image_id / "result.png"))


def test_resume_skips_finished_samples_and_rerun_is_deterministic(tmp_path, dataset, baseline_run, capsys):
    out = tmp_path / "resume"
    assert gen(out, dataset) == 0
    for image_id in IDS:  # a second run of the same config: the same pixels
        assert np.array_equal(pixels(out / image_id / "result.png"), pixels(baseline_run / image_id / "result.png"))
    before = mtimes(out)
    capsys.readouterr()
    assert gen(out, dataset) == 0
    assert "0 done, 4 skipped" in capsys.readouterr().err
    assert mtimes(out) == before
    # a killed run: a sample with everything but result.png, and a leftover temporary folder
    (out / "1002" / "result.png").unlink()
    (out / ".1001.abc123").mkdir()
    (out / ".1001.abc123" / "result.png").write_bytes(b"half")
    assert gen(out, dataset, "--limit", "3") == 0  # limit/rank/world are not settings: no refusal
    assert "1 done, 2 skipped" in capsys.readouterr().err
    assert np.array_equal(pixels(out / "1002" / "result.png"), pixels(baseline_run / "1002" / "result.png"))
    after = mtimes(out)
    assert not (out / ".1001.abc123").exists()
    assert {k: v for k, v in after.items() if not k.startswith("1002")} == \
           {k: v for k, v in before.items() if not k.startswith("1002")}


def test_other_settings_on_the_same_dir_refuse_without_force(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    assert gen(out, dataset, "--limit", "2") == 0
    before = mtimes(out)
    assert gen(out, dataset, "--limit", "2", "seed=7") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 42 → 7" in err and "--force" in err
    assert mtimes(out) == before
    assert gen(out, dataset, "--limit", "2", "seed=7", "--force") == 0
    assert json.loads((out / "run_config.json").read_text())["settings"]["seed"] == 7
    assert json.loads((out / "1000" / "config.json").read_text())["seed"] == 7 + 1000
    assert gen(out, dataset, "--limit", "2", "seed=7") == 0  # the dir now belongs to the new settings


def test_a_bad_sample_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    rows = tiny_ivedit_rows(3, filtered=0)
    rows[1]["image"] = Image.new("RGB", (48, 32), (200, 10, 10))  # below the editors' 64 px minimum
    dataset = save_rows(rows, tmp_path / "ds")
    out = tmp_path / "run"
    assert gen(out, dataset, method="replan") == 1
    err = capsys.readouterr().err
    assert "2 done, 0 skipped, 1 failed" in err and "1001" in err
    bad = out / "1001"
    assert not (bad / "result.png").exists()
    error = (bad / "error.txt").read_text()
    assert error.startswith("edit failed: ValueError") and "at least 64 px" in error
    assert (bad / "plan.json").is_file() and (bad / "planner_response.txt").is_file()  # what it got to
    assert json.loads((bad / "config.json").read_text())["error"]["stage"] == "edit"
    assert all((out / i / "result.png").is_file() and not (out / i / "error.txt").exists() for i in ("1000", "1002"))
    assert gen(out, dataset, method="replan") == 1  # failed samples are retried, finished ones skipped
    assert "0 done, 2 skipped, 1 failed" in capsys.readouterr().err
