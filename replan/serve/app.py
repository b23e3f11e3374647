"""The edit server: one model replica behind FastAPI.

Endpoints (contracts in ``replan/serve/__init__.py``):

* ``POST /v1/images/edits`` — the OpenAI Images edit API (multipart), plus replan fields (``plan``, ``no_plan``,
  ``seed``, ``steps``, ``expand``, ``switch``, ``guidance``) and a ``replan`` key in the response;
* ``POST /v1/plans/execute`` — JSON, for the GRPO reward: execute a planner reply on an image;
* ``GET /health`` and ``GET /v1/models``.

One ``EditService`` per replica owns the pipeline. It loads the models in a background thread, so ``/health`` answers
at once. Edits run one at a time on a single worker thread, never on the event loop. At most ``queue`` edits wait
behind the running one; more get 429 with ``Retry-After``. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from replan.images import MAX_PIXELS, check_image_size, to_rgb
from replan.parse import PlanParseError, parse_plan
from replan.plan import RegionPlan

logger = logging.getLogger("replan.serve")

PLANNERS = ("local", "openai", "none")
MB = 1024 * 1024
FIELD_SLACK = MB  # bytes allowed for the text fields beside the image
LOADING_RETRY_AFTER = 5  # seconds
MAX_STEPS = 1000
MAX_PROMPT = 32000
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass
class ServeConfig:
    backbone: str = "flux_kontext"
    model: str | None = None
    planner: str = "local"  # local | openai | none
    vlm_ckpt_path: str | None = None
    lora_path: str | None = None
    base_url: str | None = None  # openai planner endpoint
    api_key: str | None = None
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None
    stage_offload: str = "none"
    offload: str = "none"
    attention: str = "dense"
    queue: int = 8  # edits that may wait behind the running one
    max_image_mb: float = 20.0

    def __post_init__(self):
        if self.planner not in PLANNERS:
            raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {self.planner!r}")
        if self.queue < 0:
            raise ValueError(f"queue must be >= 0, got {self.queue}")
        if not self.max_image_mb > 0:
            raise ValueError(f"max_image_mb must be > 0, got {self.max_image_mb}")

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MB)


def load_pipeline(config: ServeConfig):
    """Load the ``RePlanPipeline`` a config describes (the default loader)."""
    import torch

    from replan.pipeline import RePlanPipeline

    planner_kwargs = {}
    if config.planner == "openai":
        planner_kwargs = {k: v for k, v in (("base_url", config.base_url), ("api_key", config.api_key)) if v}
    pipe = RePlanPipeline.from_pretrained(
        backbone=config.backbone, planner=None if config.planner == "none" else config.planner, model=config.model,
        vlm_ckpt_path=config.vlm_ckpt_path, lora_path=config.lora_path,
        device=config.device or ("cuda" if torch.cuda.is_available() else "cpu"), torch_dtype=config.dtype,
        stage_offload=config.stage_offload, offload=config.offload, planner_kwargs=planner_kwargs,
    )
    progress = getattr(pipe.editor.pipe, "set_progress_bar_config", None)
    if progress is not None:  # one line per edit (with timings) in the server log, not a progress bar
        progress(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------- errors
class ServeError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and ``Retry-After`` when given)."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ServeError:
    return ServeError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------- the replica
class EditService:
    """Owns one pipeline: background loading, a one-thread edit worker, a bounded queue, health."""

    def __init__(self, config: ServeConfig, loader: Callable[[], object] | None = None):
        self.config = config
        self._loader = loader or (lambda: load_pipeline(config))
        self.status, self.error, self.pipe = "idle", None, None
        self.load_seconds: float | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="replan-edit")
        self._counts = threading.Lock()
        self._load_lock = threading.Lock()
        self.waiting, self.running = 0, False
        self._recent = deque(maxlen=16)  # seconds per edit, for Retry-After

    # ------------------------------------------------------------------------------------------ loading
    def start(self) -> None:
        """Load in a background thread (no-op once loading has begun)."""
        if self.status == "idle":
            self.status = "loading"
            threading.Thread(target=self.load, name="replan-load", daemon=True).start()

    def load(self, raise_errors: bool = False) -> None:
        """Load now, in the calling thread (Ray replicas do this so they take traffic only once ready)."""
        with self._load_lock:
            if self.status in ("ready", "failed"):
                return
            self.status = "loading"
            start = time.perf_counter()
            logger.info("loading backbone=%s planner=%s", self.config.backbone, self.config.planner)
            try:
                pipe = self._loader()
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                self.status = "failed"
                logger.exception("loading failed after %.1fs", time.perf_counter() - start)
                if raise_errors:
                    raise
                return
            self.pipe, self.load_seconds = pipe, time.perf_counter() - start
            self.status = "ready"
            logger.info("ready: %s loaded in %.1fs", self.backbone, self.load_seconds)

    @property
    def backbone(self) -> str:
        spec = getattr(getattr(self.pipe, "editor", None), "spec", None)
        return spec.name if spec is not None else self.config.backbone

    @property
    def has_planner(self) -> bool:
        return getattr(self.pipe, "planner", None) is not None

    def health(self) -> dict:
        out = {"status": "loading" if self.status == "idle" else self.status, "backbone": self.backbone,
               "queue": self.waiting, "busy": self.running, "max_queue": self.config.queue,
               "planner": self.config.planner if self.has_planner or self.status != "ready" else "none"}
        if self.load_seconds is not None:
            out["load_seconds"] = round(self.load_seconds, 3)
        if self.error:
            out["error"] = self.error
        return out

    def check_ready(self) -> None:
        if self.status == "failed":
            raise ServeError(500, f"the model failed to load: {self.error}", code="model_load_failed")
        if self.status != "ready":
            raise ServeError(503, "the model is still loading; retry shortly", code="model_loading",
                             retry_after=LOADING_RETRY_AFTER)

    # ------------------------------------------------------------------------------------------ edits
    def retry_after(self) -> int:
        per_edit = sum(self._recent) / len(self._recent) if self._recent else 5.0
        return max(1, math.ceil(per_edit * (self.waiting + self.running)))

    async def submit(self, fn: Callable, *args) -> tuple[object, float, float]:
        """Run ``fn(*args)`` on the edit worker; returns (result, seconds queued, seconds run).

        429 when ``queue`` edits already wait behind a running one. A request cancelled while queued leaves the queue.
        """
        self.check_ready()
        with self._counts:
            if self.waiting + self.running >= self.config.queue + 1:
                raise ServeError(429, f"the edit queue is full ({self.config.queue} waiting behind the running edit); "
                                 "retry later", code="queue_full", retry_after=self.retry_after())
            self.waiting += 1
        submitted = time.perf_counter()

        def job():
            with self._counts:
                self.waiting -= 1
                self.running = True
            started = time.perf_counter()
            try:
                return fn(*args), started - submitted, time.perf_counter() - started
            finally:
                self._recent.append(time.perf_counter() - started)
                with self._counts:
                    self.running = False

        future = self._executor.submit(job)

        def left_queue(f):
            if f.cancelled():
                with self._counts:
                    self.waiting -= 1

        future.add_done_callback(left_queue)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------- parsing
def decode_image(data: bytes, param: str) -> Image.Image:
    """Bytes of a PNG/JPEG/WebP/... file → RGB; 400 naming ``param`` when they are not a usable image."""
    if not data:
        raise bad(f"'{param}' is empty: send a PNG, JPEG or WebP file", param)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:  # checked before decoding: no decompression bombs
                raise bad(f"'{param}' is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is {MAX_PIXELS / 1e6:.1f} MP "
                          "(downscale it first)", param)
            im.load()
            image = to_rgb(im)
    except ServeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad(f"'{param}' is not a readable image ({type(e).__name__}: {e}); send a PNG, JPEG or WebP file",
                  param) from None
    try:
        check_image_size(image.size)
    except ValueError as e:
        raise bad(f"'{param}': {e}", param) from None
    return image


def encode_image(image: Image.Image, fmt: str = "png", compression: int | None = None) -> str:
    buf = io.BytesIO()
    kwargs = {}
    if fmt in ("jpeg", "jpg", "webp") and compression is not None:
        kwargs["quality"] = max(1, 100 - int(compression))
    image.save(buf, OUTPUT_FORMATS[fmt], **kwargs)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_base64(text: str, param: str, limit: int) -> bytes:
    if not isinstance(text, str) or not text.strip():
        raise bad(f"'{param}' must be a non-empty base64 string", param)
    text = text.strip()
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > limit + 3:
        raise too_large(param, limit)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"'{param}' is not valid base64 ({e})", param) from None


def too_large(param: str, limit: int) -> ServeError:
    return ServeError(413, f"'{param}' is larger than the server's limit of {limit / MB:g} MB", param=param,
                      code="payload_too_large")


def user_plan(text: str, image_size, param: str = "plan") -> RegionPlan:
    """A plan sent by a client: a plan JSON object (validated strictly) or planner text (parsed leniently)."""
    text = text.strip()
    if not text:
        raise bad(f"'{param}' is empty", param)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise bad(f"'{param}' is not valid JSON: {e}", param) from None
        try:
            plan = RegionPlan.from_dict(data)
            if plan.image_size is None:
                plan = RegionPlan(plan.global_prompt, plan.regions, plan.reasoning, image_size, plan.raw_text,
                                  plan.repairs)
            plan.check_image(image_size)
            plan.validate(image_size)
        except (ValueError, TypeError) as e:
            raise bad(f"'{param}' is not a valid plan: {e}", param) from None
        return plan
    try:
        return parse_plan(text, image_size)
    except PlanParseError as e:
        raise bad(f"'{param}' could not be read as planner text: {e}", param) from None


def planner_reply_plan(text: str, image_size, planner_size=None) -> RegionPlan:
    """Official reward-server behaviour: read the reply leniently; anything unusable becomes a plain global edit."""
    try:
        return parse_plan(text, image_size, planner_size=planner_size)
    except PlanParseError as e:
        return RegionPlan("", image_size=image_size, raw_text=text if isinstance(text, str) else "",
                          repairs=(f"{e}; ran a global edit",))


def parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    parts = value.strip().lower().split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise bad(f"size must be 'auto' or WIDTHxHEIGHT (e.g. 1024x1024), got {value!r}", "size") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192) or w * h > MAX_PIXELS:
        raise bad(f"size {w}x{h} is out of range: each side 16..8192 px, at most {MAX_PIXELS / 1e6:.1f} MP", "size")
    return w, h


def check_length(request, limit: int, image_limit: int) -> None:
    """413 from the Content-Length header (``limit`` bytes), before the body is read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ServeError(413, f"the request is {int(length) / MB:.1f} MB; this server accepts images up to "
                         f"{image_limit / MB:g} MB", code="payload_too_large")


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def create_app(config: ServeConfig, *, loader: Callable[[], object] | None = None, autostart: bool = True):
    """The FastAPI app for one replica. ``loader`` replaces ``load_pipeline(config)`` (tests, custom setups);
    with ``autostart`` the models start loading in the background when the app starts."""
    service = EditService(config, loader)

    @asynccontextmanager
    async def lifespan(app):
        if autostart:
            service.start()
        yield
        service.close()

    app = FastAPI(title="replan edit server", lifespan=lifespan)
    app.state.service = service
    _install_routes(app, service)
    return app


