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

A judge call makes at most ``1 + max_retries`` requests: the OpenAI judge's SDK retries 5xx, 408/409/429, timeouts
and connection errors with its own back-off, and the judge asks again (``backoff`` doubling) after an empty reply or
one without a numeric score; any other 4xx fails that call at once; 401/403/404 (a wrong key, URL or model) raise
``JudgeConfigError`` because every later call would fail the same way. ``judge()`` blocks (the eval's thread pool);
``await ajudge()`` is the same call for asyncio (the stage-2 reward's bounded concurrency).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

from replan.clients import (
    RETRYABLE_4XX,
    PerLoop,
    Refused,
    Transient,
    achat_call,
    async_client,
    chat_call,
    endpoint_url,
    first_set,
    one_line,
    sync_client,
)
from replan.eval.judge_base import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_TOKENS,
    Judge,
    JudgeConfigError,
    JudgeResult,
    current_budget,
)
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

DEFAULT_MODEL = "gemini-2.5-pro"  # the paper's judge; a default only, always overridable
INSTALL_HINT = "pip install 'replan[eval]'"
BASE_URL_ENV = ("REPLAN_JUDGE_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("REPLAN_JUDGE_API_KEY", "OPENAI_API_KEY")


class OpenAIJudge(Judge):
    """Any OpenAI-compatible ``/chat/completions`` endpoint that takes images (vLLM, hosted APIs, Gemini's OpenAI
    endpoint). Images go as PNG data URLs exactly where the template's markers are; ``response_format`` is
    ``json_object`` and a final text part states the schema.

    ``base_url``: else ``$REPLAN_JUDGE_BASE_URL``, else ``$OPENAI_BASE_URL``. ``api_key``: else
    ``$REPLAN_JUDGE_API_KEY``, else ``$OPENAI_API_KEY`` (any value, e.g. ``EMPTY``, for a server without auth).
    The official ``openai`` SDK sends the requests: ``OpenAI`` for ``judge()``, ``AsyncOpenAI`` (one per event loop,
    at most ``max_connections`` open, default the SDK's) for ``ajudge()``.
    """

    name = "openai"

    def __init__(self, model: str = DEFAULT_MODEL, *, base_url: str | None = None, api_key: str | None = None,
                 extra_body: dict | None = None, max_connections: int | None = None, **kw):
        try:
            base_url = endpoint_url(base_url, "judge", BASE_URL_ENV, "pass --base_url")
        except ValueError as e:
            raise JudgeConfigError(str(e)) from None
        api_key = first_set(api_key, *API_KEY_ENV)
        if not api_key:
            raise JudgeConfigError("no judge API key: set REPLAN_JUDGE_API_KEY (or OPENAI_API_KEY) or pass --api_key "
                                   "(any value, e.g. EMPTY, for a local server without auth)")
        super().__init__(model, **kw)
        self.base_url, self._api_key, self.extra_body = base_url, api_key, dict(extra_body or {})
        self.client = sync_client(base_url, api_key, self.timeout)
        self.aclients = PerLoop(lambda: async_client(base_url, api_key, self.timeout, max_connections=max_connections))

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
        try:
            return chat_call(self.client, self.request_body(dimension, parts), current_budget(), self.timeout)[1]
        except Refused as e:
            raise self._config_error(e) from None

    async def _agenerate(self, dimension: str, parts: list[Part]) -> str:
        body = await asyncio.to_thread(self.request_body, dimension, parts)  # PNG encoding off the event loop
        try:
            return (await achat_call(self.aclients.get(), body, current_budget(), self.timeout))[1]
        except Refused as e:
            raise self._config_error(e) from None

    def _config_error(self, e: Refused) -> Exception:
        """``JudgeConfigError`` for a refused key (401/403) or a wrong URL or model (404), else ``e`` itself."""
        url = self.base_url + "/chat/completions"
        if e.status in (401, 403):
            return JudgeConfigError(f"judge endpoint {url} refused the key ({e}); check REPLAN_JUDGE_API_KEY "
                                    "(or OPENAI_API_KEY)")
        if e.status == 404:
            return JudgeConfigError(f"judge endpoint {url} answered {e}; does the base URL end with /v1, and is "
                                    f"model {self.model!r} served there?")
        return e

    async def aclose(self) -> None:
        """Close this event loop's async client."""
        await self.aclients.aclose()


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
            raise JudgeConfigError(f"cannot create the google-genai client: {one_line(str(e))}") from None
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
        contents, config = self.request(dimension, parts)  # one request: the google-genai client's retries are off
        try:
            response = self._client.models.generate_content(model=self.model, contents=contents, config=config)
        except self._errors.APIError as e:
            code, message = e.code or 0, one_line(e.message or str(e))
            if code in (401, 403) or (code == 400 and "api key" in message.lower()):
                raise JudgeConfigError(f"Gemini refused the credentials (HTTP {code}: {message}); check "
                                       "GEMINI_API_KEY / GOOGLE_API_KEY or the Vertex AI project") from None
            if code == 404:
                raise JudgeConfigError(f"Gemini answered HTTP 404 for model {self.model!r}: {message}") from None
            if code >= 500 or code in RETRYABLE_4XX:
                raise Transient(f"HTTP {code}: {message}") from None
            raise Refused(code, message) from None
        except Exception as e:  # timeouts and connection errors (httpx), anything else the SDK raises
            raise Transient(f"{type(e).__name__}: {one_line(str(e))}") from None
        return genai_text(response)


def genai_text(response) -> str:
    """The answer text of a ``GenerateContentResponse`` (thought parts skipped); ``Refused`` when the prompt was
    blocked, ``Transient`` when there is no text (e.g. the thinking used up ``max_output_tokens``)."""
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        raise Refused(400, f"prompt blocked ({feedback.block_reason})")
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        raise Transient("reply has no candidates")
    content = getattr(candidates[0], "content", None)
    texts = [p.text for p in (getattr(content, "parts", None) or []) if p.text and not getattr(p, "thought", False)]
    if not texts:
        reason = getattr(candidates[0], "finish_reason", None)
        raise Transient(f"reply has no text (finish_reason {reason})")
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
