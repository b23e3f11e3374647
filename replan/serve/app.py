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
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from replan.plan import RegionPlan
from replan.serve.parsing import (
    ExecuteRequest,
    FormFields,
    check_length,
    decode_base64,
    decode_image,
    edit_fields,
    edit_options,
    encode_image,
    entry_point,
    new_request_id,
    planner_reply_plan,
    read_upload,
    reply_frame,
    run_edit,
    user_plan,
)
from replan.serve.service import (  # noqa: F401  (ServeConfig and load_pipeline are re-exported)
    FIELD_SLACK,
    LOADING_RETRY_AFTER,
    EditService,
    ServeConfig,
    ServeError,
    bad,
    load_pipeline,
)

logger = logging.getLogger("replan.serve")



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
            plan = user_plan(req["plan"], image.size, parse=config.parse)
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
                "planner": service.pipe.planner.provenance() if plan is None else None,
                "steps": req["steps"] or service.pipe.editor.spec.steps,
                "hint_padding": out.edit.extras.get("hint_padding"),  # why it was trimmed; null: as official
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
        box_frame = req.box_frame or config.box_frame
        planner_size = reply_frame(box_frame, req.planner_size, image.size)
        plan = planner_reply_plan(req.response, image.size, planner_size, req.parse or config.parse)
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
                "boxes": [list(b) for b in out.edit.boxes], "request_id": rid, "box_frame": box_frame,
                "planner_size": list(planner_size) if planner_size else None,
                "hint_padding": out.edit.extras.get("hint_padding"),
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