# --------------------------------------------------------------------------------------------------- requests
class ExecuteRequest(BaseModel):
    """``POST /v1/plans/execute``. Unknown keys are ignored; the official server's names are accepted as aliases."""

    model_config = ConfigDict(extra="ignore")

    image_base64: str
    response: str
    instruction: str
    seed: int = 0
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    expand: float | None = Field(None, ge=0, validation_alias=AliasChoices("expand", "expand_value"))
    expand_mode: Literal["ratio", "pixels"] | None = None
    switch: float | None = Field(None, ge=0)
    rules: dict[str, bool] | None = Field(None, validation_alias=AliasChoices("rules", "attention_rules"))
    guidance: float | None = None
    planner_size: tuple[int, int] | None = None
    delete_main_prompt: bool = False
    bboxes_attend_to_each_other: bool = True


class FormFields:
    """Typed access to multipart text fields, with OpenAI-style 400s naming the field."""

    TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")

    def __init__(self, form):
        self.form = form

    def text(self, name: str) -> str | None:
        value = self.form.get(name)
        if value is not None and not isinstance(value, str):
            raise bad(f"'{name}' must be a text field, not a file", name)
        return value

    def number(self, name: str, kind=int, lo=None, hi=None):
        value = self.text(name)
        if value is None or not value.strip():
            return None
        try:
            number = kind(value.strip())
        except ValueError:
            raise bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name) from None
        if not math.isfinite(number) or (lo is not None and number < lo) or (hi is not None and number > hi):
            raise bad(f"'{name}' must be in [{lo}, {hi}], got {value!r}", name)
        return number

    def flag(self, name: str) -> bool:
        value = (self.text(name) or "").strip().lower()
        if value not in self.TRUE + self.FALSE:
            raise bad(f"'{name}' must be true or false, got {value!r}", name)
        return value in self.TRUE


