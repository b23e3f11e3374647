"""OpenAI-compatible endpoints through the official ``openai`` SDK: the settings, errors, attempt budget and reply
reading shared by the planner (``replan.planner.openai_backend``), the IV-Edit judges (``replan.eval.judges``) and the
stage-2 reward clients (``replan.train.reward_clients``).

    client = sync_client(endpoint_url(None, "planner", ENV, "pass --base_url"), api_key, timeout=300, max_retries=0)
    budget = RetryBudget(max_retries=4, backoff=1.0, max_backoff=30.0)
    data, text = chat_call(client, {"model": m, "messages": [...]}, budget)    # Transient / Refused on failure

The SDK does the HTTP: the bearer key, the timeout, and its retries (back-off from 0.5 s doubling to 8 s, jittered,
or the server's ``Retry-After`` up to 2 min) on connection errors, timeouts, 408, 409, 429 and 5xx. Ours is what the
SDK does not do:

* one attempt budget per logical call (``RetryBudget``): ``1 + max_retries`` requests in all, whether the SDK retried
  them or the caller asked again after a reply it could not use (not JSON, no choices, no text, no score);
* one-line errors made from the SDK's: ``Transient`` (worth another attempt) and ``Refused`` (the server said no: a 4xx
  other than 408/409/429), with the server's own message read from an OpenAI-, vLLM- or FastAPI-style body;
* reading a reply (``json_object``, ``chat_text``, ``model_ids``) and the endpoint settings (``endpoint_url``).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
import weakref

import httpx2
import openai

RETRYABLE_4XX = (408, 409, 429)  # request timeout, conflict (a lock timeout), rate limited: the SDK retries these
MAX_MESSAGE = 300  # characters of a server message kept in an error


class Transient(Exception):
    """A failure worth another attempt: 5xx, 408/409/429, timeout, connection error, a reply that cannot be used."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Refused(Exception):
    """A failure not worth another attempt: the server refused the request (``status``: 4xx but 408/409/429)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


# ---------------------------------------------------------------------------------------------------- text
def one_line(text, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters with ``...``."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_message(raw: bytes | str) -> str:
    """The server's message from an OpenAI-style (``{"error": {"message"}}``), vLLM-style (``{"message"}``) or
    FastAPI-style (``{"detail"}``) error body, else the body itself; one line."""
    text = (raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)).strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return one_line(text)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return one_line(err["message"])
        if isinstance(err, str) and err:
            return one_line(err)
        for key in ("message", "detail"):
            if data.get(key):
                return one_line(data[key] if isinstance(data[key], str) else json.dumps(data[key]))
    return one_line(text)


# ---------------------------------------------------------------------------------------------------- settings
def first_set(value: str | None, *env: str) -> str | None:
    """``value`` if given, else the first environment variable of ``env`` that is set and not empty."""
    if value:
        return value
    for name in env:
        if os.environ.get(name):
            return os.environ[name]
    return None


def endpoint_url(base_url: str | None, what: str, env: tuple[str, ...], how: str) -> str:
    """``base_url`` (else the first of ``env`` that is set) checked and without a trailing ``/``. ``ValueError`` with
    one line naming the setting when there is none (``how``: e.g. ``"pass base_url (--base_url)"``) or it is not an
    http(s) URL."""
    base_url = first_set(base_url, *env)
    if not base_url or not base_url.strip():
        names = env[0] + (f" (or {', '.join(env[1:])})" if len(env) > 1 else "")
        raise ValueError(f"no {what} endpoint: {how} or set {names}, e.g. http://localhost:8000/v1 for a local vLLM "
                         "server")
    base_url = base_url.strip().rstrip("/")
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{what} base_url must be an http(s) URL like http://localhost:8000/v1, got {base_url!r}")
    return base_url


def sync_client(base_url: str, api_key: str, timeout: float, max_retries: int = 0) -> openai.OpenAI:
    """The SDK's blocking client for ``base_url`` (``.../v1``); nothing is sent until a call."""
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)


def async_client(base_url: str, api_key: str, timeout: float, max_retries: int = 0,
                 max_connections: int | None = None) -> openai.AsyncOpenAI:
    """The SDK's asyncio client (at most ``max_connections`` open, else the SDK's limit); use it in one event loop
    only (``PerLoop``)."""
    http_client = None
    if max_connections:
        limits = httpx2.Limits(max_connections=int(max_connections), max_keepalive_connections=int(max_connections))
        http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                              http_client=http_client)


class PerLoop:
    """One value per running event loop, made by ``make()`` on first use in that loop: an async HTTP client's
    connections (and an asyncio semaphore's waiters) belong to the loop that made them, and a trainer may run each
    batch in a new loop. ``aclose()`` forgets the current loop's value, closing it first (``await value.aclose()`` or
    ``value.close()``) if it is a client."""

    def __init__(self, make):
        self._make = make
        self._values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self):
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            value = self._values[loop] = self._make()
        return value

    async def aclose(self) -> None:
        value = self._values.pop(asyncio.get_running_loop(), None)
        if hasattr(value, "aclose"):
            await value.aclose()
        elif hasattr(value, "close"):
            await value.close()


