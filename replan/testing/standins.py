"""Local stand-ins for the stage-2 reward servers: an edit server (``GET /health``, ``POST /v1/plans/execute``) and
an OpenAI-compatible judge, with scripted latencies and fault injection (503 while loading, 500s, hangs).

Used by the training tests and ``benchmark/reward_throughput.py``; they bind 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageOps

JUDGE_MODEL = "stand-in-judge"
GOOD_PLAN = ('<think>The red square on the left is the target; only it changes colour, the rest stays.</think>'
             '<gen_image>keep remaining part of image unchanged.</gen_image>'
             '<region>[{"bbox_2d": [12, 20, 60, 70], "point_2d": [36, 45], "hint": "a blue square"}]</region>')


# ---------------------------------------------------------------------------------------------------- stand-ins
class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 makes bursts of connections wait for SYN retries (1 s)


class _Server:
    """One ThreadingHTTPServer on 127.0.0.1 (ephemeral port) in a daemon thread, with a call log."""

    def __init__(self, handler):
        self.httpd = _HTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.payloads: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, name: str) -> int:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            return self.calls[name]

    def enter(self):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def leave(self):
        with self.lock:
            self.active -= 1

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class JSONHandler(BaseHTTPRequestHandler):
    """Base for local stand-in servers (here and in tests): quiet, JSON replies, tolerant of clients that gave up."""

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        """Reply with ``payload`` (JSON-encoded unless already bytes) and optional extra headers."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout tests)
            pass


class _Handler(JSONHandler):
    protocol_version = "HTTP/1.1"

    @property
    def owner(self):
        return self.server.owner

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            return {}


class StandIns:
    """A stand-in edit server and judge. ``health_503``: the first k ``/health`` calls answer 503 ``loading``;
    ``edit_faults``/``judge_faults``: ``{call number (1-based): "500" | "hang"}`` (``hang`` sleeps ``hang_seconds``
    before answering, past the client's timeout); ``scores``: the judge's reply for every dimension."""

    def __init__(self, edit_latency: float = 0.0, judge_latency: float = 0.0, health_503: int = 0,
                 edit_faults: dict | None = None, judge_faults: dict | None = None, hang_seconds: float = 3.0,
                 scores: dict | None = None, judge_model: str = JUDGE_MODEL):
        self.edit_latency, self.judge_latency, self.health_503 = edit_latency, judge_latency, health_503
        self.edit_faults, self.judge_faults = dict(edit_faults or {}), dict(judge_faults or {})
        self.hang_seconds, self.judge_model = hang_seconds, judge_model
        self.scores = scores or {"target_score": 5, "effect_score": 5, "consistency_score": 5}
        self.edit = _Server(self._edit_handler())
        self.judge = _Server(self._judge_handler())

    @property
    def edit_url(self) -> str:
        return self.edit.url

    @property
    def judge_url(self) -> str:
        return self.judge.url + "/v1"

    def __enter__(self):
        self.edit.start()
        self.judge.start()
        return self

    def __exit__(self, *exc):
        self.edit.stop()
        self.judge.stop()

    def _fault(self, handler, faults: dict, n: int) -> bool:
        fault = faults.get(n)
        if fault == "500":
            handler._send(500, {"detail": "injected failure"})
            return True
        if fault == "hang":
            time.sleep(self.hang_seconds)
            handler._send(500, {"detail": "too late"})
            return True
        return False

    def _edit_handler(self):
        outer = self

        class Edit(_Handler):
            def do_GET(self):
                if self.path != "/health":
                    return self._send(404, {"detail": "not found"})
                n = self.owner.count("health")
                if n <= outer.health_503:
                    return self._send(503, {"status": "loading"})
                self._send(200, {"status": "ready"})

            def do_POST(self):
                if self.path != "/v1/plans/execute":
                    return self._send(404, {"detail": "not found"})
                body = self._body()
                n = self.owner.count("execute")
                self.owner.enter()
                try:
                    fields = ("image_base64", "response", "instruction")
                    missing = [k for k in fields if not isinstance(body.get(k), str)]
                    if missing:
                        return self._send(422, {"detail": f"missing {missing}"})
                    with self.owner.lock:
                        self.owner.payloads.append({"instruction": body["instruction"], "response": body["response"]})
                    if outer._fault(self, outer.edit_faults, n):
                        return
                    time.sleep(outer.edit_latency)
                    image = Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))).convert("RGB")
                    buf = io.BytesIO()
                    ImageOps.invert(image).save(buf, format="PNG")
                    self._send(200, {"image_base64": base64.b64encode(buf.getvalue()).decode(), "plan": {},
                                     "seconds": outer.edit_latency})
                finally:
                    self.owner.leave()

        return Edit

    def _judge_handler(self):
        outer = self

        class Judge(_Handler):
            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, {"detail": "not found"})
                self._send(200, {"object": "list", "data": [{"id": outer.judge_model, "object": "model"}]})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"detail": "not found"})
                body = self._body()
                n = self.owner.count("chat")
                self.owner.enter()
                try:
                    if outer._fault(self, outer.judge_faults, n):
                        return
                    time.sleep(outer.judge_latency)
                    images = sum(1 for m in body.get("messages", []) for p in (m.get("content") or [])
                                 if isinstance(p, dict) and p.get("type") == "image_url")
                    content = json.dumps({**outer.scores, "reasoning": f"stand-in judge saw {images} images"})
                    self._send(200, {"id": f"chat-{n}", "object": "chat.completion", "model": body.get("model"),
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}]})
                finally:
                    self.owner.leave()

        return Judge


def sample_image(i: int = 0, size=(96, 80)) -> Image.Image:
    image = Image.new("RGB", size, (120 + 10 * (i % 10), 160, 200))
    image.paste((220, 30, 30), (12, 20, 60, 70))
    return image


def samples(n: int) -> list[dict]:
    return [{"image": sample_image(i), "instruction": "make the red square blue",
             "referring_expression": "the red square", "response": GOOD_PLAN} for i in range(n)]


# ---------------------------------------------------------------------------------------------------- benchmark
