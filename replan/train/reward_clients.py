"""HTTP clients of the stage-2 reward (``replan.train.remote``): the edit server and the VLM judge.

``EditClient``: ``POST {edit_url}/v1/plans/execute`` with ``{"image_base64", "response", "instruction", "box_frame",
"planner_size"}`` answers ``{"image_base64", "plan", "boxes", ...}``; ``GET {edit_url}/health`` answers ``{"status":
"loading"|"ready"|"failed"}``. ``JudgeClient``: three judge dimensions on any OpenAI-compatible ``/chat/completions``
endpoint (vLLM) through the eval judges' ``OpenAIJudge``, with the eval rubrics (the official training judge uses the
same files) and ``score_parse``. 5xx, 408/429, timeouts, connection errors and unreadable replies are retried with
exponential backoff; any other 4xx is final for that sample. HTTP is the standard library's, run in private thread
pools; all public waiting is ``async``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from replan.eval.judges import (
    JudgeConfigError,
    JudgeResult,
    OpenAIJudge,
    _post_json,
    build_parts,
    describe_templates,
    load_templates,
)
from replan.images import to_rgb
from replan.planner.openai_backend import _error_message, _model_ids, _one_line, _Refused, _Transient
from replan.train.rewards import EVAL_DIMENSION, JUDGE_DIMENSIONS

logger = logging.getLogger("replan.train.remote")


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
        raise _Transient(f"reply image_base64 is not a readable image ({type(e).__name__})") from None


def _execute_once(url: str, body: dict, timeout: float) -> tuple[Image.Image, dict]:
    """One POST to the edit server: the decoded edited image and the rest of the reply (``plan``, ``boxes``, ...);
    ``_Transient`` / ``_Refused`` as ``_post_json``."""
    try:
        raw = _post_json(url, body, "EMPTY", timeout)
    except http.client.HTTPException as e:  # e.g. IncompleteRead: the connection broke mid-reply
        raise _Transient(f"connection error ({type(e).__name__})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _Transient(f"reply is not JSON: {_one_line(raw.decode('utf-8', 'replace'), 120)!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("image_base64"), str):
        raise _Transient("reply has no image_base64")
    return _decode_image(data["image_base64"]), {k: v for k, v in data.items() if k != "image_base64"}


def _get(url: str, timeout: float, api_key: str | None = None) -> tuple[int, bytes]:
    """One GET: ``(status, body)`` for any HTTP status; ``_Transient`` when no HTTP answer came."""
    headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.read()
        except OSError:
            return e.code, b""
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
        raise _Transient(f"{type(e).__name__}: {_one_line(str(getattr(e, 'reason', e)))}") from None


class _Pooled:
    """Blocking HTTP in a private thread pool, so that bounded concurrency is not capped by asyncio's default pool."""

    def __init__(self, max_workers: int, prefix: str):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=prefix)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _delay(backoff: float, max_backoff: float, attempt: int, retry_after: float | None = None) -> float:
    delay = min(backoff * 2 ** (attempt - 1), max_backoff)
    return min(max(delay, retry_after), max_backoff) if retry_after is not None else delay


# ---------------------------------------------------------------------------------------------------- edit server
class EditClient(_Pooled):
    """``await execute(image, response, instruction) -> PIL`` against the edit server; see the module docstring."""

    def __init__(self, base_url: str, timeout: float = 600.0, max_retries: int = 3, backoff: float = 5.0,
                 max_backoff: float = 60.0, *, max_workers: int = 32):
        if not isinstance(base_url, str) or not base_url.strip().startswith(("http://", "https://")):
            raise ValueError(f"edit server URL must be http(s)://host:port, got {base_url!r}")
        if not timeout > 0 or not backoff >= 0 or not max_backoff >= 0 or int(max_retries) < 0:
            raise ValueError("need timeout > 0, backoff >= 0, max_backoff >= 0 and max_retries >= 0")
        super().__init__(max_workers, "replan-edit")
        self.base_url = base_url.strip().rstrip("/")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)

    def __repr__(self) -> str:
        return f"EditClient({self.base_url!r})"

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
        body = {"image_base64": await self._run(png_base64, image), "response": response, "instruction": instruction}
        if box_frame is not None:
            body["box_frame"] = box_frame
        if planner_size is not None:
            body["planner_size"] = [int(v) for v in planner_size]
        if parse is not None:
            body["parse"] = parse
        last, attempts = "no attempt made", self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._run(_execute_once, url, body, self.timeout)
            except _Refused as e:
                raise EditError(f"edit server refused the plan ({e})", e.status) from None
            except _Transient as e:
                last, retry_after = str(e), e.retry_after
            if attempt < attempts:
                delay = _delay(self.backoff, self.max_backoff, attempt, retry_after)
                logger.warning("edit at %s: %s; retry %d/%d in %.3g s", url, last, attempt, self.max_retries, delay)
                await asyncio.sleep(delay)
        raise EditError(f"edit at {url} failed after {attempts} attempt(s): {last}")

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
                                        f"{_error_message(raw)}")
            if status == 404:
                raise RewardServerError(f"edit server has no {url} (HTTP 404): is edit_url the server root, "
                                        "without /v1?")
            return f"HTTP {status}, status {state!r}"

        await _poll(self._run, url, None, check, "edit server", timeout, interval)


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