async def read_upload(form, limit: int):
    """The one uploaded image (``image`` or ``image[]``) as bytes: 400 if missing or several, 413 if too large."""
    parts = form.getlist("image") + form.getlist("image[]")
    if not parts:
        raise bad("'image' is required: send the image to edit as a file part", "image", code="missing_required")
    if len(parts) > 1:
        raise bad(f"got {len(parts)} images; this server edits one image per request", "image")
    part = parts[0]
    if not isinstance(part, UploadFile):
        raise bad("'image' must be a file part, not a text field", "image")
    if part.size is not None and part.size > limit:
        raise too_large("image", limit)
    data = await part.read(limit + 1)
    if len(data) > limit:
        raise too_large("image", limit)
    return data


def edit_fields(fields: FormFields) -> dict:
    """Validate the OpenAI and replan text fields of ``/v1/images/edits``."""
    if "mask" in fields.form:
        raise bad("'mask' is not supported: name the region in the prompt, or send a 'plan' with a box", "mask",
                  code="unsupported_parameter")
    n = fields.number("n", int)
    if n is not None and n != 1:
        raise bad(f"this server returns one image per request: 'n' must be 1, got {n}", "n")
    response_format = (fields.text("response_format") or "b64_json").strip()
    if response_format == "url":
        raise bad("response_format 'url' is not supported: images are returned inline; use 'b64_json'",
                  "response_format", code="unsupported_value")
    if response_format != "b64_json":
        raise bad(f"response_format must be 'b64_json', got {response_format!r}", "response_format")
    if fields.flag("stream"):
        raise bad("streaming is not supported: leave 'stream' unset", "stream", code="unsupported_value")
    output_format = (fields.text("output_format") or "png").strip().lower()
    if output_format not in OUTPUT_FORMATS:
        raise bad(f"output_format must be png, jpeg or webp, got {output_format!r}", "output_format")
    prompt = (fields.text("prompt") or "").strip()
    plan = fields.text("plan")
    plan = plan if plan is not None and plan.strip() else None
    no_plan = fields.flag("no_plan")
    if not prompt and plan is None:
        raise bad("'prompt' is required (or a 'plan' to execute)", "prompt", code="missing_required")
    if len(prompt) > MAX_PROMPT:
        raise bad(f"'prompt' is longer than {MAX_PROMPT} characters", "prompt")
    if plan is not None and no_plan:
        raise bad("'plan' and 'no_plan' exclude each other", "no_plan")
    return {
        "prompt": prompt, "plan": plan, "no_plan": no_plan, "model": fields.text("model"),
        "size": parse_size(fields.text("size")), "output_format": output_format,
        "output_compression": fields.number("output_compression", int, 0, 100),
        "seed": fields.number("seed", int) or 0, "steps": fields.number("steps", int, 1, MAX_STEPS),
        "expand": fields.number("expand", float, 0), "switch": fields.number("switch", float, 0),
        "guidance": fields.number("guidance", float, 0),
    }


