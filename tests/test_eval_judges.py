"""Judge prompts, reply parsing and both judge backends against a real local HTTP server (OpenAI chat-completions and
the Gemini REST API that google-genai speaks), with scripted replies."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from replan.eval.judges import (
    DEFAULT_MODEL,
    EDITED_MARKER,
    ORIGINAL_MARKER,
    SCALES,
    SCORE_KEYS,
    GenAIJudge,
    JudgeConfigError,
    JudgeOffScale,
    JudgeParseError,
    OpenAIJudge,
    build_parts,
    is_off_scale,
    load_templates,
    parse_judgement,
    parts_digest,
    render,
)
from replan.eval.scoring import DIMENSIONS
from replan.testing.standins import JSONHandler

MODEL = "test/judge-vl"
KEY = "sk-judge-123"
INSTRUCTION = "make the leftmost red square blue"
REFERRING = "the leftmost red square"
ENV_VARS = ("REPLAN_JUDGE_BASE_URL", "OPENAI_BASE_URL", "REPLAN_JUDGE_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY",
            "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_GENAI_USE_VERTEXAI",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def picture(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


ORIGINAL, EDITED = picture(1), picture(2, (56, 40))
REAL_KEY = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")  # read before clean_env runs


def chat(content) -> dict:
    return {"id": "c1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def gemini(*texts, finish="STOP", thought=None) -> dict:
    parts = ([{"text": thought, "thought": True}] if thought else []) + [{"text": t} for t in texts]
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}],
            "modelVersion": MODEL}


def png(data_b64: str, urlsafe: bool = False) -> Image.Image:
    data = base64.urlsafe_b64decode(data_b64) if urlsafe else base64.b64decode(data_b64, validate=True)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------------- the server
class Server:
    """Chat-completions (``/v1/chat/completions``) and Gemini (``.../models/<m>:generateContent``) on one port.

    Each request takes the next step of ``script``: ``(status, body)``, ``("sleep", s)`` (then the default), or a
    callable. Without a script the reply is valid JSON with the dimension's highest score. Every request's shape is
    asserted; a violation is recorded in ``errors`` and answered with HTTP 400.
    """

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        self.errors: list[str] = []
        server = self

        class Handler(JSONHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {"path": self.path, "headers": self.headers, "body": json.loads(raw)}
                server.requests.append(request)
                kind = "openai" if self.path == "/v1/chat/completions" else "gemini"
                try:
                    request["dimension"], request["images"] = server.check(kind, request)
                except Exception as e:  # noqa: BLE001 - any shape problem is the client's fault here
                    server.errors.append(f"{type(e).__name__}: {e}")
                    return self._send(400, {"error": {"message": f"bad request shape: {e}"}})
                step = server.script.pop(0) if server.script else None
                if callable(step):
                    step = step(request)
                if isinstance(step, tuple) and step[0] == "sleep":
                    time.sleep(step[1])
                    step = None
                if step is None:
                    key = SCORE_KEYS[request["dimension"]]
                    text = json.dumps({"reasoning": "looks right", key: max(SCALES[request["dimension"]])})
                    step = (200, chat(text) if kind == "openai" else gemini(text))
                self._send(*step)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.root + "/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def check(self, kind: str, request: dict) -> tuple[str, list]:
        """The request carries text and images in template order: each image right after its marker."""
        body, headers = request["body"], request["headers"]
        if kind == "openai":
            assert headers.get("Authorization") == f"Bearer {KEY}", headers.get("Authorization")
            assert body["model"] == MODEL, body["model"]
            assert body["response_format"] == {"type": "json_object"}
            assert body["max_tokens"] >= 8192
            (message,) = body["messages"]
            assert message["role"] == "user"
            parts = message["content"]
            hint = parts.pop()
            assert hint["type"] == "text" and hint["text"].startswith("Please output valid JSON adhering to this")
            schema = json.loads(hint["text"].split("schema: ", 1)[1])
            items = [("text", p["text"]) if p["type"] == "text" else ("image", png(p["image_url"]["url"].split(
                "data:image/png;base64,", 1)[1])) for p in parts]
            assert all(p["type"] == "text" or p["image_url"]["url"].startswith("data:image/png;base64,")
                       for p in parts)
        else:
            assert re.fullmatch(rf"/v1\w*/models/{re.escape(MODEL)}:generateContent", request["path"]), request["path"]
            assert headers.get("x-goog-api-key") == KEY
            config = body["generationConfig"]
            assert config["responseMimeType"] == "application/json" and config["maxOutputTokens"] >= 8192
            schema = config["responseSchema"]
            (content,) = body["contents"]
            assert content["role"] == "user"
            items = [("text", p["text"]) if "text" in p else ("image", png(p["inlineData"]["data"], urlsafe=True))
                     for p in content["parts"]]
            assert all("text" in p or p["inlineData"]["mime_type"] == "image/png" for p in content["parts"])
        (key,) = [k for k in schema["properties"] if k != "reasoning"]
        assert set(schema["required"]) == {"reasoning", key}
        dimension = {v: k for k, v in SCORE_KEYS.items()}[key]
        kinds = [k for k, _ in items]
        texts = [v for k, v in items if k == "text"]
        images = [v for k, v in items if k == "image"]
        if dimension == "quality":
            assert kinds == ["text", "image", "text"], kinds
            assert texts[0].endswith(EDITED_MARKER) and ORIGINAL_MARKER not in "".join(texts)
            assert INSTRUCTION not in "".join(texts)  # as official: the quality judge sees the edited image only
        else:
            assert kinds == ["text", "image", "text", "image", "text"], kinds
            assert texts[0].endswith(ORIGINAL_MARKER) and texts[1].endswith(EDITED_MARKER)
            assert f"**Editing Instruction**: {INSTRUCTION}" in texts[1] and REFERRING in texts[1]
        assert "{{{" not in "".join(texts)
        return dimension, images

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


@pytest.fixture(scope="module")
def templates():
    return load_templates()


def parts_for(templates, dimension: str) -> list:
    return build_parts(dimension, templates[dimension], INSTRUCTION, REFERRING, ORIGINAL, EDITED)


def openai_judge(server, **kw) -> OpenAIJudge:
    return OpenAIJudge(MODEL, base_url=server.url, api_key=KEY, **{"backoff": 0.0, **kw})


def genai_judge(server, **kw) -> GenAIJudge:
    return GenAIJudge(MODEL, api_key=KEY, base_url=server.root, **{"backoff": 0.0, **kw})


# --------------------------------------------------------------------------------------------------- templates
def test_default_templates_have_the_scales_markers_and_placeholders(templates):
    assert set(templates) == set(DIMENSIONS)
    for dim, text in templates.items():
        assert SCORE_KEYS[dim] in text and text.count(EDITED_MARKER) == 1
        assert text.count(ORIGINAL_MARKER) == (0 if dim == "quality" else 1)
        placeholders = set(re.findall(r"\{\{\{([^{}]+)\}\}\}", text))
        assert placeholders == (set() if dim == "quality" else {"instruct", "ref_exp"}), dim  # the official names
    assert "(1 to 5)" in templates["quality"] and "[5 or 1]" in templates["target_following"]
    assert "[5, 3, or 1]" in templates["effect"] and "[5, 3, or 1]" in templates["consistency"]


def test_build_parts_puts_each_image_after_its_marker(templates):
    quality = parts_for(templates, "quality")
    assert [type(p) for p in quality] == [str, Image.Image, str] and quality[1] is EDITED
    assert quality[0].endswith(EDITED_MARKER)
    effect = parts_for(templates, "effect")
    assert [isinstance(p, str) for p in effect] == [True, False, True, False, True]
    assert effect[1] is ORIGINAL and effect[3] is EDITED
    # an instruction that contains a marker or a placeholder cannot move an image or be substituted again
    tricky = build_parts("effect", templates["effect"], f"write '{EDITED_MARKER}' {{{{{{ref_exp}}}}}}",
                         REFERRING, ORIGINAL, EDITED)
    assert tricky[1] is ORIGINAL and tricky[3] is EDITED and "{{{ref_exp}}}" in tricky[2]
    assert f"**Editing Instruction**: write '{EDITED_MARKER}'" in tricky[2] and REFERRING in tricky[2]
    assert parts_digest("effect", effect) != parts_digest("effect", tricky)
    assert parts_digest("effect", effect) == parts_digest("effect", parts_for(templates, "effect"))
    assert render("a {{x}} {{{ instruction }}} {{{instruction}}}", {"instruction": "I"}) == "a {{x}} I I"


def test_custom_templates_load_and_bad_ones_raise_clear_errors(tmp_path, templates):
    for dim, text in templates.items():
        (tmp_path / f"{dim}.txt").write_text("Custom. " + text)
    assert load_templates(tmp_path)["effect"].startswith("Custom. ")
    # replan's earlier placeholder names still work
    (tmp_path / "effect.txt").write_text(templates["effect"].replace("{{{instruct}}}", "{{{instruction}}}"))
    effect = load_templates(tmp_path)["effect"]
    assert INSTRUCTION in "".join(p for p in build_parts("effect", effect, INSTRUCTION, REFERRING, ORIGINAL, EDITED)
                                  if isinstance(p, str))
    cases = {
        "effect": (templates["effect"].replace("{{{ref_exp}}}", "REF"), "{{{ref_exp}}}"),
        "quality": (templates["quality"] + "{{{instrucion}}}", "unknown placeholder"),
        "consistency": (templates["consistency"].replace(ORIGINAL_MARKER, "Original:"), "Original Image"),
        "target_following": (templates["target_following"] + EDITED_MARKER, "exactly 1"),
    }
    for dim, (text, message) in cases.items():
        bad = tmp_path / f"bad_{dim}"
        bad.mkdir()
        for d in DIMENSIONS:
            (bad / f"{d}.txt").write_text(text if d == dim else templates[d])
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            load_templates(bad)
        assert f"{dim}.txt" in str(info.value)
    (tmp_path / "effect.txt").unlink()
    with pytest.raises(ValueError, match=r"effect\.txt does not exist"):
        load_templates(tmp_path)


# --------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("dimension,text,score", [
    ("effect", '{"reasoning": "ok", "effect_score": 3}', 3),
    ("effect", 'Sure.\n```json\n{"reasoning": "ok", "effect_score": 5}\n```\nDone', 5),
    ("quality", 'Here:\n```\n{"reasoning": "ok", "quality_score": 2}\n```', 2),
    ("consistency", 'My verdict is {"reasoning": "fine", "consistency_score": 1} overall.', 1),
    ("target_following", '{"reasoning": "x", "target_score": "5"}', 5),
    ("quality", '{"reasoning": "x", "quality_score": 4.0}', 4),
    ("quality", "<think>maybe 2 or 3</think>{\"reasoning\": \"x\", \"quality_score\": 4}", 4),
    ("target_following", "5", 5),
    ("effect", "  3\n", 3),
    ("quality", "I give it 4/4.", 4),
    ("consistency", "Reasoning: step 1 looks fine, step 2 too.\nconsistency_score: 5", 5),
    ("effect", '{"reasoning": "the text reads OPEN", "effect_score": 5', 5),  # truncated JSON: the labelled number
], ids=["json", "fenced-json", "bare-fence", "embedded", "string", "float", "think", "digit", "digit-ws", "4/4",
        "labelled", "truncated"])
def test_parse_judgement_fallbacks(dimension, text, score):
    assert parse_judgement(text, dimension)[0] == score


@pytest.mark.parametrize("dimension,text", [
    ("quality", '{"reasoning": "x", "quality_score": true}'),
    ("quality", '{"reasoning": "x", "quality_score": NaN}'),
    ("effect", '{"reasoning": "x", "effect_score": Infinity}'),
    ("effect", '{"reasoning": "x", "effect_score": "four"}'),
    ("effect", '{"reasoning": "x"}'),
    ("effect", "It is a 4 out of 5."),  # ambiguous
    ("quality", "no idea"),
    ("quality", ""),
    ("quality", "<think>5</think>"),
], ids=["bool", "nan", "inf", "word", "no-key", "ambiguous", "words", "empty", "only-think"])
def test_parse_judgement_rejects_replies_without_a_number(dimension, text):
    for score_parse in ("official", "strict"):
        with pytest.raises(JudgeParseError) as info:
            parse_judgement(text, dimension, score_parse)
        assert not isinstance(info.value, JudgeOffScale)


@pytest.mark.parametrize("dimension,text,score", [
    ("target_following", '{"reasoning": "x", "target_score": 3}', 3),  # off 5|1
    ("effect", '{"reasoning": "x", "effect_score": 4}', 4),  # off 5|3|1
    ("consistency", '{"reasoning": "x", "consistency_score": 7}', 7),
    ("quality", '{"reasoning": "x", "quality_score": 0}', 0),
    ("effect", '{"reasoning": "x", "effect_score": 4.5}', 4.5),
    ("effect", "4", 4),
])
def test_off_scale_scores_are_used_as_given_officially_and_fail_strictly(dimension, text, score):
    got, reasoning = parse_judgement(text, dimension)  # official is the default
    assert got == score and type(got) is type(score) and is_off_scale(got, dimension)
    with pytest.raises(JudgeOffScale) as info:
        parse_judgement(text, dimension, "strict")
    assert info.value.score == score and "outside the scale" in str(info.value)
    assert not is_off_scale(5, dimension) and not is_off_scale(None, dimension)
    with pytest.raises(ValueError, match="score_parse"):
        parse_judgement(text, dimension, "lenient")


# --------------------------------------------------------------------------------------------------- openai judge
def test_openai_judge_scores_every_dimension_with_images_at_the_markers(server, templates):
    judge = openai_judge(server)
    for dim in DIMENSIONS:
        result = judge.judge(dim, parts_for(templates, dim))
        assert (result.score, result.error, result.attempts, result.model) == (max(SCALES[dim]), None, 1, MODEL)
        assert result.reasoning == "looks right" and SCORE_KEYS[dim] in result.raw and result.seconds > 0
    assert server.errors == [] and server.count() == 4
    assert [r["dimension"] for r in server.requests] == list(DIMENSIONS)
    quality, *others = server.requests
    assert len(quality["images"]) == 1 and same(quality["images"][0], EDITED)
    for r in others:
        assert same(r["images"][0], ORIGINAL) and same(r["images"][1], EDITED)
    assert "temperature" not in quality["body"]
    assert KEY not in repr(judge)


def test_openai_judge_retries_bad_replies_until_a_valid_score(server, templates):
    server.script = [
        (200, chat("{'reasoning': broken json")),  # malformed JSON, no score
        (500, {"error": {"message": "engine overloaded"}}),
        (429, {"error": {"message": "slow down"}}),
        (200, {"choices": []}),
        (200, chat('```json\n{"reasoning": "on the target", "target_score": 1}\n```')),
    ]
    result = openai_judge(server, max_retries=5).judge("target_following", parts_for(templates, "target_following"))
    assert (result.score, result.reasoning, result.attempts, result.error) == (1, "on the target", 5, None)
    assert server.count() == 5 and server.errors == [] and not result.off_scale


def test_an_off_scale_score_is_never_asked_again(server, templates):
    parts = parts_for(templates, "effect")
    server.script = [(200, chat('{"reasoning": "almost", "effect_score": 4}'))]
    result = openai_judge(server, max_retries=3).judge("effect", parts)  # official: used as given
    assert (result.score, result.off_scale, result.error, result.attempts) == (4, True, None, 1)
    server.script = [(200, chat('{"reasoning": "almost", "effect_score": 4}'))]
    result = openai_judge(server, max_retries=3, score_parse="strict").judge("effect", parts)
    assert (result.score, result.off_scale, result.attempts) == (None, True, 1)
    assert result.error.startswith("off-scale:") and result.reasoning == "almost"
    assert server.count() == 2
    with pytest.raises(JudgeConfigError, match="score_parse"):
        openai_judge(server, score_parse="loose")


def test_openai_judge_bare_digit_and_fenced_replies(server, templates):
    server.script = [(200, chat("3")), (200, chat("```\n{\"reasoning\": \"r\", \"quality_score\": 4}\n```"))]
    judge = openai_judge(server)
    assert judge.judge("effect", parts_for(templates, "effect")).score == 3
    assert judge.judge("quality", parts_for(templates, "quality")).score == 4
    assert server.count() == 2


def test_openai_judge_gives_up_after_retries_with_the_last_error(server, templates):
    server.script = [(500, {"error": {"message": "CUDA out of memory"}})] * 3
    result = openai_judge(server, max_retries=2).judge("effect", parts_for(templates, "effect"))
    assert result.score is None and result.attempts == 3 and server.count() == 3
    assert "failed after 3 attempt" in result.error and "HTTP 500: CUDA out of memory" in result.error
    server.script = [(200, chat('{"reasoning": "x"}'))] * 2
    result = openai_judge(server, max_retries=1).judge("effect", parts_for(templates, "effect"))
    assert result.score is None and "no numeric 'effect_score'" in result.error and result.raw.endswith('"x"}')


def test_openai_judge_400_fails_fast_and_401_404_are_configuration_errors(server, templates):
    server.script = [(400, {"error": {"message": "image too large"}})]
    result = openai_judge(server).judge("quality", parts_for(templates, "quality"))
    assert result.score is None and result.attempts == 1 and server.count() == 1
    assert result.error == "refused: HTTP 400: image too large"
    server.script = [(401, {"error": {"message": "invalid api key"}})]
    with pytest.raises(JudgeConfigError, match="REPLAN_JUDGE_API_KEY"):
        openai_judge(server).judge("quality", parts_for(templates, "quality"))
    server.script = [(404, {"error": {"message": "model not found"}})]
    with pytest.raises(JudgeConfigError, match=r"404.*end with /v1"):
        openai_judge(server).judge("quality", parts_for(templates, "quality"))
    assert server.count() == 3


def test_openai_judge_timeout_is_retried_and_temperature_sent(server, templates):
    server.script = [("sleep", 1.0)]
    result = openai_judge(server, timeout=0.3, temperature=0.0).judge("effect", parts_for(templates, "effect"))
    assert result.score == 5 and result.attempts == 2
    assert server.requests[-1]["body"]["temperature"] == 0.0


def test_openai_judge_credentials_and_endpoint_come_from_arguments_or_environment(monkeypatch, server):
    with pytest.raises(JudgeConfigError, match="REPLAN_JUDGE_BASE_URL"):
        OpenAIJudge(MODEL, api_key=KEY)
    with pytest.raises(JudgeConfigError, match="REPLAN_JUDGE_API_KEY") as info:
        OpenAIJudge(MODEL, base_url=server.url)
    assert "\n" not in str(info.value)
    with pytest.raises(JudgeConfigError, match="http"):
        OpenAIJudge(MODEL, base_url="localhost:8000", api_key=KEY)
    with pytest.raises(JudgeConfigError, match="judge_model"):
        OpenAIJudge("", base_url=server.url, api_key=KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = OpenAIJudge(MODEL)
    assert judge.base_url == server.url and judge.model == MODEL and judge.max_tokens >= 8192
    monkeypatch.setenv("REPLAN_JUDGE_API_KEY", "sk-preferred")
    assert OpenAIJudge(MODEL)._api_key == "sk-preferred"
    assert OpenAIJudge().model == DEFAULT_MODEL == "gemini-2.5-pro"


# --------------------------------------------------------------------------------------------------- genai judge
def test_genai_judge_against_a_local_gemini_endpoint(server, templates):
    judge = genai_judge(server)
    server.script = [(200, gemini('{"reasoning": "clean", "quality_score": 4}', thought="let me look closely"))]
    result = judge.judge("quality", parts_for(templates, "quality"))
    assert (result.score, result.reasoning, result.model, result.attempts) == (4, "clean", MODEL, 1)
    for dim in DIMENSIONS[1:]:
        assert judge.judge(dim, parts_for(templates, dim)).score == max(SCALES[dim])
    assert server.errors == [] and server.count() == 4
    for r in server.requests[1:]:
        assert same(r["images"][0], ORIGINAL) and same(r["images"][1], EDITED)
    schema = server.requests[0]["body"]["generationConfig"]["responseSchema"]
    assert schema["properties"]["quality_score"]["type"] == "INTEGER"
    assert schema["properties"]["reasoning"]["type"] == "STRING"


def test_genai_judge_retries_and_refusals(server, templates):
    judge = genai_judge(server, max_retries=4)
    server.script = [
        (503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}),
        (429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}),
        (200, gemini(finish="MAX_TOKENS", thought="thinking forever")),  # no answer text
        (200, gemini("not json, no score")),
        (200, gemini('{"reasoning": "x", "effect_score": 3}')),
    ]
    result = judge.judge("effect", parts_for(templates, "effect"))
    assert (result.score, result.attempts) == (3, 5) and server.count() == 5
    server.script = [(400, {"error": {"code": 400, "message": "image unsupported", "status": "INVALID_ARGUMENT"}})]
    result = judge.judge("effect", parts_for(templates, "effect"))
    assert result.score is None and result.attempts == 1 and "image unsupported" in result.error
    server.script = [(400, {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}})]
    with pytest.raises(JudgeConfigError, match="GEMINI_API_KEY"):
        judge.judge("effect", parts_for(templates, "effect"))
    server.script = [(403, {"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}})]
    with pytest.raises(JudgeConfigError):
        judge.judge("effect", parts_for(templates, "effect"))


def test_genai_request_building_offline(templates):
    judge = GenAIJudge("gemini-test", api_key="k", max_tokens=16384)
    contents, config = judge.request("consistency", parts_for(templates, "consistency"))
    (content,) = contents
    assert content.role == "user" and len(content.parts) == 5
    assert content.parts[0].text.endswith(ORIGINAL_MARKER) and content.parts[2].text.endswith(EDITED_MARKER)
    for i, image in ((1, ORIGINAL), (3, EDITED)):
        assert content.parts[i].inline_data.mime_type == "image/png"
        assert same(Image.open(io.BytesIO(content.parts[i].inline_data.data)).convert("RGB"), image)
    assert config.response_mime_type == "application/json" and config.max_output_tokens == 16384
    assert config.response_schema.required == ["consistency_score", "reasoning"]  # as the official schema
    assert config.response_schema.property_ordering == ["reasoning", "consistency_score"]
    assert GenAIJudge("m", api_key="k").max_tokens >= 8192


def test_genai_credentials(monkeypatch):
    with pytest.raises(JudgeConfigError, match="GEMINI_API_KEY") as info:
        GenAIJudge(MODEL)
    assert "\n" not in str(info.value)
    with pytest.raises(JudgeConfigError, match="GOOGLE_CLOUD_PROJECT"):
        GenAIJudge(MODEL, vertex=True)
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google-env")
    assert GenAIJudge(MODEL)._client is not None  # no request is made to build a client


def test_genai_vertex_needs_a_project_and_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "demo-project")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(JudgeConfigError, match="no Google Cloud credentials for --vertex") as info:
        GenAIJudge(MODEL, vertex=True)
    assert "\n" not in str(info.value)
    user = {"type": "authorized_user", "client_id": "id", "client_secret": "secret", "refresh_token": "token"}
    (tmp_path / "adc.json").write_text(json.dumps(user))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "adc.json"))
    judge = GenAIJudge(MODEL, vertex=True, location="europe-west4")
    assert (judge.project, judge.location) == ("demo-project", "europe-west4") and "vertex" in repr(judge)
    assert GenAIJudge(MODEL, vertex=True).location == "us-central1"


@pytest.mark.network
@pytest.mark.skipif(not REAL_KEY, reason="needs GEMINI_API_KEY or GOOGLE_API_KEY")
def test_real_gemini_judges_an_identical_pair():  # pragma: no cover - needs the network and a key
    templates = load_templates()
    parts = build_parts("consistency", templates["consistency"], "do nothing", "the image", ORIGINAL, ORIGINAL)
    result = GenAIJudge(DEFAULT_MODEL, api_key=REAL_KEY).judge("consistency", parts)
    assert result.score in SCALES["consistency"], result.error
