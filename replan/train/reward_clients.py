"""HTTP clients of the stage-2 reward (``replan.train.remote``): the edit server and the VLM judge.

``EditClient``: ``POST {edit_url}/v1/plans/execute`` with ``{"image_base64", "response", "instruction", "box_frame",
"planner_size"}`` answers ``{"image_base64", "plan", "boxes", ...}``; ``GET {edit_url}/health`` answers ``{"status":
"loading"|"ready"|"failed"}``. ``JudgeClient``: three judge dimensions on any OpenAI-compatible ``/chat/completions``
endpoint (vLLM) through the eval judges' ``OpenAIJudge``, with the eval rubrics (the official training judge uses the
same files) and ``score_parse``. The edit server is reached with a small ``httpx2`` client (the HTTP library of the
``openai`` SDK); 5xx, 408/409/429, timeouts, connection errors and unreadable replies are retried with exponential
backoff, any other 4xx is final for that sample. The judge is the eval's ``OpenAIJudge`` on ``AsyncOpenAI`` (the SDK's
retries within the judge's attempt budget). All waiting is ``async``; each event loop gets its own connections
(``aclose()`` releases the current loop's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
from pathlib import Path

import httpx2
from PIL import Image, UnidentifiedImageError

from replan.clients import PerLoop, Refused, RetryBudget, Transient, alist_models, error_message, one_line
from replan.eval.judges import (
    JudgeConfigError,
    JudgeResult,
    OpenAIJudge,
    build_parts,
    describe_templates,
    load_templates,
)
from replan.images import to_rgb
from replan.train.rewards import EVAL_DIMENSION, JUDGE_DIMENSIONS

logger = logging.getLogger("replan.train.remote")
RETRYABLE = (408, 409, 429)  # and every 5xx


class RewardServerError(RuntimeError):
    """A reward server cannot be used at all: never ready, failed to load, or a wrong URL."""


class EditError(RuntimeError):
    """One edit failed: refused (``status`` 4xx, not retried) or still failing after the retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_image(data: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            im.load()
            return to_rgb(im)
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise Transient(f"reply image_base64 is not a readable image ({type(e).__name__})") from None


def _read_execute_reply(response: httpx2.Response) -> tuple[Image.Image, dict]:
    """The edited image and the rest of a 2xx reply (``plan``, ``boxes``, ...); ``Transient`` when unusable."""
    try:
        data = json.loads(response.content.decode("utf-8"))
    except (ValueError, RecursionError):
        raise Transient(f"reply is not JSON: {one_line(response.content.decode('utf-8', 'replace'), 120)!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("image_base64"), str):
        raise Transient("reply has no image_base64")
    return _decode_image(data["image_base64"]), {k: v for k, v in data.items() if k != "image_base64"}


def _retry_after(response: httpx2.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date
        return None
    return seconds if seconds >= 0 else None


async def _get(client: httpx2.AsyncClient, url: str, timeout: float) -> tuple[int, bytes]:
    """One GET: ``(status, body)`` for any HTTP status; ``Transient`` when no HTTP answer came."""
    try:
        response = await client.get(url, timeout=timeout)
    except httpx2.HTTPError as e:  # refused, reset, timeout
        raise Transient(f"{type(e).__name__}: {one_line(str(e) or type(e).__name__)}") from None
    return response.status_code, response.content


# ---------------------------------------------------------------------------------------------------- edit server
class EditClient:
    """``await execute(image, response, instruction) -> PIL`` against the edit server; see the module docstring.
    ``max_workers``: the most connections open at once."""

    def __init__(self, base_url: str, timeout: float = 600.0, max_retries: int = 3, backoff: float = 5.0,
                 max_backoff: float = 60.0, *, max_workers: int = 32):
        if not isinstance(base_url, str) or not base_url.strip().startswith(("http://", "https://")):
            raise ValueError(f"edit server URL must be http(s)://host:port, got {base_url!r}")
        if not timeout > 0 or not backoff >= 0 or not max_backoff >= 0 or int(max_retries) < 0:
            raise ValueError("need timeout > 0, backoff >= 0, max_backoff >= 0 and max_retries >= 0")
        self.base_url = base_url.strip().rstrip("/")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        limits = httpx2.Limits(max_connections=int(max_workers), max_keepalive_connections=int(max_workers))
        self.clients = PerLoop(lambda: httpx2.AsyncClient(timeout=self.timeout, limits=limits))

    def __repr__(self) -> str:
        return f"EditClient({self.base_url!r})"

    async def aclose(self) -> None:
        await self.clients.aclose()

    def close(self) -> None:
        """Nothing to release outside an event loop (``aclose()`` inside one)."""

    async def execute(self, image: Image.Image, response: str, instruction: str, box_frame: str | None = None,
                      planner_size: tuple[int, int] | None = None, parse: str | None = None) -> Image.Image:
        """The edited image (see ``execute_reply``)."""
        return (await self.execute_reply(image, response, instruction, box_frame, planner_size, parse))[0]

    async def execute_reply(self, image: Image.Image, response: str, instruction: str, box_frame: str | None = None,
                            planner_size: tuple[int, int] | None = None,
                            parse: str | None = None) -> tuple[Image.Image, dict]:
        """Execute ``response`` on ``image``: the edited image and what the server says it ran (``plan``, ``boxes``,
        ``box_frame``, ``planner_size``). ``box_frame``/``planner_size`` tell the server how to read the reply's
        boxes and ``parse`` how to read the reply (omitted: the server's defaults)."""
        url = self.base_url + "/v1/plans/execute"
        body = {"image_base64": await asyncio.to_thread(png_base64, image), "response": response,
                "instruction": instruction}
        if box_frame is not None:
            body["box_frame"] = box_frame
        if planner_size is not None:
            body["planner_size"] = [int(v) for v in planner_size]
        if parse is not None:
            body["parse"] = parse
        budget, last = RetryBudget(self.max_retries, self.backoff, self.max_backoff), "no attempt made"
        while budget.left > 0:
            budget.spend(1)
            try:
                return await self._execute_once(url, body)
            except Refused as e:
                raise EditError(f"edit server refused the plan ({e})", e.status) from None
            except Transient as e:
                last, retry_after = str(e), e.retry_after
            if budget.left > 0:
                delay = budget.delay(retry_after)
                logger.warning("edit at %s: %s; retry %d/%d in %.3g s", url, last, budget.used, self.max_retries,
                               delay)
                await asyncio.sleep(delay)
        raise EditError(f"edit at {url} failed after {budget.used} attempt(s): {last}")

    async def _execute_once(self, url: str, body: dict) -> tuple[Image.Image, dict]:
        """One POST: the decoded reply; ``Transient`` (5xx, 408/409/429, timeout, connection, unusable reply) or
        ``Refused`` (any other 4xx)."""
        try:
            response = await self.clients.get().post(url, json=body)
        except httpx2.TimeoutException:
            raise Transient(f"no reply within {self.timeout:g} s") from None
        except httpx2.HTTPError as e:  # connection refused or reset, the reply broken off
            raise Transient(f"connection error ({type(e).__name__}: {one_line(str(e) or '-')})") from None
        status = response.status_code
        if status >= 400:
            message = error_message(response.content) or response.reason_phrase or "(no message)"
            if status >= 500 or status in RETRYABLE:
                raise Transient(f"HTTP {status}: {message}", _retry_after(response))
            raise Refused(status, message)
        return await asyncio.to_thread(_read_execute_reply, response)

    async def wait_ready(self, timeout: float = 1800.0, interval: float = 2.0) -> None:
        """Poll ``GET /health`` until ``"ready"``; ``RewardServerError`` on ``"failed"``, 404 or ``timeout``."""
        url = self.base_url + "/health"

        def check(status: int, raw: bytes):
            try:
                state = json.loads(raw.decode("utf-8")).get("status")
            except (ValueError, AttributeError, RecursionError):
                state = None
            if status == 200 and state == "ready":
                return True
            if state == "failed":
                raise RewardServerError(f"edit server at {self.base_url} failed to load its model: "
                                        f"{error_message(raw)}")
            if status == 404:
                raise RewardServerError(f"edit server has no {url} (HTTP 404): is edit_url the server root, "
                                        "without /v1?")
            return f"HTTP {status}, status {state!r}"

        async def attempt(wait: float):
            return check(*await _get(self.clients.get(), url, wait))

        await _poll(attempt, url, "edit server", timeout, interval)


# ---------------------------------------------------------------------------------------------------- judge
def load_reward_templates(prompts_dir: str | Path | None = None) -> dict[str, str]:
    """``{target, effect, consistency: template}``: the eval rubrics ``target_following.txt``, ``effect.txt`` and
    ``consistency.txt`` from ``prompts_dir`` (else replan's own), as the official training judge uses the eval's."""
    files = {EVAL_DIMENSION[dim]: EVAL_DIMENSION[dim] for dim in JUDGE_DIMENSIONS}
    templates = load_templates(prompts_dir, files=files)
    return {dim: templates[EVAL_DIMENSION[dim]] for dim in JUDGE_DIMENSIONS}


def _shrink(image: Image.Image, max_pixels: int | None) -> Image.Image:
    w, h = image.size
    if not max_pixels or w * h <= max_pixels:
        return image
    scale = (max_pixels / (w * h)) ** 0.5
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)


class JudgeClient:
    """Three judge dimensions (target, effect, consistency) on an OpenAI-compatible endpoint; the model name comes
    from the caller. Images go in at the templates' markers; ``max_pixels`` downsizes both images first (None: as
    official, unchanged). Retries: the eval ``OpenAIJudge``'s (also on replies without an allowed score), which
    ``backend`` is; ``max_workers``: the most connections open at once."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 300.0,
                 max_retries: int = 3, backoff: float = 5.0, max_backoff: float = 60.0, max_tokens: int = 1024,
                 temperature: float | None = 0.0, max_pixels: int | None = None, prompts_dir: str | None = None,
                 extra_body: dict | None = None, max_workers: int = 64, score_parse: str = "official"):
        if not isinstance(model, str) or not model.strip():
            raise JudgeConfigError("no judge model: set judge_model in the reward config (e.g. the name vLLM serves)")
        self.backend = OpenAIJudge(model, base_url=base_url, api_key=api_key or "EMPTY", extra_body=extra_body,
                                   timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff,
                                   max_tokens=max_tokens, temperature=temperature, score_parse=score_parse,
                                   max_connections=max_workers)
        self.base_url, self.model, self.max_pixels = self.backend.base_url, self.backend.model, max_pixels
        self.templates = load_reward_templates(prompts_dir)
        self.rubrics = describe_templates(self.templates, prompts_dir)  # {dim: {"name", "sha256"}}, for the logs

    def __repr__(self) -> str:
        return f"JudgeClient({self.base_url!r}, model={self.model!r})"

    async def aclose(self) -> None:
        await self.backend.aclose()

    def close(self) -> None:
        self.backend.client.close()

    async def score(self, dimension: str, original: Image.Image, edited: Image.Image, instruction: str,
                    referring_expression: str) -> JudgeResult:
        """One dimension; ``result.score`` is None when the judge failed (``result.error`` says why)."""
        eval_dim = EVAL_DIMENSION[dimension]
        parts = await asyncio.to_thread(build_parts, eval_dim, self.templates[dimension], instruction,
                                        referring_expression, _shrink(original, self.max_pixels),
                                        _shrink(edited, self.max_pixels))
        return await self.backend.ajudge(eval_dim, parts)

    async def score_all(self, original, edited, instruction, referring_expression,
                        semaphore: asyncio.Semaphore | None = None) -> dict[str, JudgeResult]:
        async def one(dim):
            if semaphore is None:
                return await self.score(dim, original, edited, instruction, referring_expression)
            async with semaphore:
                return await self.score(dim, original, edited, instruction, referring_expression)

        results = await asyncio.gather(*(one(d) for d in JUDGE_DIMENSIONS))
        return dict(zip(JUDGE_DIMENSIONS, results))

    async def wait_ready(self, timeout: float = 1800.0, interval: float = 2.0) -> list[str]:
        """Poll ``GET {base_url}/models`` until it answers 200 listing the model; the served model ids."""
        url = self.base_url + "/models"

        async def attempt(wait: float):
            try:
                ids = await alist_models(self.backend.aclients.get(), wait)
            except Refused as e:
                if e.status in (401, 403, 404):
                    what = "refused the API key" if e.status != 404 else "has no /models (does judge_url end in /v1?)"
                    raise JudgeConfigError(f"judge server at {url} {what}: {e}") from None
                return str(e)
            if ids and self.model not in ids:
                raise JudgeConfigError(f"judge server at {self.base_url} serves {ids}, not {self.model!r}: "
                                       "set judge_model to the served name")
            return ids

        return await _poll(attempt, url, "judge server", timeout, interval)


async def _poll(attempt, url: str, what: str, timeout: float, interval: float):
    """``await attempt(wait)`` until it returns a non-string result (a string is the reason to keep waiting, and so is
    ``Transient``; ``attempt`` raises on a final failure); ``RewardServerError`` after ``timeout`` seconds."""
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while True:
        try:
            result = await attempt(max(0.05, min(10.0, deadline - time.monotonic())))
            if not isinstance(result, str):
                return result
            last = result
        except Transient as e:
            last = str(e)
        if time.monotonic() >= deadline:
            raise RewardServerError(f"{what} at {url} not ready after {timeout:g} s; last: {last}")
        await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))