def edit_options(config: ServeConfig, seed, steps, expand, switch, guidance, entry: str, **extra) -> dict:
    options = {"seed": seed, "steps": steps, "expand": expand, "switch": switch, "entry": entry,
               "attention": config.attention, **extra}
    if guidance is not None:
        options["guidance"] = guidance
    return options


def run_pipeline(pipe, image, instruction, plan, options):
    return pipe(image, instruction, plan=plan, **options)


async def run_edit(service: EditService, *args):
    """Queue an edit; map what the pipeline raises onto HTTP errors."""
    from replan.planner import PlannerError

    try:
        return await service.submit(run_pipeline, service.pipe, *args)
    except ServeError:
        raise
    except PlannerError as e:
        raise ServeError(502, f"the planner failed: {e}", code="planner_failed") from None
    except ValueError as e:  # the editor's checks: plan vs image, rules, steps, ...
        raise bad(str(e)) from None
    except Exception as e:
        logger.exception("edit failed")
        raise ServeError(500, f"the edit failed: {type(e).__name__}: {e}", code="edit_failed") from None


def entry_point(service: EditService, wanted: str) -> str:
    """``wanted`` if the backbone documents defaults for it, else the IV-Edit eval defaults."""
    spec = service.pipe.editor.spec
    return wanted if wanted in spec.entries else "eval"


