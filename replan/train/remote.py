"""Stage-2 reward over the network (replan-spec §5.5): the edit server executes a plan, a VLM judge scores the edit.

    config = RewardConfig.from_yaml("configs/train/stage2.yaml")          # the ``reward:`` section
    reward = config.build()                                               # Stage2Reward(EditClient, JudgeClient)
    results = reward([{"image": pil, "instruction": "...", "referring_expression": "...", "response": text}, ...])
    rewards = [r["overall"] for r in results]                             # every dict has rewards.PLANNING_KEYS

Edit server: ``POST {edit_url}/v1/plans/execute`` with ``{"image_base64", "response", "instruction", "box_frame",
"planner_size"}`` answers ``{"image_base64", "plan", "seconds"}``; ``GET {edit_url}/health`` answers ``{"status":
"loading"|"ready"|"failed"}``. ``box_frame`` (``processor`` default, ``original`` as official) makes the server read
the reply's boxes exactly as inference does: with ``processor`` each sample's ``planner_size`` (the frame the policy
saw: the TRL trainer takes it from ``image_grid_thw``) or else ``smart_resize`` of the image with
``planner_min_pixels``/``planner_max_pixels`` is sent along. Judge: any OpenAI-compatible ``/chat/completions``
endpoint (vLLM), through the eval judges' ``OpenAIJudge`` with the eval rubrics (``target_following``, ``effect``,
``consistency``: the official training judge uses the same files; ``prompts_dir`` takes the official ones) and
``score_parse`` (``official``: a numeric score counts as given). Before the first batch both servers are polled
until ready (the official client scored 0 while the models were loading). 5xx, 408/429, timeouts, connection errors
and unreadable replies are retried with exponential backoff; any other 4xx is final for that sample. A wrong judge
key, URL or model (401/403/404) and a server that never becomes ready raise, since every later call would fail too.
HTTP is the standard library's, run in thread pools; all public waiting is ``async``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from replan.config_io import check_keys, read_yaml
from replan.coords import BOX_FRAMES, processor_frame
from replan.eval.judges import (
    SCORE_PARSE,
    JudgeConfigError,
    JudgeResult,
    OpenAIJudge,
    _post_json,
    build_parts,
    describe_templates,
    load_templates,
)
from replan.images import load_image, to_rgb
from replan.planner.openai_backend import _error_message, _model_ids, _one_line, _Refused, _Transient
from replan.train.rewards import EVAL_DIMENSION, JUDGE_DIMENSIONS, editing_score, planning_score, should_execute

logger = logging.getLogger(__name__)


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


def _execute_once(url: str, body: dict, timeout: float) -> Image.Image:
    """One POST to the edit server and the decoded edited image; ``_Transient`` / ``_Refused`` as ``_post_json``."""
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
    return _decode_image(data["image_base64"])


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
                      planner_size: tuple[int, int] | None = None) -> Image.Image:
        """Execute ``response`` on ``image``; ``box_frame``/``planner_size`` tell the server how to read its boxes
        (omitted: the server's default)."""
        url = self.base_url + "/v1/plans/execute"
        body = {"image_base64": await self._run(png_base64, image), "response": response, "instruction": instruction}
        if box_frame is not None:
            body["box_frame"] = box_frame
        if planner_size is not None:
            body["planner_size"] = [int(v) for v in planner_size]
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


# ---------------------------------------------------------------------------------------------------- the reward
def _as_image(value) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and "bytes" in value:  # a datasets Image feature
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(bytes(value))) as im:
            im.load()
            return to_rgb(im)
    return load_image(value)


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