# ---------------------------------------------------------------------------------------------------- attempts
class RetryBudget:
    """The attempts of one logical call: ``1 + max_retries`` requests in all. ``sdk_retries()`` is what the SDK may
    still retry inside the next request; ``spend(n)`` counts the requests it made; ``delay()`` is our own pause before
    asking again after an unusable reply (``backoff`` doubling per re-ask, at most ``max_backoff``)."""

    def __init__(self, max_retries: int, backoff: float = 0.0, max_backoff: float = 0.0):
        self.total, self.used, self.reasks = int(max_retries) + 1, 0, 0
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)

    @property
    def left(self) -> int:
        return self.total - self.used

    def sdk_retries(self) -> int:
        return max(0, self.left - 1)

    def spend(self, requests: int) -> None:
        self.used += max(1, int(requests))

    def delay(self, retry_after: float | None = None) -> float:
        self.reasks += 1
        delay = min(self.backoff * 2 ** (self.reasks - 1), self.max_backoff)
        return min(max(delay, retry_after), self.max_backoff) if retry_after is not None else delay


def requests_made(error: openai.APIError, allowed_retries: int) -> int:
    """How many requests the SDK made for a call that ended in ``error``: the retry count its last request carried
    (``x-stainless-retry-count``) plus one; else, for an error it retries, all it was allowed."""
    request = getattr(error, "request", None)
    count = request.headers.get("x-stainless-retry-count") if request is not None else None
    if count is not None and count.isdigit():
        return int(count) + 1
    retried = isinstance(error, openai.APIConnectionError) or (
        isinstance(error, openai.APIStatusError) and (error.status_code >= 500 or error.status_code in RETRYABLE_4XX))
    return allowed_retries + 1 if retried else 1


def sdk_error(error: openai.APIError, timeout: float | None = None) -> Transient | Refused:
    """The SDK's error as ours, on one line: ``Refused`` for a 4xx other than 408/409/429, else ``Transient``."""
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        message = error_message(error.response.content) if error.response is not None else ""
        message = message or one_line(error.message) or "(no message)"
        return Transient(f"HTTP {status}: {message}") if status >= 500 or status in RETRYABLE_4XX \
            else Refused(status, message)
    if isinstance(error, openai.APITimeoutError):
        return Transient(f"no reply within {timeout:g} s" if timeout else "no reply in time")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        return Transient(f"cannot connect ({one_line(cause if cause is not None and str(cause) else error.message)})")
    return Transient(f"{type(error).__name__}: {one_line(error)}")


# ---------------------------------------------------------------------------------------------------- replies
def json_object(raw: bytes) -> dict:
    """A reply body as a JSON object; ``Transient`` when it is not one."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise Transient(f"reply is not valid JSON: {one_line(raw.decode('utf-8', 'replace'), 120)!r}") from None
    if not isinstance(data, dict):
        raise Transient(f"reply is a JSON {type(data).__name__}, not an object")
    return data


def chat_text(data: dict) -> str:
    """``choices[0].message.content`` of a chat completion as text (a list of text parts is joined); ``Transient``
    when there is none (an error body, no choices, null content)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        if data.get("error"):
            raise Transient(f"reply is an error: {error_message(json.dumps(data))}")
        raise Transient("reply has no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if parts:
            return "".join(parts)
    raise Transient("reply has no choices[0].message.content")


def model_ids(raw: bytes) -> list[str]:
    """The ids of a ``GET /models`` reply (``{"data": [{"id"}, ...]}``); ``[]`` for anything else."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return []
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    return [m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]


# ---------------------------------------------------------------------------------------------------- calls
def _chat_kwargs(body: dict) -> dict:
    """``create()`` arguments for a request body: ``model`` and ``messages`` by name, the rest as ``extra_body``
    (sent exactly as given, whatever the server's extensions)."""
    rest = {k: v for k, v in body.items() if k not in ("model", "messages")}
    return {"model": body["model"], "messages": body["messages"], "extra_body": rest}


def chat_call(client: openai.OpenAI, body: dict, budget: RetryBudget, timeout: float | None = None) -> tuple[dict, str]:
    """One ``POST /chat/completions`` with ``body`` (the SDK retrying within ``budget``): the reply's JSON and text.
    ``Transient`` / ``Refused`` on failure; ``budget`` counts every request made."""
    retries = budget.sdk_retries()
    try:
        raw = client.with_options(max_retries=retries).chat.completions.with_raw_response.create(**_chat_kwargs(body))
    except openai.APIError as e:
        budget.spend(requests_made(e, retries))
        raise sdk_error(e, timeout) from None
    budget.spend(raw.retries_taken + 1)
    data = json_object(raw.content)
    return data, chat_text(data)


async def achat_call(client: openai.AsyncOpenAI, body: dict, budget: RetryBudget,
                     timeout: float | None = None) -> tuple[dict, str]:
    """``chat_call`` with the asyncio client."""
    retries = budget.sdk_retries()
    try:
        raw = await client.with_options(max_retries=retries).chat.completions.with_raw_response.create(
            **_chat_kwargs(body))
    except openai.APIError as e:
        budget.spend(requests_made(e, retries))
        raise sdk_error(e, timeout) from None
    budget.spend(raw.retries_taken + 1)
    data = json_object(raw.content)
    return data, chat_text(data)


def list_models(client: openai.OpenAI, timeout: float) -> list[str]:
    """One ``GET /models`` (no retries): the served model ids; ``Transient`` / ``Refused`` on failure."""
    try:
        raw = client.with_options(max_retries=0, timeout=timeout).models.with_raw_response.list()
    except openai.APIError as e:
        raise sdk_error(e, timeout) from None
    return model_ids(raw.content)


async def alist_models(client: openai.AsyncOpenAI, timeout: float) -> list[str]:
    """``list_models`` with the asyncio client."""
    try:
        raw = await client.with_options(max_retries=0, timeout=timeout).models.with_raw_response.list()
    except openai.APIError as e:
        raise sdk_error(e, timeout) from None
    return model_ids(raw.content)
