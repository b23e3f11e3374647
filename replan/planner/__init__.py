"""Planners: ``plan(image, instruction) -> RegionPlan`` from a local Qwen2.5-VL or an OpenAI-compatible endpoint."""

from __future__ import annotations

from replan.coords import BOX_FRAMES
from replan.planner.base import (
    Planner,
    PlannerError,
    PlannerReply,
    build_prompt,
    check_box_frame,
    describe_template,
    load_template,
)

TINY = "tiny"  # --vlm_ckpt_path tiny: a tiny random Qwen2.5-VL built offline (smoke runs; replies are noise)
KINDS = ("local", "openai")


def load_planner(kind: str = "local", path: str | None = None, *, lora_path: str | None = None, device=None,
                 torch_dtype=None, template: str | None = None, strict: bool = False, parse: str | None = None,
                 **kwargs) -> Planner:
    """``kind="local"``: Qwen2.5-VL from ``path`` (hub id, local dir, or ``"tiny"``) with an optional LoRA adapter
    (``lora_path``, the CLI's ``--vlm_lora_path``); ``kind="openai"``: an OpenAI-compatible endpoint
    (``base_url``/``api_key``/``model`` in kwargs or the environment). ``parse``: how replies are read
    (``lenient``, ``strict``, ``official``). ``template``: the prompt text (``template_name``: its file, for the
    record); ``box_frame`` in kwargs: see ``Planner``."""
    if kind == "local":
        from replan.backbones.registry import build_offline
        from replan.planner.qwen_vl import DEFAULT_PLANNER, QwenVLPlanner

        if path == TINY:
            path = str(build_offline("replan.testing.qwenvl:save_tiny_qwen25vl", "tiny-qwen25vl"))
            kwargs.setdefault("max_new_tokens", 64)
        return QwenVLPlanner.from_pretrained(path or DEFAULT_PLANNER, lora_path=lora_path, device=device,
                                             torch_dtype=torch_dtype, template=template, strict=strict, parse=parse,
                                             **kwargs)
    if kind == "openai":
        from replan.planner.openai_backend import OpenAIPlanner

        if lora_path:
            raise ValueError("--vlm_lora_path applies to the local planner; an OpenAI-compatible endpoint serves its "
                             "own weights (load the adapter into the server, e.g. vLLM --lora-modules)")
        if path:
            kwargs.setdefault("model", path)
        return OpenAIPlanner(template=template, strict=strict, parse=parse, **kwargs)
    raise ValueError(f"unknown planner {kind!r}; choose one of {', '.join(KINDS)}")


__all__ = ["BOX_FRAMES", "KINDS", "Planner", "PlannerError", "PlannerReply", "TINY", "build_prompt", "check_box_frame",
           "describe_template", "load_planner", "load_template"]
