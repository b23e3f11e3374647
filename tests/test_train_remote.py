"""Stage-2 remote reward against real local HTTP servers standing in for the edit server and the judge: readiness,
retries, timeouts, refusals, bounded concurrency, the request shapes, and values equal to hand computation."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from replan.eval.judges import JudgeConfigError, load_templates
from replan.testing.standins import JSONHandler
from replan.train.remote import (
    EditClient,
    EditError,
    JudgeClient,
    RewardConfig,
    RewardServerError,
    Stage2Reward,
    load_reward_templates,
)
from replan.train.rewards import PLANNING_KEYS

MODEL = "stand-in/judge-vl"
THINK = "The red apple on the left must turn blue; only that apple changes, the rest of the image stays as it is."
GEN = "keep remaining part of image unchanged."
SCORE_KEY = {"target_score": "target", "effect_score": "effect", "consistency_score": "consistency"}


def reply(n: int = 1, box=None) -> str:
    items = [{"bbox_2d": box or [10 + 20 * i, 10, 25 + 20 * i, 40], "hint": f"paint apple {i} blue"} for i in range(n)]
    return f"<think>{THINK}</think><gen_image>{GEN}</gen_image><region>{json.dumps(items)}</region>"


def picture(seed: int, size=(96, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_bytes(image: Image.Image) -> bytes:
    return base64.b64decode(b64png(image))


def unpng(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


DEFAULT = object()


def sample(instruction="make apple blue", response=DEFAULT, image=DEFAULT, referring="the left apple") -> dict:
    return {"image": picture(0) if image is DEFAULT else image, "instruction": instruction,
            "referring_expression": referring, "response": reply() if response is DEFAULT else response}


# --------------------------------------------------------------------------------------------------- stand-ins
class Standin:
    """A ThreadingHTTPServer on 127.0.0.1:0 in a daemon thread. ``health`` / ``script`` are lists of steps popped
    per request: ``(status, body)``, ``("sleep", s)`` (then the default reply) or ``None`` (the default). Records
    every request with its arrival time and the high-water mark of concurrent POSTs.

    A POST counts as in flight from its arrival until its reply is ready, and stops counting *before* the reply is
    sent: a client may send its next request as soon as it has the reply, so counting the send too would see one
    request too many. With ``batch = n`` (and ``expected`` POSTs in all) each POST is held until the n POSTs of its
    batch have all arrived, so a client that allows n at once is seen with exactly n in flight, however slow the
    machine; one that allows fewer never fills a batch and the test fails on the count."""

    def __init__(self):
        self.health: list = []
        self.script: list = []
        self.requests: list[dict] = []
        self.events: list[tuple[float, str]] = []
        self.active = self.peak = 0
        self.delay = 0.0
        self.batch, self.expected, self.arrived = 0, 0, 0
        self.lock = threading.Lock()
        self.arrival = threading.Condition(self.lock)
        outer = self

        class Handler(JSONHandler):
            def do_GET(self):
                step = outer._pop(outer.health)
                outer.events.append((time.monotonic(), f"GET {self.path}"))
                self._send(*(step if step is not None else outer.default_get(self.path)))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {"path": self.path, "headers": self.headers, "body": json.loads(raw)}
                with outer.arrival:
                    outer.requests.append(request)
                    outer.events.append((time.monotonic(), f"POST {self.path}"))
                    outer.active += 1
                    outer.peak = max(outer.peak, outer.active)
                    ticket, outer.arrived = outer.arrived, outer.arrived + 1
                    outer.arrival.notify_all()
                    if outer.batch:
                        full = min((ticket // outer.batch + 1) * outer.batch, outer.expected or 1 << 30)
                        outer.arrival.wait_for(lambda: outer.arrived >= full, timeout=300)
                try:
                    time.sleep(outer.delay)
                    step = outer._pop(outer.script)
                    if callable(step):
                        step = step(request)
                    if isinstance(step, tuple) and step[0] == "sleep":
                        time.sleep(step[1])
                        step = None
                    reply = step if step is not None else outer.default_post(request)
                finally:
                    with outer.lock:
                        outer.active -= 1
                self._send(*reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _pop(self, steps):
        with self.lock:
            return steps.pop(0) if steps else None

    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["path"] != "/health"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class EditStandin(Standin):
    """The edit server: the edited image is the input with its colours inverted."""

    def default_get(self, path):
        return (200, {"status": "ready", "model_ready": True}) if path == "/health" else (404, {"detail": "no"})

    def default_post(self, request):
        if request["path"] != "/v1/plans/execute":
            return 404, {"detail": "Not Found"}
        edited = Image.fromarray(255 - np.asarray(unpng(request["body"]["image_base64"])))
        return 200, {"image_base64": b64png(edited), "plan": {"regions": []}, "seconds": 0.01}


class JudgeStandin(Standin):
    """The judge: ``scores[instruction][dimension]`` (default 5); ``"garbage"`` answers prose without a score."""

    def __init__(self):
        self.scores: dict[str, dict[str, int | str]] = {}
        super().__init__()

    def default_get(self, path):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        return 404, {"error": {"message": "not found"}}

    def default_post(self, request):
        dimension, instruction = self.read(request)
        value = self.scores.get(instruction, {}).get(dimension, 5)
        key = {v: k for k, v in SCORE_KEY.items()}[dimension]
        content = "I am not sure about this one." if value == "garbage" else json.dumps({"reasoning": "r", key: value})
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}

    @staticmethod
    def read(request) -> tuple[str, str]:
        texts = "".join(p.get("text", "") for p in request["body"]["messages"][0]["content"])
        dimension = next(d for k, d in SCORE_KEY.items() if f'"{k}"' in texts)
        return dimension, re.search(r"\*\*Editing Instruction\*\*: (.*)", texts).group(1).strip()


@pytest.fixture
def edit_server():
    server = EditStandin()
    yield server
    server.close()


@pytest.fixture
def judge_server():
    server = JudgeStandin()
    yield server
    server.close()


def make_reward(edit_server, judge_server, concurrency=4, judge_concurrency=None, **kw) -> Stage2Reward:
    edit = EditClient(edit_server.url, timeout=kw.pop("edit_timeout", 5.0), max_retries=kw.pop("edit_retries", 2),
                      backoff=0.01)
    judge = JudgeClient(judge_server.url + "/v1", MODEL, timeout=kw.pop("judge_timeout", 5.0),
                        max_retries=kw.pop("judge_retries", 1),
                        backoff=0.01)
    return Stage2Reward(edit, judge, concurrency, judge_concurrency=judge_concurrency, ready_interval=0.02, **kw)


def check_keys(results):
    for r in results:
        assert tuple(r) == PLANNING_KEYS
        assert all(isinstance(v, (int, float)) for v in r.values())


# --------------------------------------------------------------------------------------------------- tests
def test_values_equal_hand_computation(edit_server, judge_server):
    judge_server.scores = {"half": {"effect": 3}, "no target": {"target": 1, "consistency": 3}}
    samples = [
        sample(),                                           # 5/5/5 → 1 + .2·.905
        sample("half"),                                     # T1 E0 C1 → 1/3 + .181
        sample("no target"),                                # T0 E1 C0 → 1/3 + .181
        sample(response="garbage"),                         # not executed: .2·(−6)
        sample(response=reply(0)),                          # [] → not executed: .2·.825
        sample(response=reply(7)),                          # 7 regions → not executed: .2·.865
        sample(response=reply(1, box=[50, 40, 10, 10])),    # swapped box → not executed: .2·.905
        sample(instruction=""),                             # missing instruction → .2·.905, logged
        sample(image=None),                                 # missing image → .2·.905
        sample(referring=None),                             # missing referring expression → .2·.905
    ]
    reward = make_reward(edit_server, judge_server)
    results = reward(samples)
    check_keys(results)
    expected = [1.181, 1 / 3 + 0.181, 1 / 3 + 0.181, -1.2, 0.165, 0.173, 0.181, 0.181, 0.181, 0.181]
    assert [r["overall"] for r in results] == pytest.approx(expected)
    assert [r["executed"] for r in results] == [True] * 3 + [False] * 7
    assert [r["missing_input"] for r in results] == [False] * 7 + [True] * 3
    assert not any(r["edit_failed"] or r["judge_failed"] for r in results)
    assert (results[1]["target"], results[1]["effect"], results[1]["consistency"]) == (1, 0, 1)
    assert (results[1]["effect_score"], results[2]["target_score"], results[2]["consistency_score"]) == (3, 1, 3)
    assert results[0]["editing"] == pytest.approx(0.905) and results[0]["planning"] == 1.0
    # only the three executable plans reached the edit server, each judged on three dimensions
    assert len(edit_server.posts()) == 3 and len(judge_server.posts()) == 9
    assert "7 regions" in reward.last_details[5]["reason"] and "instruction" in reward.last_details[7]["reason"]


def test_requests_carry_the_image_plan_instruction_and_interleaved_images(edit_server, judge_server):
    image = picture(3, (80, 48))
    response = "  \n" + reply(2) + "\n"
    make_reward(edit_server, judge_server)([sample("turn it blue", response, image)])
    (post,) = edit_server.posts()
    assert set(post["body"]) == {"image_base64", "response", "instruction", "box_frame", "planner_size", "parse"}
    assert post["body"]["parse"] == "official"  # read as the official reward server: boxes outside are executed
    # 80x48: smart_resize rounds each side to a multiple of 28 → 84x56, the frame the policy saw
    assert post["body"]["box_frame"] == "processor" and post["body"]["planner_size"] == [84, 56]
    assert same(unpng(post["body"]["image_base64"]), image)
    assert post["body"]["response"] == reply(2) and post["body"]["instruction"] == "turn it blue"
    edited = Image.fromarray(255 - np.asarray(image))
    for request in judge_server.posts():
        body = request["body"]
        assert body["model"] == MODEL and body["temperature"] == 0.0 and body["max_tokens"] == 1024
        kinds = [p["type"] for p in body["messages"][0]["content"]]
        assert kinds == ["text", "image_url", "text", "image_url", "text", "text"]
        content = body["messages"][0]["content"]
        assert content[0]["text"].endswith("**Original Image**:") and content[2]["text"].endswith("**Edited Image**:")
        urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        assert all(u.startswith("data:image/png;base64,") for u in urls)
        assert same(unpng(urls[0].split(",", 1)[1]), image) and same(unpng(urls[1].split(",", 1)[1]), edited)
        assert "the left apple" in content[2]["text"] and "turn it blue" in content[2]["text"]
    assert sorted(JudgeStandin.read(r)[0] for r in judge_server.posts()) == ["consistency", "effect", "target"]


def test_readiness_wait_sends_nothing_before_both_servers_are_ready(edit_server, judge_server):
    edit_server.health = [(503, {"status": "loading"})] * 3 + [(200, {"status": "loading"})]
    judge_server.health = [(503, {"message": "loading"})] * 2
    reward = make_reward(edit_server, judge_server)
    results = reward([sample(), sample()])
    assert [r["overall"] for r in results] == pytest.approx([1.181, 1.181])
    ready_at = max(t for t, e in edit_server.events if e == "GET /health")
    assert sum(e == "GET /health" for _, e in edit_server.events) == 5
    assert min(t for t, e in edit_server.events if e.startswith("POST")) > ready_at
    assert sum(e == "GET /v1/models" for _, e in judge_server.events) == 3
    reward([sample()])  # ready once: no more polling
    assert sum(e == "GET /health" for _, e in edit_server.events) == 5


def test_readiness_failures_raise_clearly(edit_server, judge_server):
    edit = EditClient(edit_server.url, backoff=0.01)
    edit_server.health = [(503, {"status": "loading"}), (500, {"status": "failed", "detail": "CUDA out of memory"})]
    with pytest.raises(RewardServerError, match="failed to load its model: CUDA out of memory"):
        asyncio.run(edit.wait_ready(5, 0.01))
    edit_server.health = [(503, {"status": "loading"})] * 1000
    with pytest.raises(RewardServerError, match="not ready after 0.3 s; last: HTTP 503, status 'loading'"):
        asyncio.run(edit.wait_ready(0.3, 0.02))
    assert len(edit_server.health) > 900  # it stopped at the timeout instead of polling on
    edit_server.health = []
    with pytest.raises(RewardServerError, match="HTTP 404"):
        asyncio.run(EditClient(edit_server.url + "/v1").wait_ready(5, 0.01))
    with pytest.raises(RewardServerError, match="not ready"):
        asyncio.run(EditClient("http://127.0.0.1:9").wait_ready(0.2, 0.02))
    judge = JudgeClient(judge_server.url + "/v1", "other/model")
    with pytest.raises(JudgeConfigError, match="serves .*stand-in/judge-vl.*not 'other/model'"):
        asyncio.run(judge.wait_ready(5, 0.01))
    judge_server.health = [(401, {"error": {"message": "bad key"}})]
    with pytest.raises(JudgeConfigError, match="refused the API key"):
        asyncio.run(JudgeClient(judge_server.url + "/v1", MODEL).wait_ready(5, 0.01))
    with pytest.raises(JudgeConfigError, match="/models"):
        asyncio.run(JudgeClient(judge_server.url, MODEL).wait_ready(5, 0.01))


def test_edit_5xx_and_timeouts_are_retried(edit_server, judge_server):
    edit_server.script = [(500, {"detail": "boom"}), (503, {"detail": "Model is loading"}), ("sleep", 1.0)]
    reward = make_reward(edit_server, judge_server, edit_timeout=0.3, edit_retries=3)
    (result,) = reward([sample()])
    assert result["overall"] == pytest.approx(1.181) and not result["edit_failed"]
    assert len(edit_server.posts()) == 4


def test_edit_malformed_reply_is_retried(edit_server, judge_server):
    edit_server.script = [(200, b"not json"), (200, {"plan": {}}), (200, {"image_base64": "!!!"})]
    (result,) = make_reward(edit_server, judge_server, edit_retries=3)([sample()])
    assert result["overall"] == pytest.approx(1.181) and len(edit_server.posts()) == 4


def test_edit_400_is_final_and_persistent_500_gives_up(edit_server, judge_server):
    edit_server.script = [(400, {"detail": "bad image"})]
    reward = make_reward(edit_server, judge_server, edit_retries=2)
    (result,) = reward([sample()])
    assert result["edit_failed"] and result["executed"] and not result["judge_failed"]
    assert result["overall"] == pytest.approx(0.181) and result["planning"] == 0
    assert len(edit_server.posts()) == 1 and not judge_server.posts()
    assert "HTTP 400: bad image" in reward.last_details[0]["edit_error"]
    edit_server.script = [(500, {"detail": "x"})] * 3
    (result,) = reward([sample()])
    assert result["edit_failed"] and result["overall"] == pytest.approx(0.181)
    assert len(edit_server.posts()) == 4  # 1 + 3 attempts
    assert "after 3 attempt(s)" in reward.last_details[0]["edit_error"]


def test_edit_client_alone(edit_server):
    client = EditClient(edit_server.url, max_retries=0, backoff=0)
    image = picture(5)
    out = asyncio.run(client.execute(image, reply(), "x"))
    assert same(out, Image.fromarray(255 - np.asarray(image)))
    edit_server.script = [(422, {"detail": "unprocessable"})]
    with pytest.raises(EditError) as info:
        asyncio.run(client.execute(image, reply(), "x"))
    assert info.value.status == 422
    with pytest.raises(ValueError, match="http"):
        EditClient("localhost:8001")


def test_judge_malformed_replies_and_fallbacks(edit_server, judge_server):
    judge_server.scores = {"bad effect": {"effect": "garbage"}, "bad target": {"target": 4}}
    judge_server.script = [lambda r: (200, {"choices": [{"message": {"content": "5"}}]})]  # a bare digit parses
    reward = make_reward(edit_server, judge_server, judge_retries=1, concurrency=1, judge_concurrency=1)
    results = reward([sample(), sample("bad effect"), sample("bad target")])
    check_keys(results)
    assert results[0]["overall"] == pytest.approx(1.181) and not results[0]["judge_failed"]
    assert results[1]["judge_failed"] and results[1]["effect"] == 0 and results[1]["effect_score"] == 0
    assert results[1]["planning"] == pytest.approx(1 / 3)  # T only: C·E = 0
    # target 4 is off its 5|1 scale: used as given (official), 4 >= 4 gives T = 1, asked once, counted
    assert not results[2]["judge_failed"] and results[2]["target"] == 1 and results[2]["target_score"] == 4
    assert results[2]["planning"] == 1.0 and results[2]["off_scale"] == 1 and results[0]["off_scale"] == 0
    attempts = [JudgeStandin.read(r) for r in judge_server.posts()]
    assert attempts.count(("effect", "bad effect")) == 2 and attempts.count(("target", "bad target")) == 1
    assert "effect" in reward.last_details[1]["judge_errors"]


def test_strict_score_parse_fails_an_off_scale_score_without_asking_again(edit_server, judge_server):
    judge_server.scores = {"bad target": {"target": 4}}
    edit = EditClient(edit_server.url, timeout=5.0, backoff=0.01)
    judge = JudgeClient(judge_server.url + "/v1", MODEL, timeout=5.0, max_retries=3, backoff=0.01,
                        score_parse="strict")
    (result,) = Stage2Reward(edit, judge, 1, ready_interval=0.02)([sample("bad target")])
    assert result["judge_failed"] and result["target"] == 0 and result["target_score"] == 0 and result["off_scale"] == 0
    assert result["planning"] == pytest.approx(2 / 3)  # E and C·E
    assert [JudgeStandin.read(r)[0] for r in judge_server.posts()].count("target") == 1


def test_judge_server_errors_count_as_failed_and_wrong_key_stops(edit_server, judge_server):
    judge_server.script = [(500, {"error": {"message": "overloaded"}})] * 2
    reward = make_reward(edit_server, judge_server, judge_retries=1, concurrency=1, judge_concurrency=1)
    (result,) = reward([sample()])
    assert result["judge_failed"] and result["target"] == 0 and result["planning"] == pytest.approx(2 / 3)
    judge_server.script = [(401, {"error": {"message": "invalid key"}})] * 3
    with pytest.raises(JudgeConfigError, match="refused the key"):
        reward([sample()])


@pytest.mark.parametrize(("concurrency", "judge_concurrency"), [(2, 3), (3, 1)])
def test_concurrency_limits_are_respected(edit_server, judge_server, concurrency, judge_concurrency):
    edit_server.batch, edit_server.expected = concurrency, 8
    judge_server.batch, judge_server.expected = judge_concurrency, 24
    # held requests wait for their batch: long client timeouts, so a slow machine never turns the wait into a retry
    reward = make_reward(edit_server, judge_server, concurrency, judge_concurrency, edit_timeout=120,
                         judge_timeout=120)
    results = reward([sample() for _ in range(8)])
    assert [r["overall"] for r in results] == pytest.approx([1.181] * 8)
    assert edit_server.peak == concurrency
    assert judge_server.peak == judge_concurrency
    assert len(edit_server.posts()) == 8 and len(judge_server.posts()) == 24


def test_concurrency_limits_hold_across_concurrent_score_calls(edit_server, judge_server):
    """verl scores every sample in its own ``score`` call: the limits bound them all together."""
    edit_server.delay, judge_server.delay = 0.1, 0.05
    reward = make_reward(edit_server, judge_server, 2, 3)

    async def one_call_per_sample():
        return await asyncio.gather(*(reward.score([sample()]) for _ in range(6)))

    results = asyncio.run(one_call_per_sample())
    assert [r[0]["overall"] for r in results] == pytest.approx([1.181] * 6)
    assert edit_server.peak == 2 and judge_server.peak == 3
    assert len(edit_server.posts()) == 6 and len(judge_server.posts()) == 18


def test_sync_call_works_inside_a_running_event_loop(edit_server, judge_server):
    reward = make_reward(edit_server, judge_server)

    async def inside():
        return reward([sample()]), await reward.score([sample()])

    first, second = asyncio.run(inside())
    assert first[0]["overall"] == pytest.approx(1.181) == second[0]["overall"]


def test_odd_samples_never_raise(edit_server, judge_server):
    results = make_reward(edit_server, judge_server)([
        None, {}, {"response": b"<think>x</think>"}, sample(image=b"not an image"), sample(image="/no/such.png"),
        sample(response=None), sample(response=reply().encode()),
        {"image": {"bytes": png_bytes(picture(1))}, "instruction": "a",
         "referring_expression": "b", "response": reply()},
    ])
    check_keys(results)
    assert [r["missing_input"] for r in results] == [True] * 5 + [False] * 3
    assert [r["executed"] for r in results] == [False] * 6 + [True, True]
    assert results[6]["overall"] == pytest.approx(1.181) and results[7]["overall"] == pytest.approx(1.181)


def test_reward_config_from_yaml_and_build(tmp_path, edit_server, judge_server, monkeypatch):
    path = tmp_path / "stage2.yaml"
    path.write_text(f"model: x\nreward:\n  edit_url: {edit_server.url}\n  judge_url: {judge_server.url}/v1\n"
                    f"  judge_model: {MODEL}\n  judge_api_key_env: MY_JUDGE_KEY\n  concurrency: 2\n"
                    "  judge_concurrency: 5\n  backoff: 0.01\n  ready_interval: 0.02\n")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
    config = RewardConfig.from_yaml(path)
    assert config.judge_model == MODEL and config.concurrency == 2 and config.edit_timeout == 600.0
    reward = Stage2Reward.from_config(config)
    assert reward.concurrency == 2 and reward.judge_concurrency == 5 and reward.judge.model == MODEL
    assert reward([sample()])[0]["overall"] == pytest.approx(1.181)
    assert judge_server.posts()[0]["headers"]["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(reward.judge)
    with pytest.raises(ValueError, match="unknown reward setting"):
        RewardConfig.from_dict({"judge_modle": "x"})
    with pytest.raises(ValueError, match="no 'rewards' section"):
        RewardConfig.from_yaml(path, section="rewards")
    with pytest.raises(JudgeConfigError, match="judge_model"):
        RewardConfig(edit_url=edit_server.url).build()
    reward.close()


def test_templates_are_the_eval_rubrics():
    """As official, the training judge uses the eval rubrics (the same files)."""
    templates, rubrics = load_reward_templates(), load_templates()
    assert templates == {"target": rubrics["target_following"], "effect": rubrics["effect"],
                         "consistency": rubrics["consistency"]}
    with pytest.raises(ValueError, match="does not exist"):
        load_reward_templates("/no/such/dir")
