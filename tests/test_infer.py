"""python -m replan.infer end to end on the tiny backbone and tiny planner, the local planner's frame, the pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replan.coords import smart_resize
from replan.infer import main
from replan.pipeline import RePlanPipeline
from replan.plan import RegionPlan
from replan.planner import load_planner

ROOT = Path(__file__).resolve().parents[1]
DESK = str(ROOT / "assets/examples/desk.png")
DESK_PLAN = str(ROOT / "assets/examples/desk.plan.json")
TINY = ["--backbone", "tiny", "--vlm_ckpt_path", "tiny", "--steps", "3", "--device", "cpu"]
OUTPUTS = {"result.png", "plan.json", "planner_response.txt", "overlay.png", "config.json"}


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_one_shot_writes_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--image", DESK, "--instruction", "replace the used cup with a cactus", "--output_dir", str(out)]
                + TINY) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert Image.open(out / "result.png").size == (640, 480)
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "tiny" and config["edit_options"]["steps"] == 3 and config["planner"] == "local"
    plan = RegionPlan.load(out / "plan.json")
    assert plan.raw_text == (out / "planner_response.txt").read_text()
    # a random tiny planner cannot write the grammar: the edit falls back to a global edit and says so
    assert plan.regions == () and "global edit" in capsys.readouterr().err


def test_plan_replay_reproduces_the_image(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(first), "--seed", "7"] + TINY) == 0
    assert main(["--image", DESK, "--plan", str(first / "plan.json"), "--output_dir", str(second), "--seed", "7"]
                + TINY) == 0
    assert np.array_equal(pixels(first / "result.png"), pixels(second / "result.png"))
    config = json.loads((first / "config.json").read_text())
    assert len(config["resolved"]["boxes"]) == 2 and config["planner"] is None
    other = tmp_path / "c"
    assert main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(other), "--seed", "8"] + TINY) == 0
    assert not np.array_equal(pixels(first / "result.png"), pixels(other / "result.png"))


def test_no_plan_is_the_stock_backbone(tmp_path):
    out = tmp_path / "out"
    assert main(["--image", DESK, "--instruction", "make it snowy", "--no_plan", "--output_dir", str(out)] + TINY) == 0
    pipe = RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu")
    editor = pipe.editor
    image = Image.open(DESK).convert("RGB")
    w, h = editor.generation_size(image.size)
    stock = editor.pipe(image=editor.pipe.image_processor.resize(image, h, w), prompt="make it snowy", height=h,
                        width=w, max_area=w * h, _auto_resize=False, num_inference_steps=3, guidance_scale=2.5,
                        generator=__import__("torch").Generator().manual_seed(0)).images[0]
    stock = stock.resize(image.size, Image.BICUBIC)
    assert np.array_equal(pixels(out / "result.png"), np.asarray(stock))


def test_only_save_image(tmp_path):
    out = tmp_path / "out"
    assert main(["--image", DESK, "--plan", DESK_PLAN, "--only_save_image", "--output_dir", str(out)] + TINY) == 0
    assert [p.name for p in out.iterdir()] == ["result.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png", "--instruction", "x"], "does not exist"),
        (["--image", DESK, "--instruction", "   "], "instruction is empty"),
        (["--image", DESK, "--plan", "nope.json"], "plan file nope.json does not exist"),
        (["--image", DESK, "--plan", DESK, "--no_plan"], "exclude each other"),
        (["--instruction", "x"], "needs --image"),
        (["--image", DESK, "--instruction", "x", "--backbone", "sdxl"], "unknown backbone"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(args + ["--output_dir", str(out), "--vlm_ckpt_path", "tiny", "--device", "cpu", "--steps", "1"]
              + (["--backbone", "tiny"] if "--backbone" not in args else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and err[-1].startswith("error:")
    assert not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_invalid_plan_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"global_prompt": "x", "regions": [{"bbox": [5, 5, 5, 9], "hint": "h"}]}))
    assert main(["--image", DESK, "--plan", str(bad), "--output_dir", str(tmp_path / "o")] + TINY) == 2
    assert "region 1" in capsys.readouterr().err


def test_interactive_mode_reads_stdin_until_eof(tmp_path):
    out = tmp_path / "session"
    stdin = f"{DESK}\nreplace the used cup with a cactus\nmissing.png\nx\n{DESK}\nmake it blue\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "replan.infer", "--output_dir", str(out)] + TINY, input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr  # one of the three rounds failed
    assert "does not exist" in proc.stderr
    done = sorted(p.name for p in out.iterdir())
    assert done == ["001_desk", "003_desk"]
    assert all({p.name for p in (out / d).iterdir()} == OUTPUTS for d in done)


@pytest.mark.parametrize("size", [(300, 200), (1000, 750), (4100, 3100)])
def test_local_planner_reports_the_frame_it_saw(size):
    planner = load_planner("local", "tiny", device="cpu", max_new_tokens=4)
    ip = planner.processor.image_processor
    reply = planner.generate(Image.new("RGB", size), "describe")
    h, w = smart_resize(size[1], size[0], 28, ip.size["shortest_edge"], ip.size["longest_edge"])
    assert reply.frame == (w, h)


def test_planner_needs_an_instruction():
    planner = load_planner("local", "tiny", device="cpu", max_new_tokens=4)
    with pytest.raises(ValueError, match="instruction is empty"):
        planner.plan(Image.new("RGB", (100, 100)), " ")


class _PlannerServer:
    """A local OpenAI-compatible endpoint that answers every chat request with one scripted RePlan reply."""

    def __init__(self, reply: str):
        import threading
        from http.server import ThreadingHTTPServer

        from replan.testing.standins import JSONHandler

        prompts = self.prompts = []  # the text part of each request: the prompt the planner built

        class Handler(JSONHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompts.extend(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
                self._send(200, {"choices": [{"message": {"content": reply}, "finish_reason": "stop"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_cli_with_an_openai_compatible_planner(tmp_path):
    # desk.png is 640x480; smart_resize keeps 644x476: the reply's boxes are in that frame
    reply = ('<think>the cup with coffee is the used one</think><gen_image>keep remaining part of image unchanged.'
             '</gen_image><region>[{"bbox_2d": [87, 197, 208, 311], "hint": "a small cactus in a pot"}]</region>')
    server = _PlannerServer(reply)
    try:
        out = tmp_path / "out"
        rc = main(["--image", DESK, "--instruction", "replace the used cup", "--planner", "openai",
                   "--base_url", server.url, "--output_dir", str(out), "--backbone", "tiny", "--steps", "2",
                   "--device", "cpu"])
    finally:
        server.close()
    assert rc == 0
    plan = RegionPlan.load(out / "plan.json")
    assert (out / "planner_response.txt").read_text() == reply
    (region,) = plan.regions
    assert region.bbox == pytest.approx((87 * 640 / 644, 197 * 480 / 476, 208 * 640 / 644, 311 * 480 / 476))


def test_cli_parse_modes(tmp_path, capsys):
    # a reply with one box whose corners are swapped: lenient repairs it, official (as the official code, which
    # raises on it) runs a global edit and says why, strict (and --strict_plan) refuses the reply
    reply = ('<think>t</think><gen_image>make it warm</gen_image><region>[{"bbox_2d": [208, 311, 87, 197], '
             '"hint": "a small cactus in a pot"}]</region>')
    server = _PlannerServer(reply)
    common = ["--image", DESK, "--instruction", "replace the used cup", "--planner", "openai", "--base_url",
              server.url, "--backbone", "tiny", "--steps", "1", "--device", "cpu"]
    try:
        assert main(common + ["--output_dir", str(tmp_path / "lenient")]) == 0
        assert main(common + ["--output_dir", str(tmp_path / "official"), "--parse", "official"]) == 0
        capsys.readouterr()
        for flags in (["--parse", "strict"], ["--strict_plan"]):
            assert main(common + ["--output_dir", str(tmp_path / "strict"), *flags]) == 2
            assert "swapped corners" in capsys.readouterr().err
        assert main(common + ["--output_dir", str(tmp_path / "x"), "--parse", "lenient", "--strict_plan"]) == 2
        assert "contradicts parse mode 'lenient'" in capsys.readouterr().err
    finally:
        server.close()
    lenient, official = (RegionPlan.load(tmp_path / d / "plan.json") for d in ("lenient", "official"))
    assert len(lenient.regions) == 1 and "swapped corners" in lenient.repairs[0]
    assert official.regions == () and official.global_prompt == "make it warm"
    assert "x2 <= x1" in official.repairs[0] and "global edit" in official.repairs[0]
    assert json.loads((tmp_path / "official" / "config.json").read_text())["parse"] == "official"
    assert not (tmp_path / "strict").exists()


def test_cli_unreachable_endpoint_exits_3(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "out"
    rc = main(["--image", DESK, "--instruction", "x", "--planner", "openai", "--base_url", f"http://127.0.0.1:{port}/v1",
               "--output_dir", str(out), "--backbone", "tiny", "--device", "cpu", "--planner_retries", "1"])
    err = capsys.readouterr().err
    assert rc == 3 and "planner failed" in err and not out.exists()


def test_replay_command_carries_every_option(tmp_path):
    out = tmp_path / "o 2"
    assert main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(out), "--expand", "0.4",
                 "--switch_ratio", "0.5", "--guidance", "5", "--seed", "3"] + TINY) == 0
    replay = json.loads((out / "config.json").read_text())["replay"]
    for flag in ("--expand 0.4", "--switch_ratio 0.5", "--guidance 5.0", "--seed 3", "--steps 3", "--backbone tiny"):
        assert flag in replay, (flag, replay)


def test_zero_steps_is_an_error(tmp_path, capsys):
    assert main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(tmp_path / "o"), "--backbone", "tiny",
                 "--steps", "0", "--device", "cpu"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_local_planner_loads_a_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from replan.backbones.registry import build_offline

    base = build_offline("replan.testing.qwenvl:save_tiny_qwen25vl", "tiny-qwen25vl")
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    lora.save_pretrained(tmp_path / "adapter")
    plain = load_planner("local", str(base), device="cpu", max_new_tokens=2)
    adapted = load_planner("local", str(base), lora_path=str(tmp_path / "adapter"), device="cpu", max_new_tokens=2)
    name = next(n for n, _ in plain.model.named_parameters() if "q_proj.weight" in n)
    before = dict(plain.model.named_parameters())[name]
    after = dict(adapted.model.named_parameters())[name]
    assert before.shape == after.shape and not torch.equal(before, after)  # the adapter was merged into the weights
    assert not any("lora" in n for n, _ in adapted.model.named_parameters())


@pytest.mark.parametrize("backbone", ["tiny_klein", pytest.param("tiny_qwen", marks=pytest.mark.slow)])
def test_offline_smoke_backbones_of_the_other_families(tmp_path, backbone):
    out = tmp_path / backbone
    assert main(["--image", DESK, "--plan", DESK_PLAN, "--output_dir", str(out), "--backbone", backbone,
                 "--steps", "2", "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == backbone and len(config["resolved"]["boxes"]) == 2
    assert Image.open(out / "result.png").size == (640, 480)


def test_prompt_template_box_frame_and_provenance_in_the_outputs(tmp_path):
    """The planner gets the template file's text; outputs name it with its hash; --box_frame original reads the
    reply's boxes as image pixels (official), the default maps them from the 644x476 frame the planner saw."""
    import hashlib

    reply = ('<think>the cup with coffee is the used one</think><gen_image>keep remaining part of image unchanged.'
             '</gen_image><region>[{"bbox_2d": [87, 197, 208, 311], "hint": "a small cactus in a pot"}]</region>')
    server = _PlannerServer(reply)
    template = tmp_path / "official_like.txt"
    template.write_text("Plan the edit as regions.\n\nThe user instruction: ", encoding="utf-8")
    runs = {}
    try:
        for frame, flag in (("original", "--vlm_prompt_template_path"), ("processor", "--prompt_template")):
            out = tmp_path / frame
            args = ["--image", DESK, "--instruction", "replace the used cup", "--planner", "openai", "--base_url",
                    server.url, "--output_dir", str(out), "--backbone", "tiny", "--steps", "1", "--device", "cpu",
                    flag, str(template)]
            assert main(args + (["--box_frame", "original"] if frame == "original" else [])) == 0
            runs[frame] = out
    finally:
        server.close()
    assert server.prompts == ["Plan the edit as regions.\n\nThe user instruction: \nreplace the used cup"] * 2
    digest = hashlib.sha256(template.read_bytes()).hexdigest()
    for frame, out in runs.items():
        saved = json.loads((out / "plan.json").read_text())
        expected = {"template": str(template), "template_sha256": digest, "box_frame": frame,
                    "planner_frame": [644, 476]}
        assert saved["planner"] == expected
        assert json.loads((out / "config.json").read_text())["planner_provenance"] == expected
    (raw,) = RegionPlan.load(runs["original"] / "plan.json").regions
    (mapped,) = RegionPlan.load(runs["processor"] / "plan.json").regions
    assert raw.bbox == (87, 197, 208, 311)
    assert mapped.bbox == pytest.approx((87 * 640 / 644, 197 * 480 / 476, 208 * 640 / 644, 311 * 480 / 476))
    with pytest.raises(SystemExit):
        main(["--box_frame", "pixels"])