# --------------------------------------------------------------------------------------------------- routes
def _install_routes(app, service: EditService) -> None:
    config = service.config
    started = int(time.time())

    def error_response(e: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ServeError)
    async def on_serve_error(request, e: ServeError):
        logger.info("%s %s -> %d: %s", request.method, request.url.path, e.status, e.message)
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(ServeError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.get("/health")
    async def health():
        body = service.health()
        status = {"ready": 200, "failed": 500}.get(body["status"], 503)
        headers = {"Retry-After": str(LOADING_RETRY_AFTER)} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.backbone, "object": "model", "created": started,
                                            "owned_by": "replan"}]}

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        rid, start = new_request_id(), time.perf_counter()
        service.check_ready()  # before reading a large upload
        limit = config.max_image_bytes
        check_length(request, limit + FIELD_SLACK, limit)
        try:
            form = await request.form(max_files=4, max_fields=64)
        except HTTPException as e:
            raise bad(f"could not read the multipart form: {e.detail}") from None
        try:
            req = edit_fields(FormFields(form))
            data = await read_upload(form, limit)
        finally:
            await form.close()
        image = await asyncio.to_thread(decode_image, data, "image")
        plan = None
        if req["plan"] is not None:
            plan = user_plan(req["plan"], image.size)
        elif req["no_plan"]:
            plan = RegionPlan(req["prompt"], image_size=image.size)
        elif not service.has_planner:
            raise bad("this server runs without a planner: send a 'plan' to execute, or 'no_plan=true' to edit with "
                      "the prompt alone", "plan", code="planner_unavailable")
        options = edit_options(config, req["seed"], req["steps"], req["expand"], req["switch"], req["guidance"],
                               entry_point(service, "cli"))
        out, queued, ran = await run_edit(service, image, req["prompt"] or None, plan, options)
        result = out.image if req["size"] is None else out.image.resize(req["size"], Image.LANCZOS)
        b64 = await asyncio.to_thread(encode_image, result, req["output_format"], req["output_compression"])
        timings = {"queued": queued, **out.timings, "total": time.perf_counter() - start}
        logger.info("%s edits %dx%d regions=%d planned=%s queued=%.2fs plan=%.2fs edit=%.2fs total=%.2fs", rid,
                    *image.size, len(out.plan.regions), plan is None, queued, out.timings.get("plan", 0.0),
                    out.timings["edit"], timings["total"])
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b64, "revised_prompt": out.plan.global_prompt}],
            "output_format": req["output_format"], "size": f"{result.size[0]}x{result.size[1]}",
            "replan": {
                "request_id": rid, "model": req["model"], "backbone": service.backbone, "plan": out.plan.to_dict(),
                "planned": plan is None, "boxes": [list(b) for b in out.edit.boxes], "seed": req["seed"],
                "steps": req["steps"] or service.pipe.editor.spec.steps,
                "timings": {k: round(v, 4) for k, v in timings.items()},
            },
        }

    @app.post("/v1/plans/execute")
    async def plans_execute(request: Request):
        rid, start = new_request_id(), time.perf_counter()
        service.check_ready()
        limit = config.max_image_bytes
        check_length(request, limit * 4 // 3 + FIELD_SLACK, limit)
        try:
            req = ExecuteRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e.errors()) from None
        image = await asyncio.to_thread(decode_image, decode_base64(req.image_base64, "image_base64", limit),
                                        "image_base64")
        plan = planner_reply_plan(req.response, image.size, req.planner_size)
        if req.rules is not None:
            from replan.attention.rules import RuleSet

            try:
                RuleSet.from_dict(req.rules)
            except ValueError as e:
                raise bad(f"'rules': {e}", "rules") from None
        options = edit_options(config, req.seed, req.steps, req.expand, req.switch, req.guidance,
                               entry_point(service, "server"), rules=req.rules, expand_mode=req.expand_mode,
                               delete_main_prompt=req.delete_main_prompt,
                               bboxes_attend_to_each_other=req.bboxes_attend_to_each_other)
        out, queued, ran = await run_edit(service, image, None, plan, options)
        b64 = await asyncio.to_thread(encode_image, out.image)
        seconds = time.perf_counter() - start
        logger.info("%s execute %dx%d regions=%d repairs=%d queued=%.2fs edit=%.2fs total=%.2fs instruction=%r",
                    rid, *image.size, len(out.plan.regions), len(out.plan.repairs), queued, ran, seconds,
                    req.instruction[:80])
        return {"image_base64": b64, "plan": out.plan.to_dict(), "seconds": round(seconds, 4),
                "boxes": [list(b) for b in out.edit.boxes], "request_id": rid,
                "timings": {"queued": round(queued, 4), "edit": round(ran, 4), "total": round(seconds, 4)}}


def validation_error(errors) -> ServeError:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "form")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return bad(f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None, "invalid_json")
    return bad(f"'{param}': {message}" if param else message, param,
               "missing_required" if first.get("type") == "missing" else "invalid_value")
