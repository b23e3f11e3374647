"""python -m replan.infer fails in the first second on bad input — before any model loads — with one line and exit 2;
outputs go through replan.io (symlinked output folders work, an unwritable one never loses the result)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import replan.infer as infer
import replan.pipeline as pipeline
from replan.infer import main
from replan.pipeline import RePlanPipeline

ROOT = Path(__file__).resolve().parents[1]
DESK = str(ROOT / "assets/examples/desk.png")
DESK_PLAN = str(ROOT / "assets/examples/desk.plan.json")
TINY = ["--backbone", "tiny", "--vlm_ckpt_path", "tiny", "--steps", "2", "--device", "cpu"]


class ModelLoaded(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise ModelLoaded("a model was loaded although the input is bad")


@pytest.fixture
def no_models(monkeypatch):
    """Every way to load a model raises: a bad input must be reported before any of them is reached."""
    monkeypatch.setattr(infer, "load_pipeline", _refuse)
    monkeypatch.setattr(pipeline, "load_editor", _refuse)
    monkeypatch.setattr(pipeline, "load_planner", _refuse)
    monkeypatch.setattr(RePlanPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: _refuse()))
    for var in ("REPLAN_PLANNER_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "notes.png").write_text("this is text, not a PNG")
    Image.new("RGB", (1, 1)).save(d / "dot.png")
    Image.new("1", (8000, 8000)).save(d / "huge.png")  # 64 MP, a few KB on disk
    Image.new("RGB", (1000, 100)).save(d / "strip.png")
    (d / "broken.json").write_text('{"global_prompt": "x", "regions": [')
    plan = json.loads(Path(DESK_PLAN).read_text())
    plan["regions"][0]["bbox"] = [700, 10, 800, 90]  # entirely outside (partly outside is valid: clamped)
    (d / "outside.json").write_text(json.dumps(plan))
    plan = json.loads(Path(DESK_PLAN).read_text())
    plan["image_size"] = [1280, 960]
    (d / "other_size.json").write_text(json.dumps(plan))
    (d / "a_file").write_text("x")
    return d


def _cases(f):
    one = ["--image", DESK, "--instruction", "x"]
    return [
        (["--image", "missing.png", "--instruction", "x"], "image file missing.png does not exist"),
        (["--image", str(f / "notes.png"), "--instruction", "x"], "cannot read image"),
        (["--image", str(f), "--instruction", "x"], "is a directory, not an image file"),
        (["--image", str(f / "dot.png"), "--instruction", "x"], "both sides must be at least 64 px"),
        (["--image", str(f / "huge.png"), "--instruction", "x"], "the limit is 16.8 MP (4096x4096): downscale"),
        (["--image", str(f / "strip.png"), "--plan", DESK_PLAN, "--backbone", "tiny_klein"], "at most 8:1"),
        (["--image", DESK, "--instruction", "   "], "the instruction is empty"),
        (["--image", DESK], "the instruction is empty"),
        (["--image", DESK, "--no_plan"], "--no_plan needs --instruction"),
        (["--image", DESK, "--plan", str(f / "broken.json")], "is not valid JSON"),
        (["--image", DESK, "--plan", str(f / "outside.json")], "edit its bbox in the file"),
        (["--image", DESK, "--plan", str(f / "other_size.json")], "was made for a 1280x960 image"),
        (["--image", DESK, "--plan", "nope.json"], "plan file nope.json does not exist"),
        (["--image", DESK, "--plan", DESK_PLAN, "--no_plan"], "exclude each other"),
        (["--instruction", "x"], "needs --image"),
        (one + ["--steps", "0"], "--steps must be >= 1"),
        (one + ["--seed", "-1"], "--seed must be >= 0"),
        (one + ["--expand", "-0.1"], "--expand must be >= 0"),
        (one + ["--expand", "nan"], "--expand must be a finite number"),
        (one + ["--guidance", "inf"], "--guidance must be a finite number"),
        (one + ["--switch_ratio", "-1"], "--switch_ratio must be >= 0"),
        (one + ["--planner_retries", "-1"], "--planner_retries must be >= 0"),
        (one + ["--attention_budget", "lots"], "cannot read the attention budget 'lots'"),
        (one + ["--backbone", "tiny_qwen", "--guidance", "3"], "drop --guidance"),
        (one + ["--backbone", "tiny_qwen", "--steps", "1"], "needs --steps >= 2"),
        (one + ["--backbone", "sdxl"], "unknown backbone"),
        (one + ["--dtype", "fp8"], "--dtype 'fp8' is not known"),
        (one + ["--dtype", "fp16"], "fp16 does not work on the CPU"),
        (one + ["--device", "tpu9"], "--device 'tpu9'"),
        (one + ["--offload", "model", "--stage_offload", "cpu"], "exclude each other"),
        (one + ["--model", "./no/such/dir"], "editor folder ./no/such/dir does not exist"),
        (one + ["--model", str(f)], "has no model_index.json"),
        (one + ["--vlm_ckpt_path", "/no/such/planner"], "planner folder /no/such/planner does not exist"),
        (one + ["--vlm_lora_path", "/no/such/adapter"], "planner LoRA folder /no/such/adapter does not exist"),
        (one + ["--lora_path", "/no/such/lora.safetensors"], "editor LoRA /no/such/lora.safetensors does not exist"),
        (one + ["--parse", "official", "--strict_plan"], "contradicts parse mode"),
        (one + ["--vlm_prompt_template_path", "/no/template.txt"], "planner template /no/template.txt does not exist"),
        (one + ["--planner", "openai"], "no planner endpoint"),
        (one + ["--planner", "openai", "--base_url", "ftp://x"], "must be an http(s) URL"),
        (one + ["--planner", "openai", "--base_url", "http://x/v1", "--vlm_lora_path", "a"], "local planner only"),
        (one + ["--output_dir", str(f / "a_file" / "out")], "a_file is a file, not a directory"),
    ]


CASES = _cases(Path("FILES"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[1][:40] for c in CASES])
def test_bad_input_fails_before_any_model_loads(no_models, files, tmp_path, capsys, index):
    args, message = _cases(files)[index]
    out = tmp_path / "out"
    if "--output_dir" not in args:
        args = args + ["--output_dir", str(out)]
    if "--backbone" not in args:
        args = args + ["--backbone", "tiny"]
    rc = main(args + ["--device", "cpu"] if "--device" not in args else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0], err
    assert "clipped()" not in err[0] and "rescaled(" not in err[0]  # library calls are no way out for a CLI user
    assert not out.exists()


def test_unwritable_output_dir_fails_before_any_model_loads(no_models, tmp_path, capsys):
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / ".replan-probe").write_text("x")
    except OSError:
        pass
    else:
        pytest.skip("/sys/kernel is writable here")
    rc = main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(sysfs / "out")] + TINY)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not writable" in err[0] and "--output_dir" in err[0]


@pytest.mark.parametrize("flag", ["--vlm_lora_path", "--lora_path"])
def test_a_lora_without_peft_fails_before_loading(no_models, monkeypatch, tmp_path, capsys, flag):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError, as when it is not installed
    args = ["--image", DESK, "--instruction", "x", flag, str(adapter), "--output_dir", str(tmp_path / "out")]
    rc = main(args + TINY)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"error: {flag} needs the peft package, which is not installed: pip install -e '.[train]' "
                      "(or pip install peft)")


def test_offline_hub_without_a_cached_copy_fails_before_loading(no_models, monkeypatch, capsys):
    from replan.hub import is_cached

    if is_cached("black-forest-labs/FLUX.1-Kontext-dev", "model_index.json"):
        pytest.skip("FLUX.1 Kontext is cached here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["--image", DESK, "--plan", DESK_PLAN, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not in the local hub cache and HF_HUB_OFFLINE is set" in err
    assert "hf download black-forest-labs/FLUX.1-Kontext-dev" in err and "HF_TOKEN" in err and "stacktrace" not in err


def test_interactive_mode_checks_each_pair_before_planning(monkeypatch, files, tmp_path, capsys):
    class Tripwire:
        def __getattr__(self, name):
            raise ModelLoaded(f"the pipeline was used ({name}) for a pair that is not valid")

    pipe = RePlanPipeline(Tripwire(), Tripwire())
    monkeypatch.setattr(infer, "load_pipeline", lambda *a, **k: pipe)
    pairs = ["missing.png", "x", str(files / "dot.png"), "x", str(files / "huge.png"), "x", DESK, "  "]
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("\n".join(pairs) + "\n"))
    out = tmp_path / "session"
    assert main(["--output_dir", str(out)] + TINY) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 4
    for error, message in zip(errors, ["does not exist", "at least 64 px", "16.8 MP", "instruction is empty"]):
        assert message in error
    assert not out.exists()


def test_result_survives_an_output_dir_that_fails_after_the_edit(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(infer, "check_writable", lambda *a, **k: None)  # it breaks after the check (say, a full disk)
    monkeypatch.setenv("REPLAN_RESCUE_DIR", str(tmp_path / "rescue"))
    blocker = tmp_path / "volume"
    blocker.write_text("a file where the output folder should be")
    rc = main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(blocker / "run")] + TINY)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of the edit
    assert rc == 2 and err.startswith("error: cannot write") and str(blocker) in err and "--output_dir" in err
    (saved,) = (tmp_path / "rescue").iterdir()
    assert str(saved) in err
    assert {p.name for p in saved.iterdir()} == {"result.png", "plan.json", "overlay.png", "config.json"}
    assert Image.open(saved / "result.png").size == (640, 480)


def test_output_dir_symlinked_to_another_filesystem(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    target = shm / f"replan-infer-{os.getpid()}"
    target.mkdir()
    try:
        link = tmp_path / "out"
        link.symlink_to(target)
        assert main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(link)] + TINY) == 0
        # a --plan run has no planner reply: no empty planner_response.txt
        assert {p.name for p in target.iterdir()} == {"result.png", "plan.json", "overlay.png", "config.json"}
        assert np.asarray(Image.open(target / "result.png")).shape == (480, 640, 3)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_no_torchvision_notices():
    code = ("import replan, logging; logging.basicConfig();"
            "from transformers import CLIPImageProcessor, SiglipImageProcessor, Qwen2VLImageProcessor")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr


@pytest.mark.parametrize("entry", ["replan.app.__main__", "replan.serve.__main__"])
@pytest.mark.parametrize("args, message", [
    (["--backbone", "tiny", "--model", "/no/such/kontext"], "editor folder /no/such/kontext does not exist"),
    (["--backbone", "tiny", "--dtype", "fp8"], "--dtype 'fp8' is not known"),
    (["--backbone", "tiny", "--vlm_ckpt_path", "./missing-planner"], "planner folder ./missing-planner"),
])
def test_app_and_server_check_before_loading(no_models, capsys, entry, args, message):
    main_of = __import__(entry, fromlist=["main"]).main
    if entry.startswith("replan.app"):
        pytest.importorskip("gradio")
    else:
        pytest.importorskip("fastapi")
    assert main_of(args + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_offline_load_errors_name_the_way_out(monkeypatch):
    from replan.backbones import load_editor
    from replan.hub import is_cached
    from replan.planner import load_planner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if is_cached("black-forest-labs/FLUX.1-Kontext-dev", "model_index.json"):
        pytest.skip("FLUX.1 Kontext is cached here")
    with pytest.raises(ValueError) as info:
        load_editor("flux", device="cpu")
    message = str(info.value)
    assert "FLUX.1-Kontext-dev" in message and "not in the local cache" in message and "HF_HUB_OFFLINE" in message
    assert "hf download" in message and "HF_TOKEN" in message and "--model" in message
    assert "stacktrace" not in message and "\n" not in message
    with pytest.raises(ValueError) as info:
        load_planner("local", "TainU/RePlan-Qwen2.5-VL-7B", device="cpu")
    assert "not in the local cache" in str(info.value) and "--vlm_ckpt_path" in str(info.value)


def test_load_error_reasons():
    from replan.hub import load_error

    class GatedRepoError(OSError):
        pass

    gated = OSError("cannot load")
    gated.__cause__ = GatedRepoError("401 Client Error: access to model is restricted")
    assert "accept the licence at https://huggingface.co/black-forest-labs/FLUX.2-klein-9B and set HF_TOKEN" in \
        load_error("Flux2KleinPipeline", "black-forest-labs/FLUX.2-klein-9B", gated, "--model")
    missing = OSError("404 Client Error: Repository Not Found for url")
    assert "cannot find editor org/nope on the hub" in load_error("editor", "org/nope", missing, "--model")


def test_the_no_regions_note_names_the_region_problem():
    from replan.parse import parse_plan
    from replan.pipeline import no_regions_note

    plan = parse_plan("just some words and no tags", (64, 64))
    note = no_regions_note(plan)
    assert note.startswith("the planner reply gave no usable regions (") and "<region>" in note
    assert no_regions_note(parse_plan('<think>t</think><gen_image>g</gen_image><region>[]</region>', (64, 64))) \
        is None
