"""Request parsing for the edit server: images, plans, sizes, form fields and edit options."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import uuid
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from replan.images import MAX_PIXELS, check_image_size, to_rgb
from replan.parse import PlanParseError, parse_plan
from replan.plan import RegionPlan
from replan.serve.service import MAX_PROMPT, MAX_STEPS, MB, OUTPUT_FORMATS, EditService, ServeConfig, ServeError, bad

logger = logging.getLogger("replan.serve")



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


def user_plan(text: str, image_size, param: str = "plan", parse: str = "lenient") -> RegionPlan:
    """A plan sent by a client: a plan JSON object (validated strictly) or planner text (read in ``parse`` mode)."""
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
        return parse_plan(text, image_size, mode=parse)
    except PlanParseError as e:
        raise bad(f"'{param}' could not be read as planner text: {e}", param) from None


def planner_reply_plan(text: str, image_size, planner_size=None, parse: str = "lenient") -> RegionPlan:
    """The reward-server endpoint: read the reply in ``parse`` mode (``official``: exactly as the official server);
    in lenient and official mode anything unusable becomes a plain global edit, in strict mode it is a 400."""
    try:
        return parse_plan(text, image_size, mode=parse, planner_size=planner_size)
    except PlanParseError as e:
        if parse == "strict":
            raise bad(f"'response' does not follow the plan grammar: {e}", "response") from None
        return RegionPlan("", image_size=image_size, raw_text=text if isinstance(text, str) else "",
                          repairs=(f"{e}; ran a global edit",))


def reply_frame(box_frame: str, planner_size, image_size) -> tuple[int, int] | None:
    """The planner frame to read a reply's boxes in: ``planner_size`` (default: Qwen2.5-VL's ``smart_resize`` of
    the image) for ``box_frame="processor"``; None (original pixels) for ``"original"``."""
    from replan.coords import processor_frame

    if box_frame == "original":
        if planner_size is not None:
            raise bad("'planner_size' is only used with box_frame 'processor'; drop it, or send box_frame "
                      "'processor'", "planner_size")
        return None
    if planner_size is not None and not all(isinstance(v, int) and v > 0 for v in planner_size):
        raise bad(f"'planner_size' must be two positive integers [W, H], got {list(planner_size)}", "planner_size")
    return tuple(planner_size) if planner_size is not None else processor_frame(image_size)


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
    box_frame: Literal["processor", "original"] | None = None  # None: the server's --box_frame
    planner_size: tuple[int, int] | None = None  # processor frame (W, H); None: smart_resize of the image
    parse: Literal["lenient", "strict", "official"] | None = None  # None: the server's --parse
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
    from replan.attention.budget import AttentionBudgetError
    from replan.planner import PlannerError

    try:
        return await service.submit(run_pipeline, service.pipe, *args)
    except ServeError:
        raise
    except PlannerError as e:
        raise ServeError(502, f"the planner failed: {e}", code="planner_failed") from None
    except AttentionBudgetError as e:  # the plan's attention would not fit in memory: refused before any model work
        raise ServeError(413, str(e), param="plan", code="plan_too_large") from None
    except ValueError as e:  # the editor's checks: plan vs image, rules, steps, ...
        raise bad(str(e)) from None
    except Exception as e:
        logger.exception("edit failed")
        raise ServeError(500, f"the edit failed: {type(e).__name__}: {e}", code="edit_failed") from None


def entry_point(service: EditService, wanted: str) -> str:
    """``wanted`` if the backbone documents defaults for it, else the IV-Edit eval defaults."""
    spec = service.pipe.editor.spec
    return wanted if wanted in spec.entries else "eval"


