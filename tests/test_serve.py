"""python -m replan.serve: the real server (uvicorn, tiny backbone and planner) driven by the openai SDK and HTTP."""

import base64
import io
import json
import logging
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from replan.parse import parse_plan
from replan.pipeline import RePlanPipeline
from replan.plan import RegionPlan
from replan.serve import ServeConfig, create_app, load_pipeline
from replan.serve.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DESK = ROOT / "assets/examples/desk.png"
DESK_PLAN = RegionPlan.load(ROOT / "assets/examples/desk.plan.json")
LIMIT_MB = 0.25


class Server:
    """uvicorn in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, config: ServeConfig, loader=None):
        self.app = create_app(config, loader=loader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 300  # hang guards only: generous for loaded machines
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def service(self):
        return self.app.state.service

    def wait_for(self, status: str, timeout: float = 300):
        deadline = time.time() + timeout
        while self.service.status != status:
            assert time.time() < deadline, f"still {self.service.status}"
            time.sleep(0.05)


def tiny(**kw) -> ServeConfig:
    return ServeConfig(**{"backbone": "tiny", "planner": "none", "device": "cpu", **kw})


@pytest.fixture(scope="module")
def server():
    """The tiny backbone with the tiny planner, one waiting slot, a 0.25 MB image limit."""
    with Server(tiny(planner="local", vlm_ckpt_path="tiny", queue=1, max_image_mb=LIMIT_MB)) as s:
        s.wait_for("ready")
        yield s


@pytest.fixture(scope="module")
def direct():
    """The same editor loaded on its own, run directly (no server)."""
    return RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu")


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")  # the dev extra has it
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)))


def edit(server, fields: dict, image: bytes | None = None, **files):
    files = {"image": ("desk.png", DESK.read_bytes() if image is None else image, "image/png"), **files}
    return server.http.post("/v1/images/edits", data={"prompt": "replace the used cup", "steps": "2", **fields},
                            files=files)


def execute(server, **body):
    body = {"image_base64": base64.b64encode(DESK.read_bytes()).decode(), "instruction": "replace the used cup",
            "steps": 2, **body}
    return server.http.post("/v1/plans/execute", json=body)


def assert_error(response, status: int, param=None, text: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and text in error["message"]
    assert error["param"] == param
    return error


# --------------------------------------------------------------------------------------------------- lifecycle
def test_loading_then_ready():
    gate = threading.Event()
    config = tiny()

    def held_loader():
        gate.wait(600)  # released by the test; the timeout is a hang guard only
        return load_pipeline(config)

    with Server(config, loader=held_loader) as s:
        health = s.http.get("/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "5"
        assert health.json()["status"] == "loading" and health.json()["backbone"] == "tiny"
        error = assert_error(edit(s, {"no_plan": "true"}), 503)
        assert error["code"] == "model_loading"
        assert execute(s, response="x").status_code == 503
        gate.set()
        s.wait_for("ready")
        health = s.http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ready" and health.json()["queue"] == 0
        assert edit(s, {"no_plan": "true", "steps": "1"}).status_code == 200
        assert_error(edit(s, {}), 400, "plan", "without a planner")  # --planner none: plan or no_plan needed


def test_failed_loading_is_reported():
    with Server(tiny(model="/nonexistent/model/dir")) as s:
        s.wait_for("failed")
        health = s.http.get("/health")
        assert health.status_code == 500 and health.json()["status"] == "failed" and health.json()["error"]
        assert assert_error(edit(s, {"no_plan": "true"}), 500)["code"] == "model_load_failed"


# --------------------------------------------------------------------------------------------------- OpenAI SDK
def test_sdk_edit_with_plan_matches_the_pipeline(server, client, direct, caplog):
    plan = DESK_PLAN
    with caplog.at_level(logging.INFO, logger="replan.serve"), open(DESK, "rb") as f:
        result = client.images.edit(model="gpt-image-1", image=f, prompt="replace the used cup",
                                    response_format="b64_json",
                                    extra_body={"plan": json.dumps(plan.to_dict()), "seed": 3, "steps": 2})
    assert len(result.data) == 1 and result.created > 0
    assert result.data[0].revised_prompt == plan.global_prompt
    ext = result.to_dict()["replan"]
    assert ext["model"] == "gpt-image-1" and ext["backbone"] == "tiny" and ext["seed"] == 3 and ext["steps"] == 2
    assert RegionPlan.from_dict(ext["plan"]).regions == plan.regions and not ext["planned"]
    expected = direct(Image.open(DESK), plan=plan, seed=3, steps=2, entry="cli")
    assert np.array_equal(pixels(result.data[0].b64_json), np.asarray(expected.image))
    assert ext["boxes"] == [list(b) for b in expected.edit.boxes]
    assert any("edit=" in r.getMessage() and "total=" in r.getMessage() for r in caplog.records)


def test_sdk_edit_planned_resized_and_no_plan(server, client):
    with open(DESK, "rb") as f:
        planned = client.images.edit(image=f, prompt="replace the used cup", size="64x48",
                                     extra_body={"steps": 1})
    assert Image.open(io.BytesIO(base64.b64decode(planned.data[0].b64_json))).size == (64, 48)
    ext = planned.to_dict()["replan"]
    assert ext["planned"] and ext["plan"]["raw_text"]  # the tiny planner's noise: a global edit, with its repairs
    assert ext["plan"]["regions"] == [] and ext["plan"]["repairs"]
    with open(DESK, "rb") as f:  # a list is sent as image[]
        baseline = client.images.edit(image=[f], prompt="make it snowy", output_format="jpeg",
                                      extra_body={"no_plan": True, "steps": 1})
    assert baseline.data[0].revised_prompt == "make it snowy" and baseline.to_dict()["replan"]["boxes"] == []
    assert baseline.output_format == "jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(baseline.data[0].b64_json))).format == "JPEG"


def test_sdk_errors(client):
    import openai

    with open(DESK, "rb") as f, pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=f, prompt="x", n=2)
    assert e.value.param == "n" and "must be 1" in e.value.message
    with open(DESK, "rb") as f, pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=f, prompt="x", response_format="url")
    assert e.value.param == "response_format" and e.value.code == "unsupported_value"


def test_models(server):
    assert server.http.get("/v1/models").json()["data"][0]["id"] == "tiny"


# --------------------------------------------------------------------------------------------------- HTTP errors
@pytest.mark.parametrize("fields, files, param, text", [
    ({}, {"image": ("x.png", b"not an image", "image/png")}, "image", "not a readable image"),
    ({}, {"image": ("x.png", png_bytes(Image.new("RGB", (32, 32))), "image/png")}, "image", "at least 64"),
    ({"plan": '{"global_prompt": "x", "regions": [{"bbox": [90, 90, 20, 20], "hint": "h"}]}'}, {}, "plan",
     "zero area"),
    ({"plan": '{"global_prompt": "x", "regions": [{"bbox": [700, 0, 900, 100], "hint": "h"}]}'}, {}, "plan",
     "outside"),
    ({"plan": '{"regions": []}'}, {}, "plan", "no 'global_prompt'"),
    ({"plan": '{"global_prompt": '}, {}, "plan", "not valid JSON"),
    ({"plan": "x", "no_plan": "true"}, {}, "no_plan", "exclude"),
    ({"n": "2"}, {}, "n", "must be 1"),
    ({"n": "two"}, {}, "n", "integer"),
    ({"response_format": "url"}, {}, "response_format", "not supported"),
    ({"size": "big"}, {}, "size", "WIDTHxHEIGHT"),
    ({"prompt": ""}, {}, "prompt", "required"),
    ({"steps": "0"}, {}, "steps", "must be in"),
    ({}, {"mask": ("m.png", png_bytes(Image.new("RGBA", (640, 480))), "image/png")}, "mask", "not supported"),
])
def test_edit_400(server, fields, files, param, text):
    files = dict(files)
    image = files.pop("image", (None, None, None))[1]
    assert_error(edit(server, fields, image, **files), 400, param, text)


def test_edit_400_without_image(server):
    r = server.http.post("/v1/images/edits", data={"prompt": "x"}, files={"other": ("a", b"b")})
    assert_error(r, 400, "image", "required")


def test_413_over_the_limit(server):
    small = noise_png(300)  # ~270 KB > 0.25 MB: rejected after the form is read
    assert len(small) > LIMIT_MB * 2**20
    assert_error(edit(server, {"no_plan": "true"}, small), 413, "image")
    huge = noise_png(1000)  # ~3 MB: rejected from Content-Length before the body is read
    assert assert_error(edit(server, {"no_plan": "true"}, huge), 413)["code"] == "payload_too_large"
    assert_error(execute(server, response="x", image_base64=base64.b64encode(small).decode()), 413, "image_base64")


def test_413_for_a_plan_over_the_attention_budget():
    """A 1000-region plan is refused before any model work, with the CLI's one-line message; the replica serves on."""
    size = Image.open(DESK).size
    regions = [{"bbox": [5 + i % 50 * 10, 5 + i // 50 * 10, 15 + i % 50 * 10, 15 + i // 50 * 10], "hint": f"a cat {i}"}
               for i in range(1000)]
    assert all(r["bbox"][2] <= size[0] and r["bbox"][3] <= size[1] for r in regions)
    plan = json.dumps({"global_prompt": "x", "regions": regions})
    with Server(tiny(attention_budget="64MB")) as s:
        s.wait_for("ready")
        error = assert_error(edit(s, {"plan": plan}), 413, "plan", "the plan's 1000 region(s) make a")
        assert error["code"] == "plan_too_large" and "--attention_budget" in error["message"]
        body = {"image_base64": base64.b64encode(DESK.read_bytes()).decode(), "instruction": "x", "steps": 1,
                "response": "<think>t</think><gen_image>x</gen_image><region>" + json.dumps(
                    [{"bbox_2d": r["bbox"], "hint": r["hint"]} for r in regions]) + "</region>"}
        assert s.http.post("/v1/plans/execute", json=body).status_code == 413
        ok = edit(s, {"plan": DESK_PLAN.to_json()})
        assert ok.status_code == 200 and ok.json()["replan"]["hint_padding"] is None  # fits padded, as official
        assert s.http.get("/health").json()["status"] == "ready"
        # 8 regions: padded (9 x 512 text tokens) over 64 MB, trimmed far under it: run trimmed, and said so
        eight = json.dumps({"global_prompt": "x", "regions": regions[:8]})
        trimmed = edit(s, {"plan": eight, "steps": "1"})
        assert trimmed.status_code == 200, trimmed.text
        assert trimmed.json()["replan"]["hint_padding"].startswith("trimmed: the padded layout")
        body["response"] = body["response"].split("<region>")[0] + "<region>" + json.dumps(
            [{"bbox_2d": r["bbox"], "hint": r["hint"]} for r in regions[:8]]) + "</region>"
        executed = s.http.post("/v1/plans/execute", json=body)
        assert executed.status_code == 200 and executed.json()["hint_padding"].startswith("trimmed:")


def test_429_when_the_queue_is_full(server):
    """queue=1: one edit runs (slow: many steps), one waits, the third is turned away at once."""
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(edit, server, {"no_plan": "true", "steps": "200"})
        deadline = time.time() + 300
        while not server.http.get("/health").json()["busy"]:
            assert time.time() < deadline and not slow.done()
            time.sleep(0.01)
        waiting = pool.submit(edit, server, {"no_plan": "true", "steps": "1"})
        while server.http.get("/health").json()["queue"] < 1:
            assert time.time() < deadline and not waiting.done()
            time.sleep(0.01)
        health = server.http.get("/health")  # the event loop stays free: answered while the edit runs
        assert health.json() | {"busy": True, "queue": 1} == health.json()
        rejected = edit(server, {"no_plan": "true", "steps": "1"})
        error = assert_error(rejected, 429)
        assert error["code"] == "queue_full" and int(rejected.headers["retry-after"]) >= 1
        assert slow.result().status_code == 200 and waiting.result().status_code == 200
    assert server.http.get("/health").json() | {"busy": False, "queue": 0} == server.http.get("/health").json()


# --------------------------------------------------------------------------------------------------- /v1/plans/execute
def test_execute_runs_the_regions(server, direct):
    image = Image.open(DESK).convert("RGB")
    response = DESK_PLAN.to_response()
    r = execute(server, response=response, seed=5, box_frame="original")  # the official server's reading
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"image_base64", "plan", "seconds"} and body["seconds"] > 0
    assert body["box_frame"] == "original" and body["planner_size"] is None
    plan = RegionPlan.from_dict(body["plan"])
    assert plan.regions == DESK_PLAN.regions and plan.raw_text == response
    expected = direct(image, plan=parse_plan(response, image.size), seed=5, steps=2, entry="server")
    assert np.array_equal(pixels(body["image_base64"]), np.asarray(expected.image))
    # server defaults (switch 0, expand 0.15) are not the CLI's (switch 0.05): the same plan differs through edits
    assert expected.edit.boxes == [tuple(b) for b in body["boxes"]]


def test_execute_reads_boxes_in_the_planner_frame_by_default(server):
    response = DESK_PLAN.to_response()
    # 640x480: smart_resize rounds each side to a multiple of 28 → 644x476, the frame Qwen2.5-VL saw
    default = execute(server, response=response, steps=1).json()
    assert default["box_frame"] == "processor" and default["planner_size"] == [644, 476]
    expected = parse_plan(response, (640, 480), planner_size=(644, 476))
    assert RegionPlan.from_dict(default["plan"]).regions == expected.regions != DESK_PLAN.regions
    given = execute(server, response=response, steps=1, planner_size=[320, 240]).json()
    assert given["planner_size"] == [320, 240]
    assert RegionPlan.from_dict(given["plan"]).regions == parse_plan(response, (640, 480),
                                                                     planner_size=(320, 240)).regions
    assert_error(execute(server, response=response, box_frame="original", planner_size=[644, 476]), 400,
                 "planner_size", "only used with box_frame 'processor'")
    assert_error(execute(server, response=response, planner_size=[0, 476]), 400, "planner_size", "positive")
    assert_error(execute(server, response=response, box_frame="frame"), 400, "box_frame")


def test_execute_garbage_is_a_global_edit(server, direct):
    r = execute(server, response="I cannot help with that ]]", seed=1, expand_value=0.2)  # official alias accepted
    assert r.status_code == 200, r.text
    plan = RegionPlan.from_dict(r.json()["plan"])
    assert plan.regions == () and plan.repairs
    expected = direct(Image.open(DESK), plan=RegionPlan("", image_size=(640, 480)), seed=1, steps=2, entry="server")
    assert np.array_equal(pixels(r.json()["image_base64"]), np.asarray(expected.image))


def test_execute_reads_the_reply_in_the_requested_parse_mode(server, direct):
    # official (GRPO reward parity): a box entirely outside the image is kept and executed (it covers no patch);
    # lenient drops it; strict refuses a reply it cannot read
    response = ('<think>t</think><gen_image>g</gen_image><region>[{"bbox_2d": [87, 197, 208, 311], "hint": "cactus"}, '
                '{"bbox_2d": [700, 10, 800, 50], "hint": "gone"}]</region>')
    r = execute(server, response=response, seed=2, parse="official", box_frame="original", delete_main_prompt=True)
    assert r.status_code == 200, r.text
    plan = RegionPlan.from_dict(r.json()["plan"])
    assert [reg.hint for reg in plan.regions] == ["cactus", "gone"] and plan.repairs == ()
    assert r.json()["boxes"][1] == [685, 4, 640, 56]
    expected = direct(Image.open(DESK), plan=plan, seed=2, steps=2, entry="server", delete_main_prompt=True)
    assert np.array_equal(pixels(r.json()["image_base64"]), np.asarray(expected.image))
    lenient = RegionPlan.from_dict(execute(server, response=response, seed=2).json()["plan"])  # the server default
    assert [reg.hint for reg in lenient.regions] == ["cactus"] and "lies outside" in lenient.repairs[0]
    assert_error(execute(server, response="no plan here", parse="strict"), 400, "response", "plan grammar")
    assert_error(execute(server, response=response, parse="exact"), 400, "parse")


@pytest.mark.parametrize("body, param, text", [
    ({"image_base64": "!!!"}, "image_base64", "base64"),
    ({"image_base64": base64.b64encode(b"not an image").decode()}, "image_base64", "not a readable image"),
    ({"rules": {"Nobody, Main Prompt": True}}, "rules", ""),
    ({"response": None}, "response", ""),
    ({"steps": 0}, "steps", ""),
])
def test_execute_400(server, body, param, text):
    body = {"response": DESK_PLAN.to_response(), **body}
    assert_error(execute(server, **body), 400, param, text)


def test_execute_400_on_missing_fields_and_bad_json(server):
    assert_error(server.http.post("/v1/plans/execute", json={"response": "x"}), 400, "image_base64", "required")
    r = server.http.post("/v1/plans/execute", content=b"{not json", headers={"content-type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_defaults_and_errors(monkeypatch, capsys):
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.queue, args.max_image_mb, args.replicas) == ("127.0.0.1", 8001, 8, 20.0, None)
    assert main(["--backbone", "nope"]) == 2 and "unknown backbone" in capsys.readouterr().err
    assert main(["--backbone", "tiny", "--lora_path", "/no/such/lora"]) == 2
    assert "editor LoRA /no/such/lora does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["--backbone", "tiny", "--replicas", "2"]) == 2
    assert 'pip install "ray[serve]"' in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- Ray Serve
@pytest.mark.slow
def test_ray_serve_replicas(direct):
    """--replicas: the same app under Ray Serve (CPU replicas here); skipped without ray[serve]."""
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from replan.serve.ray_app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(tiny(queue=1), replicas=2, gpus_per_replica=0), name="replan", route_prefix="/")
        s = SimpleNamespace(http=httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
        assert s.http.get("/health").json()["status"] == "ready"  # replicas load before they take traffic
        plan = json.dumps(DESK_PLAN.to_dict())
        with ThreadPoolExecutor(6) as pool:
            codes = [r.status_code for r in pool.map(lambda _: edit(s, {"plan": plan, "steps": "20"}), range(6))]
        assert codes.count(200) >= 2 and set(codes) <= {200, 429}, codes  # 2 replicas x (1 running + 1 waiting)
        r = edit(s, {"plan": plan, "seed": "3", "steps": "2"})
        expected = direct(Image.open(DESK), plan=DESK_PLAN, seed=3, steps=2, entry="cli")
        diff = np.abs(pixels(r.json()["data"][0]["b64_json"]).astype(int) - np.asarray(expected.image).astype(int))
        assert diff.max() <= 2, diff.max()  # Ray limits replica CPU threads: float sums differ in the last bits
    finally:
        serve.shutdown()
        ray.shutdown()
