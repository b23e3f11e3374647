"""OpenAIPlanner against a real local HTTP server speaking the chat-completions protocol with scripted replies."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from PIL import Image

from replan.coords import smart_resize
from replan.parse import PlanParseError
from replan.planner.base import PlannerError
from replan.planner.openai_backend import DEFAULT_MODEL, OpenAIPlanner
from replan.testing.standins import JSONHandler

MODEL = "test/RePlan-model"
KEY = "sk-test-123"
INSTRUCTION = "replace the used cup with a cactus"
ENV_VARS = (
    "REPLAN_PLANNER_BASE_URL",
    "OPENAI_BASE_URL",
    "REPLAN_PLANNER_API_KEY",
    "OPENAI_API_KEY",
    "REPLAN_PLANNER_MODEL",
)


# --------------------------------------------------------------------------------------------------- the server
def completion(content, **extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        **extra,
    }


def replan_reply(frame_w: int, frame_h: int) -> str:
    """A valid RePlan reply whose boxes are in the frame the model saw."""
    items = [
        {"bbox_2d": [0, 0, frame_w, frame_h], "hint": "the whole frame"},
        {"bbox_2d": [frame_w // 4, frame_h // 3, frame_w // 2 + 1, frame_h - 5], "point_2d": [7, 11], "hint": "cup"},
    ]
    return f"<think>find the cup</think><gen_image>make it green</gen_image><region>{json.dumps(items)}</region>"


def decode_image(body: dict) -> Image.Image:
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :], validate=True)))
    assert image.format == "PNG"
    return image


class Server:
    """Scripted chat-completions server: each request to /chat/completions takes the next step of ``script``."""

    def __init__(self):
        self.script: list = []  # steps: "replan" | (status, body) | ("sleep", seconds) | callable(request) -> step
        self.default = "replan"
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self.expected_size: tuple[int, int] | None = None  # (W, H) of the original image of the next plan() call
        self.expected_key = KEY
        self.expected_model = MODEL
        self.models_status = 200
        self.gets: list[str] = []
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                server.gets.append(self.path)
                if self.path == "/v1/models":
                    body = {"object": "list", "data": [{"id": server.expected_model, "object": "model"}]}
                    self._send(server.models_status, body)
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {"path": self.path, "headers": self.headers, "raw": raw}
                server.requests.append(request)
                try:
                    request["body"] = json.loads(raw)
                    server.check(request)
                except AssertionError as e:  # the client sees this as a refused request; the test also checks errors
                    server.errors.append(str(e))
                    self._send(400, {"error": {"message": f"bad request shape: {e}"}})
                    return
                step = server.script.pop(0) if server.script else server.default
                if callable(step):
                    step = step(request)
                if step == "replan":
                    w, h = request["sent_size"]
                    self._send(200, completion(replan_reply(w, h)))
                elif step[0] == "sleep":
                    time.sleep(step[1])
                    self._send(200, completion(replan_reply(*request["sent_size"])))
                else:
                    self._send(*step)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def check(self, request: dict) -> None:
        """The request shape: path, auth, model, sampling, one user turn with the image first and then the text."""
        body, headers = request["body"], request["headers"]
        assert request["path"] == "/v1/chat/completions", request["path"]
        assert headers.get("Authorization") == f"Bearer {self.expected_key}", headers.get("Authorization")
        assert headers.get("Content-Type") == "application/json"
        assert body["model"] == self.expected_model, body["model"]
        assert body["temperature"] == 0.0 and body["max_tokens"] == 2048
        (message,) = body["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]
        assert image_part["type"] == "image_url" and text_part["type"] == "text"
        assert text_part["text"].endswith("\n" + INSTRUCTION), text_part["text"][-80:]
        image = decode_image(body)
        request["sent_size"] = image.size
        if self.expected_size is not None:
            W, H = self.expected_size
            h, w = smart_resize(H, W)
            assert image.size == (w, h), f"sent {image.size}, expected smart_resize {(w, h)} of {W}x{H}"

    def count(self) -> int:
        return len(self.requests)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(timeout=5)


def make_planner(server, **kw) -> OpenAIPlanner:
    kw = {"base_url": server.url, "api_key": KEY, "model": MODEL, "backoff": 0.01, "max_retries": 4, **kw}
    return OpenAIPlanner(**kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- replies
@pytest.mark.parametrize("size", [(300, 200), (1000, 750), (5000, 4000)], ids=["300x200", "1000x750", "5000x4000"])
def test_boxes_are_mapped_from_the_resized_frame_to_original_pixels(server, size):
    W, H = size
    server.expected_size = size
    planner = make_planner(server)
    plan = planner.plan(Image.new("RGB", size, (40, 120, 200)), INSTRUCTION)
    assert server.errors == []
    h, w = smart_resize(H, W)
    assert w * h <= 16384 * 28 * 28 and w % 28 == 0 and h % 28 == 0
    if W * H > 16384 * 28 * 28:
        assert (w, h) != (W, H)
    assert plan.image_size == (W, H)
    assert plan.global_prompt == "make it green" and plan.reasoning == "find the cup"
    assert plan.repairs == ()
    whole, cup = plan.regions
    assert whole.bbox == (0.0, 0.0, float(W), float(H))  # the frame's border is the image's border, exactly
    x1, y1, x2, y2 = w // 4, h // 3, w // 2 + 1, h - 5
    assert cup.bbox == (x1 * W / w, y1 * H / h, x2 * W / w, y2 * H / h)
    assert cup.point == (7 * W / w, 11 * H / h)
    reply = planner.last_reply
    assert reply.frame == (w, h) and reply.extras["sent_size"] == (w, h)
    assert reply.extras["attempts"] == 1 and reply.extras["model"] == MODEL
    assert reply.extras["usage"]["total_tokens"] == 120
    assert reply.extras["finish_reason"] == "stop"
    assert reply.seconds > 0 and reply.extras["seconds"] == reply.seconds
    assert server.count() == 1


def test_non_rgb_image_is_sent_as_rgb_png(server):
    server.expected_size = (640, 480)
    plan = make_planner(server).plan(Image.new("RGBA", (640, 480), (0, 0, 0, 0)), INSTRUCTION)
    assert server.errors == [] and len(plan.regions) == 2
    image = decode_image(server.requests[0]["body"])
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 255, 255)


def test_content_as_a_list_of_text_parts_is_joined(server):
    text = replan_reply(308, 196)
    parts = [{"type": "text", "text": text[:30]}, {"type": "text", "text": text[30:]}]
    server.script = [(200, completion(parts))]
    plan = make_planner(server).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert plan.repairs == () and len(plan.regions) == 2
    assert plan.regions[0].bbox == (0.0, 0.0, 300.0, 200.0)


def test_garbage_reply_lenient_gives_a_global_plan_and_strict_raises(server):
    garbage = "I am sorry, I cannot see any cup here."
    server.script = [(200, completion(garbage))]
    plan = make_planner(server).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert plan.regions == () and plan.repairs
    assert plan.raw_text == garbage
    server.script = [(200, completion(garbage))]
    with pytest.raises(PlanParseError):
        make_planner(server, strict=True).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    server.script = [(200, completion(garbage))]
    with pytest.raises(PlanParseError):
        make_planner(server).plan(Image.new("RGB", (300, 200)), INSTRUCTION, strict=True)
    assert server.count() == 3  # a reply that parses badly is the model's answer: never retried


def test_original_frame_policy_sends_the_image_unresized(server):
    planner = make_planner(server, frame="original")
    plan = planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert server.requests[0]["sent_size"] == (300, 200)
    assert planner.last_reply.frame == (300, 200)
    assert plan.regions[0].bbox == (0.0, 0.0, 300.0, 200.0)


def test_server_frame_policy_sends_the_original_and_assumes_smart_resize(server):
    planner = make_planner(server, frame="server")
    reply = planner.generate(Image.new("RGB", (300, 200)), "prompt\n" + INSTRUCTION)
    assert server.requests[0]["sent_size"] == (300, 200)
    assert reply.frame == (308, 196)


def test_custom_pixel_bounds_change_the_frame(server):
    planner = make_planner(server, max_pixels=256 * 28 * 28)
    reply = planner.generate(Image.new("RGB", (1000, 750)), "prompt\n" + INSTRUCTION)
    h, w = smart_resize(750, 1000, max_pixels=256 * 28 * 28)
    assert reply.frame == (w, h) == server.requests[0]["sent_size"]


# --------------------------------------------------------------------------------------------------- retries
def test_500_twice_then_success(server):
    server.script = [(500, {"error": {"message": "engine busy"}})] * 2
    planner = make_planner(server)
    plan = planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert len(plan.regions) == 2
    assert planner.last_reply.extras["attempts"] == 3
    assert server.count() == 3


def test_always_500_raises_after_max_retries(server):
    server.default = (500, {"error": {"message": "CUDA out of memory"}})
    with pytest.raises(PlannerError) as info:
        make_planner(server, max_retries=3).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    message = str(info.value)
    assert server.count() == 4  # the first attempt and 3 retries
    assert "\n" not in message
    assert f"{server.url}/chat/completions" in message
    assert "HTTP 500" in message and "CUDA out of memory" in message and "4 attempt" in message
    assert KEY not in message


def test_400_raises_at_once_with_the_server_message(server):
    server.script = [(400, {"object": "error", "message": "prompt is too long for the context", "code": 400})]
    with pytest.raises(PlannerError, match=r"HTTP 400: prompt is too long for the context") as info:
        make_planner(server).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert server.count() == 1
    assert "\n" not in str(info.value)


def test_401_names_the_api_key_setting(server):
    server.script = [(401, {"error": {"message": "invalid api key"}})]
    with pytest.raises(PlannerError, match=r"HTTP 401: invalid api key.*REPLAN_PLANNER_API_KEY"):
        make_planner(server).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert server.count() == 1


def test_429_then_success(server):
    server.script = [(429, {"error": {"message": "rate limited"}})]
    planner = make_planner(server)
    plan = planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert len(plan.regions) == 2 and planner.last_reply.extras["attempts"] == 2
    assert server.count() == 2


@pytest.mark.parametrize(
    "bad",
    [
        (200, b"<html>502 Bad Gateway</html>"),
        (200, {"id": "x", "choices": []}),
        (200, {"choices": [{"message": {"role": "assistant", "content": None}}]}),
        (200, [1, 2]),
        (200, {"error": {"message": "overloaded"}}),
    ],
    ids=["not-json", "no-choices", "null-content", "not-object", "error-body"],
)
def test_unusable_reply_is_retried(server, bad):
    server.script = [bad]
    planner = make_planner(server)
    plan = planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert len(plan.regions) == 2 and planner.last_reply.extras["attempts"] == 2


def test_unusable_reply_every_time_raises(server):
    server.default = (200, b"not json at all")
    with pytest.raises(PlannerError, match=r"failed after 2 attempt.*not valid JSON"):
        make_planner(server, max_retries=1).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert server.count() == 2


def test_timeout_is_retried(server):
    server.script = [("sleep", 1.0)]
    planner = make_planner(server, timeout=0.3)
    plan = planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert len(plan.regions) == 2 and planner.last_reply.extras["attempts"] == 2


def test_unreachable_endpoint_raises_quickly():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    planner = OpenAIPlanner(base_url=url, model=MODEL, backoff=0.01, max_retries=2, timeout=2)
    with pytest.raises(PlannerError, match=r"failed after 3 attempt.*cannot connect") as info:
        planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert url in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------- configuration
def test_configuration_from_environment(server, monkeypatch):
    monkeypatch.setenv("REPLAN_PLANNER_BASE_URL", server.url + "/")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://wrong.invalid/v1")
    monkeypatch.setenv("REPLAN_PLANNER_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    monkeypatch.setenv("REPLAN_PLANNER_MODEL", MODEL)
    planner = OpenAIPlanner(backoff=0.01)
    assert (planner.base_url, planner.api_key, planner.model) == (server.url, KEY, MODEL)
    assert KEY not in repr(planner)
    plan = planner.plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    assert server.errors == [] and len(plan.regions) == 2


def test_openai_environment_fallbacks_and_defaults(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    planner = OpenAIPlanner()
    assert (planner.base_url, planner.api_key, planner.model) == (server.url, KEY, DEFAULT_MODEL)
    assert (planner.timeout, planner.max_retries, planner.backoff) == (300.0, 4, 1.0)
    assert (planner.temperature, planner.max_tokens, planner.frame) == (0.0, 2048, "resize")
    assert (planner.min_pixels, planner.max_pixels) == (4 * 28 * 28, 16384 * 28 * 28)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert OpenAIPlanner().api_key == "EMPTY"
    assert OpenAIPlanner(base_url="http://h:1/v1", api_key="k", model="m").model == "m"


def test_missing_base_url_names_the_setting():
    with pytest.raises(ValueError, match="REPLAN_PLANNER_BASE_URL"):
        OpenAIPlanner()


@pytest.mark.parametrize(
    "kw",
    [
        {"base_url": "ftp://host/v1"},
        {"base_url": "localhost:8000"},
        {"timeout": 0},
        {"max_retries": -1},
        {"backoff": -1},
        {"max_tokens": 0},
        {"temperature": -0.5},
        {"frame": "native"},
        {"min_pixels": 10, "max_pixels": 5},
    ],
)
def test_bad_settings_raise_value_error(kw):
    with pytest.raises(ValueError):
        OpenAIPlanner(**{"base_url": "http://localhost:8000/v1", **kw})


@pytest.mark.parametrize("instruction", ["", "   \n"])
def test_empty_instruction_raises_before_any_request(server, instruction):
    with pytest.raises(ValueError, match="instruction is empty"):
        make_planner(server).plan(Image.new("RGB", (300, 200)), instruction)
    assert server.count() == 0


def test_extra_body_is_sent(server):
    make_planner(server, extra_body={"seed": 7, "top_p": 1.0}).plan(Image.new("RGB", (300, 200)), INSTRUCTION)
    body = server.requests[0]["body"]
    assert body["seed"] == 7 and body["top_p"] == 1.0 and body["model"] == MODEL


# --------------------------------------------------------------------------------------------------- readiness
def test_wait_until_ready_returns_the_served_models(server):
    assert make_planner(server).wait_until_ready(timeout=5) == [MODEL]


def test_wait_until_ready_keeps_polling_through_503(server):
    server.models_status = 503

    def ready_soon():
        time.sleep(0.3)
        server.models_status = 200

    threading.Thread(target=ready_soon, daemon=True).start()
    assert make_planner(server).wait_until_ready(timeout=5, interval=0.05) == [MODEL]


def test_wait_until_ready_times_out():
    planner = OpenAIPlanner(base_url=f"http://127.0.0.1:{closed_port()}/v1", model=MODEL)
    with pytest.raises(PlannerError, match=r"not ready after 0.4 s.*cannot connect"):
        planner.wait_until_ready(timeout=0.4, interval=0.05)


def test_wait_until_ready_stops_at_once_on_a_wrong_route(server):
    planner = OpenAIPlanner(base_url=server.url.removesuffix("/v1"), model=MODEL)
    with pytest.raises(PlannerError, match=r"HTTP 404.*/v1"):
        planner.wait_until_ready(timeout=30)
    assert server.gets == ["/models"]  # one request, no polling for 30 s