class Stage2Reward:
    """``await score(samples)`` / ``reward(samples)``: one ``PLANNING_KEYS`` dict per sample, in order.

    A sample is ``{"image", "instruction", "referring_expression", "response"}`` (image: PIL, path, bytes or
    ``{"bytes"}``), optionally ``"planner_size"`` (W, H), the frame the policy saw the image in (default:
    ``processor_frame`` of the image with ``planner_min_pixels``/``planner_max_pixels``); ``box_frame`` says how the
    edit server reads the boxes (see the module docstring). At most ``concurrency`` edits and ``judge_concurrency``
    judge calls run at once. Plans that fail
    ``should_execute`` are not sent (planning 0, editing part kept); a sample without image, instruction or
    referring expression scores its editing part only and is logged. ``last_details`` holds, per sample of the last
    batch, the gate reason and any edit or judge errors (text, for logs).
    """

    def __init__(self, edit: EditClient, judge: JudgeClient, concurrency: int = 8, *,
                 judge_concurrency: int | None = None, sharp: int = 4, format_weight: float = 0.2,
                 ready_timeout: float | None = 1800.0, ready_interval: float = 2.0, box_frame: str = "processor",
                 planner_min_pixels: int = 4 * 28 * 28, planner_max_pixels: int = 16384 * 28 * 28):
        if int(concurrency) < 1 or (judge_concurrency is not None and int(judge_concurrency) < 1):
            raise ValueError("concurrency and judge_concurrency must be >= 1")
        if box_frame not in BOX_FRAMES:
            raise ValueError(f"box_frame must be one of {', '.join(BOX_FRAMES)}, got {box_frame!r}")
        self.box_frame, self.planner_pixels = box_frame, (int(planner_min_pixels), int(planner_max_pixels))
        self.edit, self.judge, self.concurrency = edit, judge, int(concurrency)
        self.judge_concurrency = int(judge_concurrency or 3 * self.concurrency)
        self.sharp, self.format_weight = sharp, format_weight
        self.ready_timeout, self.ready_interval, self._ready = ready_timeout, ready_interval, False
        self.last_details: list[dict] = []

    @classmethod
    def from_config(cls, config: RewardConfig | dict) -> Stage2Reward:
        """Clients and reward from a ``RewardConfig`` (or its dict form)."""
        return (config if isinstance(config, RewardConfig) else RewardConfig.from_dict(config)).build()

    async def wait_ready(self, timeout: float | None = None) -> None:
        timeout = timeout if timeout is not None else (self.ready_timeout or 1800.0)
        await asyncio.gather(self.edit.wait_ready(timeout, self.ready_interval),
                             self.judge.wait_ready(timeout, self.ready_interval))
        self._ready = True

    async def score(self, samples: list[dict]) -> list[dict]:
        if not self._ready and self.ready_timeout is not None:
            await self.wait_ready()
        start = time.perf_counter()
        edit_sem, judge_sem = asyncio.Semaphore(self.concurrency), asyncio.Semaphore(self.judge_concurrency)
        pairs = await asyncio.gather(*(self._one(i, s, edit_sem, judge_sem) for i, s in enumerate(samples)))
        results, self.last_details = [p[0] for p in pairs], [p[1] for p in pairs]
        logger.info("stage-2 reward: %d samples, %d executed, %d edit and %d judge failures, %.1f s", len(results),
                    sum(r["executed"] for r in results), sum(r["edit_failed"] for r in results),
                    sum(r["judge_failed"] for r in results), time.perf_counter() - start)
        return results

    def __call__(self, samples: list[dict]) -> list[dict]:
        """Synchronous ``score``, for trainers; works with or without an event loop running in this thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.score(samples))
        with ThreadPoolExecutor(1, thread_name_prefix="replan-reward") as pool:
            return pool.submit(asyncio.run, self.score(samples)).result()

    def close(self) -> None:
        self.edit.close()
        self.judge.close()

    def planner_size(self, image_size, given=None) -> tuple[int, int] | None:
        """The frame the edit server reads the reply's boxes in: None for ``box_frame="original"``, else ``given``
        (the trainer's, from ``image_grid_thw``) or ``smart_resize`` of the image."""
        if self.box_frame == "original":
            return None
        if given is not None:
            w, h = (int(v) for v in given)
            if w > 0 and h > 0:
                return (w, h)
        return processor_frame(image_size, *self.planner_pixels)

    async def _one(self, i, sample, edit_sem, judge_sem) -> tuple[dict, dict]:
        details = {"index": i, "reason": "", "edit_error": None, "judge_errors": {}}
        editing = editing_score(None)

        def result(scores=(None, None, None), **flags) -> tuple[dict, dict]:
            return planning_score(*scores, editing, self.sharp, format_weight=self.format_weight, **flags), details

        try:
            return await self._score_one(i, sample if isinstance(sample, dict) else {}, edit_sem, judge_sem,
                                         details, result, editing)
        except (JudgeConfigError, RewardServerError):
            raise  # every later call would fail the same way: stop the run
        except Exception as e:  # noqa: BLE001 - one odd sample must not end a training run
            logger.exception("stage-2 reward, sample %d: unexpected error; planning score 0", i)
            details["reason"] = f"unexpected error: {type(e).__name__}: {_one_line(str(e), 200)}"
            return result(executed=False, judge_failed=True)

    async def _score_one(self, i, sample, edit_sem, judge_sem, details, result, editing) -> tuple[dict, dict]:
        response = sample.get("response")
        try:
            image = _as_image(sample.get("image"))
        except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            image, details["reason"] = None, f"image unreadable: {_one_line(str(e), 200)}"
        editing.update(editing_score(response))
        instruction, referring = _text(sample.get("instruction")), _text(sample.get("referring_expression"))
        missing = [name for name, v in (("image", image), ("instruction", instruction),
                                        ("referring_expression", referring)) if not v]
        if missing:
            details["reason"] = details["reason"] or f"sample lacks {', '.join(missing)}"
            logger.warning("stage-2 reward, sample %d: %s; planning score 0", i, details["reason"])
            return result(executed=False, missing_input=True)
        ok, details["reason"] = should_execute(response)
        if not ok:
            return result(executed=False)
        text = response if isinstance(response, str) else bytes(response).decode("utf-8", errors="replace")
        planner_size = self.planner_size(image.size, sample.get("planner_size"))
        try:
            async with edit_sem:
                edited = await self.edit.execute(image, text.strip(), instruction, self.box_frame, planner_size)
        except EditError as e:
            details["edit_error"] = str(e)
            logger.warning("stage-2 reward, sample %d: %s", i, e)
            return result(executed=True, edit_failed=True)
        judged = await self.judge.score_all(image, edited, instruction, referring, judge_sem)
        details["judge_errors"] = {d: r.error for d, r in judged.items() if r.score is None}
        if details["judge_errors"]:
            logger.warning("stage-2 reward, sample %d: judge failed on %s", i, details["judge_errors"])
        scores = tuple(judged[d].score for d in JUDGE_DIMENSIONS)
        return result(scores, executed=True, judge_failed=bool(details["judge_errors"]))


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class RewardConfig:
    """The stage-2 reward's settings, e.g. a ``reward:`` section of a training YAML. ``judge_model`` is required;
    the judge API key is read from the environment variable named ``judge_api_key_env`` (absent: ``EMPTY``)."""

    edit_url: str = "http://localhost:8001"
    judge_url: str = "http://localhost:8000/v1"
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    judge_concurrency: int = 24
    edit_timeout: float = 600.0
    judge_timeout: float = 300.0
    edit_retries: int = 3
    judge_retries: int = 3
    backoff: float = 5.0
    max_backoff: float = 60.0
    ready_timeout: float = 1800.0
    ready_interval: float = 2.0
    judge_max_tokens: int = 1024
    judge_temperature: float = 0.0
    judge_max_pixels: int | None = None
    prompts_dir: str | None = None  # judge rubrics (None: replan's wording; the official files work as they are)
    score_parse: str = "official"  # official: a numeric judge score counts as given | strict: off-scale fails
    box_frame: str = "processor"  # processor: boxes read in the frame the policy saw | original: as official
    planner_min_pixels: int = 4 * 28 * 28  # smart_resize bounds for samples without a planner_size (qwen_vl_utils)
    planner_max_pixels: int = 16384 * 28 * 28
    sharp: int = 4
    format_weight: float = 0.2

    @classmethod
    def from_dict(cls, data: dict | None) -> RewardConfig:
        cfg = cls(**check_keys(dict(data or {}), cls, "reward config", "reward setting"))
        if cfg.box_frame not in BOX_FRAMES:
            raise ValueError(f"reward box_frame must be one of {', '.join(BOX_FRAMES)}, got {cfg.box_frame!r}")
        if cfg.score_parse not in SCORE_PARSE:
            raise ValueError(f"reward score_parse must be one of {', '.join(SCORE_PARSE)}, got {cfg.score_parse!r}")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = "reward") -> RewardConfig:
        data = read_yaml(path)
        if section:
            if not isinstance(data, dict) or not isinstance(data.get(section), dict):
                raise ValueError(f"{path} has no {section!r} section")
            data = data[section]
        return cls.from_dict(data)

    def build(self) -> Stage2Reward:
        edit = EditClient(self.edit_url, self.edit_timeout, self.edit_retries, self.backoff, self.max_backoff,
                          max_workers=max(self.concurrency, 1))
        judge = JudgeClient(self.judge_url, self.judge_model, os.environ.get(self.judge_api_key_env) or "EMPTY",
                            timeout=self.judge_timeout, max_retries=self.judge_retries, backoff=self.backoff,
                            max_backoff=self.max_backoff, max_tokens=self.judge_max_tokens,
                            temperature=self.judge_temperature, max_pixels=self.judge_max_pixels,
                            prompts_dir=self.prompts_dir, max_workers=max(self.judge_concurrency, 1),
                            score_parse=self.score_parse)
        logger.info("stage-2 judge rubrics: %s; score_parse %s; box_frame %s",
                    ", ".join(f"{d} {t['name']} ({t['sha256'][:12]})" for d, t in judge.rubrics.items()),
                    self.score_parse, self.box_frame)
        return Stage2Reward(edit, judge, self.concurrency, judge_concurrency=self.judge_concurrency, sharp=self.sharp,
                            format_weight=self.format_weight, ready_timeout=self.ready_timeout,
                            ready_interval=self.ready_interval, box_frame=self.box_frame,
                            planner_min_pixels=self.planner_min_pixels, planner_max_pixels=self.planner_max_pixels)