class JudgeClient(_Pooled):
    """Three judge dimensions (target, effect, consistency) on an OpenAI-compatible endpoint; the model name comes
    from the caller. Images go in at the templates' markers; ``max_pixels`` downsizes both images first (None: as
    official, unchanged). Retries: the eval ``Judge``'s (also on replies without an allowed score)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 300.0,
                 max_retries: int = 3, backoff: float = 5.0, max_backoff: float = 60.0, max_tokens: int = 1024,
                 temperature: float | None = 0.0, max_pixels: int | None = None, prompts_dir: str | None = None,
                 extra_body: dict | None = None, max_workers: int = 64, score_parse: str = "official"):
        if not isinstance(model, str) or not model.strip():
            raise JudgeConfigError("no judge model: set judge_model in the reward config (e.g. the name vLLM serves)")
        self._judge = OpenAIJudge(model, base_url=base_url, api_key=api_key or "EMPTY", extra_body=extra_body,
                                  timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff,
                                  max_tokens=max_tokens, temperature=temperature, score_parse=score_parse)
        super().__init__(max_workers, "replan-judge")
        self.base_url, self.model, self.max_pixels = self._judge.base_url, self._judge.model, max_pixels
        self.templates = load_reward_templates(prompts_dir)
        self.rubrics = describe_templates(self.templates, prompts_dir)  # {dim: {"name", "sha256"}}, for the logs

    def __repr__(self) -> str:
        return f"JudgeClient({self.base_url!r}, model={self.model!r})"

    async def score(self, dimension: str, original: Image.Image, edited: Image.Image, instruction: str,
                    referring_expression: str) -> JudgeResult:
        """One dimension; ``result.score`` is None when the judge failed (``result.error`` says why)."""
        return await self._run(self._score_sync, dimension, original, edited, instruction, referring_expression)

    def _score_sync(self, dimension, original, edited, instruction, referring_expression) -> JudgeResult:
        eval_dim = EVAL_DIMENSION[dimension]
        parts = build_parts(eval_dim, self.templates[dimension], instruction, referring_expression,
                            _shrink(original, self.max_pixels), _shrink(edited, self.max_pixels))
        return self._judge.judge(eval_dim, parts)

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

        def check(status: int, raw: bytes):
            if status == 200:
                ids = _model_ids(raw)
                if ids and self.model not in ids:
                    raise JudgeConfigError(f"judge server at {self.base_url} serves {ids}, not {self.model!r}: "
                                           "set judge_model to the served name")
                return ids
            if status in (401, 403, 404):
                what = "refused the API key" if status != 404 else "has no /models (does judge_url end in /v1?)"
                raise JudgeConfigError(f"judge server at {url} {what}: HTTP {status} {_error_message(raw)}")
            return f"HTTP {status} {_error_message(raw)}"

        return await _poll(self._run, url, self._judge._api_key, check, "judge server", timeout, interval)


async def _poll(run, url: str, api_key, check, what: str, timeout: float, interval: float):
    """GET ``url`` until ``check(status, raw)`` returns a non-string result (a string is the reason to keep waiting;
    ``check`` raises on a final failure); ``RewardServerError`` after ``timeout`` seconds."""
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while True:
        try:
            wait = max(0.05, min(10.0, deadline - time.monotonic()))
            status, raw = await run(_get, url, wait, api_key)
            result = check(status, raw)
            if not isinstance(result, str):
                return result
            last = result
        except _Transient as e:
            last = str(e)
        if time.monotonic() >= deadline:
            raise RewardServerError(f"{what} at {url} not ready after {timeout:g} s; last: {last}")
        await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))
