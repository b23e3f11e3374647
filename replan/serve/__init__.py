"""HTTP serving: the OpenAI Images edit API and the trainer's plan-execution endpoint.

    python -m replan.serve --backbone flux                          # 127.0.0.1:8001, one replica
    python -m replan.serve --backbone tiny --planner none           # offline smoke server
    python -m replan.serve --backbone flux --replicas 4             # Ray Serve, one GPU per replica

``POST /v1/images/edits`` (multipart/form-data, OpenAI ``images.edit``):
    image (file; also ``image[]``, exactly one), prompt (required unless ``plan``), model (recorded), n (1 only),
    size (``auto`` or WxH: the output is resized), response_format (``b64_json``; ``url`` → 400),
    output_format (png | jpeg | webp), output_compression; replan: plan (a plan JSON object or planner text to
    execute instead of planning), no_plan (the prompt alone, no regions), seed (0), steps, expand, switch, guidance.
    ``mask`` and ``stream`` → 400 (unsupported); other OpenAI fields are ignored.
    → 200 ``{"created", "data": [{"b64_json", "revised_prompt": <global prompt>}], "output_format", "size",
    "replan": {"request_id", "model", "backbone", "plan": <RegionPlan dict>, "planned", "boxes", "seed", "steps",
    "planner": <template name, sha256, box frame, planner frame> | null, "hint_padding": <why the hint padding was
    trimmed to fit --attention_budget> | null, "timings"}}``. Defaults: the backbone's CLI
    entry point. A ``plan`` sent as text is read in original pixels.

``POST /v1/plans/execute`` (JSON, the GRPO reward):
    ``{"image_base64", "response": <planner text>, "instruction", "seed"?, "steps"?, "expand"?, "switch"?,
    "rules"? {"Query, Key": bool}, "guidance"?, "expand_mode"?, "box_frame"? "processor"|"original",
    "planner_size"? [W, H], "delete_main_prompt"?, "bboxes_attend_to_each_other"?}`` (``expand_value`` /
    ``attention_rules`` accepted as the official names). The reply's boxes are read in ``box_frame`` (default: the
    server's ``--box_frame``, itself ``processor``): ``processor`` maps them from ``planner_size`` (the frame the
    planner saw; default Qwen2.5-VL's ``smart_resize`` of the image) to pixels, ``original`` reads them as pixels (the
    official server). The reply is parsed leniently; an unusable reply runs a global edit, as official. Defaults: the
    backbone's reward server entry point (FLUX.1 Kontext: switch 0, expand 0.15) or, without one, its eval entry
    point. → 200 ``{"image_base64": <PNG b64>, "plan": <RegionPlan dict>, "seconds", "boxes", "box_frame",
    "planner_size", "request_id", "hint_padding", "timings"}``.

``GET /health`` → ``{"status": "loading"|"ready"|"failed", "backbone", "queue": <edits waiting>, "busy",
"max_queue", "planner", ["load_seconds"], ["error"]}`` with HTTP 200 / 503 (+ Retry-After) / 500.
``GET /v1/models`` → the OpenAI model list (one entry: the backbone).

Errors, every endpoint: ``{"error": {"message", "type", "param", "code"}}``; 400 bad field, image or plan;
413 image over ``--max_image_mb``, or a plan whose region attention would not fit ``--attention_budget`` (code
``plan_too_large``; checked before any model work); 429 + Retry-After when ``--queue`` edits already wait; 502
planner endpoint failure; 503 + Retry-After while loading; 500 loading or edit failure.
"""

__all__ = ["EditService", "ServeConfig", "create_app", "load_pipeline"]


def __getattr__(name):  # lazy: ``python -m replan.serve --help`` works before fastapi is installed
    if name in __all__:
        from replan.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'replan.serve' has no attribute {name!r}")
