"""VLM judges for IV-Edit: prompt templates, request parts, reply parsing, and two API backends.

    templates = load_templates()                                   # or load_templates("my_prompts/")
    parts = build_parts("effect", templates["effect"], instruction, referring_expression, original, edited)
    judge = OpenAIJudge("Qwen/Qwen2.5-VL-72B-Instruct", base_url="http://localhost:8000/v1", api_key="EMPTY")
    result = judge.judge("effect", parts)                          # JudgeResult(score=5, reasoning=..., ...)

Templates: one file per dimension (``quality.txt``, ``target_following.txt``, ``effect.txt``, ``consistency.txt``),
placeholders ``{{{instruction}}}`` / ``{{{referring_expression}}}`` (regex ``\\{\\{\\{([^{}]+)\\}\\}\\}``; ``{{ }}``
stays literal), images placed right after the markers ``**Original Image**:`` and ``**Edited Image**:`` (quality: the
edited image only). Scales: quality 1-5, target_following 5|1, effect and consistency 5|3|1.

Templates: the four rubric files (replan's wording by default, the official files with ``--prompts_dir``), see
``replan.eval.judge_prompts``. A reply's score is read with ``score_parse``: ``official`` (default) uses any numeric
score as given (``JudgeResult.off_scale`` marks one off the dimension's scale); ``strict`` fails it. An off-scale
score is never asked again.

A judge call is retried (exponential backoff) on 5xx, 408/429, timeouts, connection errors, empty replies and replies
without a numeric score; any other 4xx fails that call at once; 401/403/404 (a wrong key, URL or model) raise
``JudgeConfigError`` because every later call would fail the same way.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass

from replan.eval.judge_prompts import (  # noqa: F401  (re-exported: the judge API in one place)
    EDITED_MARKER,
    ORIGINAL_MARKER,
    PLACEHOLDERS,
    SCALES,
    SCORE_KEYS,
    SCORE_PARSE,
    JudgeOffScale,
    JudgeParseError,
    Part,
    build_parts,
    check_template,
    describe_templates,
    is_off_scale,
    load_templates,
    parse_judgement,
    parts_digest,
    png_bytes,
    render,
    response_schema,
    template_hash,
)
from replan.eval.scoring import DIMENSIONS
from replan.planner.openai_backend import (
    RETRYABLE_4XX,
    _content,
    _error_message,
    _json_reply,
    _one_line,
    _Refused,
    _retry_after,
    _Transient,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemini-2.5-pro"  # the paper's judge; a default only, always overridable
DEFAULT_MAX_TOKENS = 8192  # Gemini 2.5 Pro spends output tokens on thinking; 4096 (official) truncates replies
INSTALL_HINT = "pip install 'replan[eval]'"



class JudgeConfigError(ValueError):
    """The judge cannot work at all (no key, wrong URL or model, missing package): stop and tell the user."""


@dataclass
class JudgeResult:
    score: int | float | None
    reasoning: str = ""
    raw: str = ""
    error: str | None = None
    model: str = ""
    attempts: int = 0
    seconds: float = 0.0
    off_scale: bool = False  # the judge gave a number off the dimension's scale (used as given, or failed if strict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- judges
class Judge:
    """``judge(dimension, parts) -> JudgeResult``; subclasses implement ``_generate(dimension, parts) -> str``."""

    name = "judge"

    def __init__(self, model: str, *, max_retries: int = 3, backoff: float = 2.0, max_backoff: float = 60.0,
                 timeout: float = 300.0, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float | None = None,
                 score_parse: str = "official"):
        if score_parse not in SCORE_PARSE:
            raise JudgeConfigError(f"score_parse must be one of {', '.join(SCORE_PARSE)}, got {score_parse!r}")
        if not isinstance(model, str) or not model.strip():
            raise JudgeConfigError("no judge model: pass --judge_model, e.g. gemini-2.5-pro")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise JudgeConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not backoff >= 0 or not max_backoff >= 0 or not timeout > 0:
            raise JudgeConfigError("backoff and max_backoff must be >= 0 and timeout > 0")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise JudgeConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.model, self.max_retries, self.backoff, self.max_backoff = model.strip(), max_retries, backoff, max_backoff
        self.timeout, self.max_tokens, self.temperature = float(timeout), max_tokens, temperature
        self.score_parse = score_parse

    def read(self, dimension: str, raw: str) -> JudgeResult:
        """A reply read with this judge's ``score_parse`` (also used on cached replies); ``JudgeParseError`` when it
        holds no numeric score. A strict off-scale reply is a failed result, not an error."""
        try:
            score, reasoning = parse_judgement(raw, dimension, self.score_parse)
        except JudgeOffScale as e:
            return JudgeResult(None, e.reasoning, raw, f"off-scale: {e}", self.model, off_scale=True)
        return JudgeResult(score, reasoning, raw, None, self.model, off_scale=is_off_scale(score, dimension))

    def _generate(self, dimension: str, parts: list[Part]) -> str:
        raise NotImplementedError

    def judge(self, dimension: str, parts: list[Part]) -> JudgeResult:
        if dimension not in SCALES:
            raise ValueError(f"unknown dimension {dimension!r}; expected one of {', '.join(DIMENSIONS)}")
        start, raw, last = time.perf_counter(), "", "no attempt made"
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            retry_after = None
            try:
                raw = self._generate(dimension, parts)
                result = self.read(dimension, raw)
                result.attempts, result.seconds = attempt, time.perf_counter() - start
                return result
            except _Refused as e:
                return JudgeResult(None, "", raw, f"refused: {e}", self.model, attempt, time.perf_counter() - start)
            except (_Transient, JudgeParseError) as e:
                last, retry_after = str(e), getattr(e, "retry_after", None)
            if attempt < attempts:
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                if retry_after is not None:
                    delay = min(max(delay, retry_after), self.max_backoff)
                logger.warning("%s judge (%s, %s): %s; retry %d/%d in %.3g s", self.name, self.model, dimension,
                               last, attempt, self.max_retries, delay)
                time.sleep(delay)
        error = f"failed after {attempts} attempt(s): {last}"
        return JudgeResult(None, "", raw, error, self.model, attempts, time.perf_counter() - start)


class OpenAIJudge(Judge):
    """Any OpenAI-compatible ``/chat/completions`` endpoint that takes images (vLLM, hosted APIs, Gemini's OpenAI
    endpoint). Images go as PNG data URLs exactly where the template's markers are; ``response_format`` is
    ``json_object`` and a final text part states the schema. Standard library HTTP only.

    ``base_url``: else ``$REPLAN_JUDGE_BASE_URL``, else ``$OPENAI_BASE_URL``. ``api_key``: else
    ``$REPLAN_JUDGE_API_KEY``, else ``$OPENAI_API_KEY`` (any value, e.g. ``EMPTY``, for a server without auth).
    """

    name = "openai"

    def __init__(self, model: str = DEFAULT_MODEL, *, base_url: str | None = None, api_key: str | None = None,
                 extra_body: dict | None = None, **kw):
        base_url = base_url or os.environ.get("REPLAN_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not base_url or not base_url.strip():
            raise JudgeConfigError("no judge endpoint: set REPLAN_JUDGE_BASE_URL (or OPENAI_BASE_URL) or pass "
                                   "--base_url, e.g. http://localhost:8000/v1")
        base_url = base_url.strip().rstrip("/")
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise JudgeConfigError(f"judge base_url must be an http(s) URL like http://localhost:8000/v1, "
                                   f"got {base_url!r}")
        api_key = api_key or os.environ.get("REPLAN_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeConfigError("no judge API key: set REPLAN_JUDGE_API_KEY (or OPENAI_API_KEY) or pass --api_key "
                                   "(any value, e.g. EMPTY, for a local server without auth)")
        super().__init__(model, **kw)
        self.base_url, self._api_key, self.extra_body = base_url, api_key, dict(extra_body or {})

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

    def request_body(self, dimension: str, parts: list[Part]) -> dict:
        content = []
        for p in parts:
            if isinstance(p, str):
                content.append({"type": "text", "text": p})
            else:
                url = "data:image/png;base64," + base64.b64encode(png_bytes(p)).decode("ascii")
                content.append({"type": "image_url", "image_url": {"url": url}})
        hint = "Please output valid JSON adhering to this schema: " + json.dumps(response_schema(dimension))
        content.append({"type": "text", "text": hint})
        body = {**self.extra_body, "model": self.model, "messages": [{"role": "user", "content": content}],
                "response_format": {"type": "json_object"}, "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def _generate(self, dimension: str, parts: list[Part]) -> str:
        url = self.base_url + "/chat/completions"
        try:
            raw = _post_json(url, self.request_body(dimension, parts), self._api_key, self.timeout)
        except _Refused as e:
            if e.status in (401, 403):
                raise JudgeConfigError(f"judge endpoint {url} refused the key ({e}); check REPLAN_JUDGE_API_KEY "
                                       "(or OPENAI_API_KEY)") from None
            if e.status == 404:
                raise JudgeConfigError(f"judge endpoint {url} answered {e}; does the base URL end with /v1, and is "
                                       f"model {self.model!r} served there?") from None
            raise
        return _content(_json_reply(raw))


def _post_json(url: str, body: dict, api_key: str, timeout: float) -> bytes:
    """One POST; the 2xx body, or ``_Transient`` (5xx, 408, 429, timeout, connection) / ``_Refused`` (other 4xx)."""
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        try:
            raw = e.read()
        except OSError:
            raw = b""
        message = _error_message(raw) or (e.reason if isinstance(e.reason, str) else "") or "(no message)"
        if e.code >= 500 or e.code in RETRYABLE_4XX:
            raise _Transient(f"HTTP {e.code}: {message}", _retry_after(e.headers)) from None
        raise _Refused(e.code, message) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _Transient(f"no reply within {timeout:g} s") from None
        raise _Transient(f"cannot connect to {url} ({_one_line(str(e.reason))})") from None
    except TimeoutError:
        raise _Transient(f"no reply within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:  # connection reset, remote end closed, incomplete read
        raise _Transient(f"connection error ({type(e).__name__}: {_one_line(str(e))})") from None


class GenAIJudge(Judge):
    """Gemini through ``google-genai``: ``genai.Client(api_key=...)``, or Vertex AI with ``vertex=True``
    (``genai.Client(vertexai=True, project, location)``, application-default credentials).

    ``api_key``: else ``$GEMINI_API_KEY``, else ``$GOOGLE_API_KEY``. ``project``: else ``$GOOGLE_CLOUD_PROJECT``;
    ``location``: else ``$GOOGLE_CLOUD_LOCATION``, else ``us-central1``. ``base_url`` overrides the API endpoint
    (a proxy, or a local stand-in in tests).
    """

    name = "genai"

    def __init__(self, model: str = DEFAULT_MODEL, *, api_key: str | None = None, vertex: bool = False,
                 project: str | None = None, location: str | None = None, base_url: str | None = None, **kw):
        if vertex:
            project = project or os.environ.get("GOOGLE_CLOUD_PROJECT")
            if not project:
                raise JudgeConfigError("no Google Cloud project for --vertex: set GOOGLE_CLOUD_PROJECT or pass "
                                       "--project")
            location = location or os.environ.get("GOOGLE_CLOUD_LOCATION") or "us-central1"
        else:
            api_key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
            if not api_key:
                raise JudgeConfigError("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), pass --api_key, "
                                       "or use --vertex with GOOGLE_CLOUD_PROJECT")
        super().__init__(model, **kw)
        genai, self._types, self._errors = _import_genai()
        options = self._types.HttpOptions(timeout=int(self.timeout * 1000), base_url=base_url,
                                          retry_options=self._types.HttpRetryOptions(attempts=1))
        try:
            if vertex:
                self._client = genai.Client(vertexai=True, project=project, location=location, http_options=options,
                                            credentials=_vertex_credentials())
            else:
                self._client = genai.Client(api_key=api_key, http_options=options)
        except JudgeConfigError:
            raise
        except Exception as e:  # e.g. an unusable project or location
            raise JudgeConfigError(f"cannot create the google-genai client: {_one_line(str(e))}") from None
        self.vertex, self.project, self.location = vertex, project, location

    def __repr__(self) -> str:
        where = f"vertex {self.project}/{self.location}" if self.vertex else "api key"
        return f"GenAIJudge(model={self.model!r}, {where})"

    def request(self, dimension: str, parts: list[Part]) -> tuple[list, object]:
        """``(contents, GenerateContentConfig)`` for one call: text and PNG parts in order, the JSON schema."""
        t = self._types
        content_parts = [t.Part.from_text(text=p) if isinstance(p, str)
                         else t.Part.from_bytes(data=png_bytes(p), mime_type="image/png") for p in parts]
        schema = response_schema(dimension)
        key = SCORE_KEYS[dimension]
        genai_schema = t.Schema(type="OBJECT", required=schema["required"], property_ordering=["reasoning", key],
                                properties={"reasoning": t.Schema(type="STRING"),
                                            key: t.Schema(type="INTEGER",
                                                          description=schema["properties"][key]["description"])})
        config = t.GenerateContentConfig(response_mime_type="application/json", response_schema=genai_schema,
                                         max_output_tokens=self.max_tokens, temperature=self.temperature)
        return [t.Content(role="user", parts=content_parts)], config

    def _generate(self, dimension: str, parts: list[Part]) -> str:
        contents, config = self.request(dimension, parts)
        try:
            response = self._client.models.generate_content(model=self.model, contents=contents, config=config)
        except self._errors.APIError as e:
            code, message = e.code or 0, _one_line(e.message or str(e))
            if code in (401, 403) or (code == 400 and "api key" in message.lower()):
                raise JudgeConfigError(f"Gemini refused the credentials (HTTP {code}: {message}); check "
                                       "GEMINI_API_KEY / GOOGLE_API_KEY or the Vertex AI project") from None
            if code == 404:
                raise JudgeConfigError(f"Gemini answered HTTP 404 for model {self.model!r}: {message}") from None
            if code >= 500 or code in RETRYABLE_4XX:
                raise _Transient(f"HTTP {code}: {message}") from None
            raise _Refused(code, message) from None
        except Exception as e:  # timeouts and connection errors (httpx), anything else the SDK raises
            raise _Transient(f"{type(e).__name__}: {_one_line(str(e))}") from None
        return genai_text(response)


def genai_text(response) -> str:
    """The answer text of a ``GenerateContentResponse`` (thought parts skipped); ``_Refused`` when the prompt was
    blocked, ``_Transient`` when there is no text (e.g. the thinking used up ``max_output_tokens``)."""
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        raise _Refused(400, f"prompt blocked ({feedback.block_reason})")
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        raise _Transient("reply has no candidates")
    content = getattr(candidates[0], "content", None)
    texts = [p.text for p in (getattr(content, "parts", None) or []) if p.text and not getattr(p, "thought", False)]
    if not texts:
        reason = getattr(candidates[0], "finish_reason", None)
        raise _Transient(f"reply has no text (finish_reason {reason})")
    return "".join(texts)


def _vertex_credentials():
    """Application-default credentials, checked now so that a missing login stops the run before any work."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError:
        raise JudgeConfigError("no Google Cloud credentials for --vertex: run 'gcloud auth application-default "
                               "login' or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None
    return credentials


def _import_genai():
    try:
        from google import genai
        from google.genai import errors, types
    except ImportError:
        raise ImportError(f"the genai judge needs the google-genai package: {INSTALL_HINT}") from None
    return genai, types, errors


def make_judge(kind: str, model: str, **kw) -> Judge:
    """``"genai"`` or ``"openai"``; unknown keyword arguments for the other backend are dropped."""
    common = ("max_retries", "backoff", "max_backoff", "timeout", "max_tokens", "temperature", "score_parse")
    if kind == "genai":
        names = (*common, "api_key", "vertex", "project", "location", "base_url")
        return GenAIJudge(model, **{k: v for k, v in kw.items() if k in names})
    if kind == "openai":
        names = (*common, "api_key", "base_url", "extra_body")
        return OpenAIJudge(model, **{k: v for k, v in kw.items() if k in names})
    raise JudgeConfigError(f"unknown judge {kind!r}; expected genai or openai")
