"""A planner behind any OpenAI-compatible chat-completions endpoint that takes images.

Typical use: a vLLM server serving the RePlan checkpoint (``vllm serve TainU/RePlan-Qwen2.5-VL-7B``), or a hosted
API, through the official ``openai`` SDK (``replan.clients``): the SDK retries 5xx, 408/409/429, timeouts and
connection errors with its own back-off; a reply that cannot be used (not JSON, no content) is asked again, all within
``max_retries``.

Frames. Qwen2.5-VL grounds boxes in pixels of the image its processor produced (``smart_resize``). By default
(``frame="resize"``) the image is resized here with ``smart_resize`` before it is sent, so the frame the model saw is
exactly the size of the image sent: the server's processor leaves an image whose sides are multiples of 28 and whose
area is within its pixel bounds unchanged. Keep ``min_pixels``/``max_pixels`` equal to (or within) the server's
processor bounds, e.g. vLLM's ``--mm-processor-kwargs``. ``frame="server"`` sends the original image and assumes the
server applies ``smart_resize`` with the same bounds; ``frame="original"`` sends the original image and reads boxes
as original-image pixels (for models that ground in the pixels they were given without resizing).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time

from PIL import Image

from replan.clients import (
    Refused,
    RetryBudget,
    Transient,
    chat_call,
    endpoint_url,
    first_set,
    list_models,
    sync_client,
)
from replan.coords import Size, smart_resize
from replan.images import to_rgb
from replan.planner.base import Planner, PlannerError, PlannerReply

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "TainU/RePlan-Qwen2.5-VL-7B"
DEFAULT_MIN_PIXELS = 4 * 28 * 28  # qwen_vl_utils defaults
DEFAULT_MAX_PIXELS = 16384 * 28 * 28
FRAMES = ("resize", "server", "original")
BASE_URL_ENV = ("REPLAN_PLANNER_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("REPLAN_PLANNER_API_KEY", "OPENAI_API_KEY")


class OpenAIPlanner(Planner):
    """``plan(image, instruction)`` through ``POST {base_url}/chat/completions``.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``; else ``$REPLAN_PLANNER_BASE_URL``, else ``$OPENAI_BASE_URL``.
        api_key: else ``$REPLAN_PLANNER_API_KEY``, else ``$OPENAI_API_KEY``, else ``"EMPTY"`` (vLLM's default).
        model: else ``$REPLAN_PLANNER_MODEL``, else ``TainU/RePlan-Qwen2.5-VL-7B``.
        timeout: seconds allowed for one request.
        max_retries: requests after the first, in all: the SDK's retries (on 5xx, 408/409/429, timeouts, connection
            errors; its back-off, a server's ``Retry-After`` honoured) and ours after a reply that cannot be used.
        backoff: seconds before asking again after an unusable reply, doubling each time up to ``max_backoff``.
        temperature, max_tokens: sampling; temperature 0 is greedy.
        template, strict, parse, box_frame, template_name: as ``Planner``.
        min_pixels, max_pixels: the ``smart_resize`` bounds (defaults: the ``qwen_vl_utils`` values).
        frame: ``"resize"`` (default), ``"server"`` or ``"original"``; see the module docstring.
        extra_body: more fields merged into the request JSON (e.g. ``{"seed": 0, "top_p": 1.0}``).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        *,
        timeout: float = 300.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int = 2048,
        template: str | None = None,
        strict: bool = False,
        parse: str | None = None,
        box_frame: str = "processor",
        template_name: str | None = None,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        frame: str = "resize",
        extra_body: dict | None = None,
    ):
        super().__init__(template=template, strict=strict, parse=parse, box_frame=box_frame,
                         template_name=template_name)
        self.base_url = endpoint_url(base_url, "planner", BASE_URL_ENV, "pass base_url (--base_url)")
        self.api_key = first_set(api_key, *API_KEY_ENV) or "EMPTY"
        self.model = model or os.environ.get("REPLAN_PLANNER_MODEL") or DEFAULT_MODEL
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not backoff >= 0 or not max_backoff >= 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {backoff!r} and {max_backoff!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.frame = frame
        self.extra_body = dict(extra_body or {})
        self.client = sync_client(self.base_url, self.api_key, self.timeout)  # retries: per call, within the budget

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIPlanner(base_url={self.base_url!r}, model={self.model!r}, frame={self.frame!r})"

    # ------------------------------------------------------------------------------------------------ images
    def frame_size(self, image_size: Size) -> Size:
        """(W, H) of the frame the model sees for an original image of ``image_size`` under this frame policy."""
        w, h = image_size
        if self.frame == "original":
            return (w, h)
        rh, rw = smart_resize(h, w, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (rw, rh)

    def encode_image(self, image: Image.Image) -> tuple[str, Size]:
        """The image as sent (resized when ``frame="resize"``): a PNG base64 data URL and its (W, H)."""
        image = to_rgb(image)
        if self.frame == "resize":
            size = self.frame_size(image.size)
            if size != image.size:
                image = image.resize(size, Image.Resampling.BICUBIC)  # what the Qwen2.5-VL processor uses
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), image.size

    # ------------------------------------------------------------------------------------------------ requests
    def _payload(self, content: list[dict]) -> dict:
        return {**self.extra_body, "model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def generate_text(self, prompt: str) -> str:
        return self._call_with_retries(self._payload([{"type": "text", "text": prompt}]))[1]

    def generate(self, image: Image.Image, prompt: str) -> PlannerReply:
        image = to_rgb(image)
        frame = self.frame_size(image.size)
        url, sent_size = self.encode_image(image)
        # image first, then text, as official
        payload = self._payload([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}])
        start = time.perf_counter()
        data, text, attempts = self._call_with_retries(payload)
        seconds = time.perf_counter() - start
        choice = data["choices"][0]
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        if finish == "length":
            logger.warning("planner reply stopped at max_tokens=%d; it may be truncated", self.max_tokens)
        extras = {
            "seconds": seconds,
            "attempts": attempts,
            "model": data.get("model") or self.model,
            "finish_reason": finish,
            "sent_size": sent_size,
            "frame_policy": self.frame,
        }
        if isinstance(data.get("usage"), dict):
            extras["usage"] = data["usage"]
        reply = PlannerReply(text=text, frame=frame, seconds=seconds, extras=extras)
        return reply

    def _call_with_retries(self, payload: dict) -> tuple[dict, str, int]:
        """``(reply JSON, text, requests made)``; ``PlannerError`` (one line) once the budget is spent or refused."""
        url = self.base_url + "/chat/completions"
        budget = RetryBudget(self.max_retries, self.backoff, self.max_backoff)
        last = "no attempt made"
        while budget.left > 0:
            try:
                data, text = chat_call(self.client, payload, budget, self.timeout)
                return data, text, budget.used
            except Refused as e:
                raise PlannerError(f"planner request to {url} was refused: {e}{_hint(e.status, self.model)}") from None
            except Transient as e:
                last = str(e)
            if budget.left > 0:
                delay = budget.delay()
                logger.warning("planner request to %s failed (%s); asking again (%d of %d requests left) in %.2g s",
                               url, last, budget.left, budget.total, delay)
                time.sleep(delay)
        raise PlannerError(f"planner request to {url} failed after {budget.used} attempt(s); last error: {last}")

    # ------------------------------------------------------------------------------------------------ readiness
    def wait_until_ready(self, timeout: float = 600.0, interval: float = 2.0) -> list[str]:
        """Poll ``GET {base_url}/models`` until it answers 200 (e.g. while vLLM loads); return the served model ids.

        Raises ``PlannerError`` after ``timeout`` seconds, or at once if the server refuses the key (401/403) or has
        no such route (404: base_url probably lacks ``/v1``).
        """
        url = self.base_url + "/models"
        deadline = time.monotonic() + timeout
        last = "no attempt made"
        while True:
            remaining = deadline - time.monotonic()
            try:
                ids = list_models(self.client, max(0.05, min(10.0, remaining)))
                if ids and self.model not in ids:
                    logger.warning("the server at %s serves %s, not %s", self.base_url, ", ".join(ids), self.model)
                return ids
            except Refused as e:
                if e.status in (401, 403, 404):
                    raise PlannerError(f"planner server at {url} answered {e}{_hint(e.status, None)}") from None
                last = str(e)
            except Transient as e:
                last = str(e)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PlannerError(f"planner server at {url} not ready after {timeout:g} s; last error: {last}")
            time.sleep(min(interval, remaining))


# ---------------------------------------------------------------------------------------------------- helpers
def _hint(status: int, model: str | None) -> str:
    if status in (401, 403):
        return " (check the API key: REPLAN_PLANNER_API_KEY or OPENAI_API_KEY)"
    if status == 404:
        served = f"; is model {model!r} served there" if model else ""
        return f" (does base_url end with /v1{served}?)"
    return ""
