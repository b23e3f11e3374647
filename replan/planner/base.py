"""The planner interface: ``plan(image, instruction) -> RegionPlan``, shared by every backend.

A backend only has to turn (image, prompt text) into reply text and say which frame (W, H) the model saw the image
in; building the prompt, parsing the reply and mapping boxes to original-image pixels happen here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image

from replan.coords import Size
from replan.images import to_rgb
from replan.parse import parse_mode, parse_plan
from replan.plan import RegionPlan

logger = logging.getLogger(__name__)


class PlannerError(RuntimeError):
    """The planner could not produce a reply (unreachable endpoint, refused request, model failure)."""


def load_template(path: str | Path | None = None) -> str:
    """The planner prompt prefix: ``path`` if given, else replan's own wording of the official template."""
    if path is None:
        return resources.files("replan.planner").joinpath("prompt.txt").read_text(encoding="utf-8")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"planner template {path} does not exist")
    return path.read_text(encoding="utf-8")


def build_prompt(template: str, instruction: str) -> str:
    """Template + newline + instruction, as official (the image goes first in the user turn)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("the instruction is empty: say what to edit, e.g. 'replace the used cup with a cactus'")
    return template + "\n" + instruction.strip()


@dataclass
class PlannerReply:
    text: str
    frame: Size  # (W, H) of the image as the model saw it
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


class Planner:
    """Base class. Subclasses implement ``generate(image, prompt) -> PlannerReply``."""

    name = "planner"

    def __init__(self, template: str | None = None, strict: bool = False, parse: str | None = None):
        """``parse``: how replies are read, ``"lenient"`` (default), ``"strict"`` or ``"official"``
        (``replan.parse``); ``strict=True`` is the same as ``parse="strict"``."""
        self.template = template if template is not None else load_template()
        self.parse = parse_mode(parse, strict)
        self.strict = self.parse == "strict"
        self.last_reply: PlannerReply | None = None  # the latest reply with its timing and backend details

    def generate(self, image: Image.Image, prompt: str) -> PlannerReply:
        raise NotImplementedError

    def generate_text(self, prompt: str) -> str:
        """A text-only reply (no image), e.g. for the rephrase baseline."""
        raise NotImplementedError

    def plan(self, image: Image.Image, instruction: str, strict: bool | None = None,
             parse: str | None = None) -> RegionPlan:
        """Plan an edit, reading the reply in the planner's parse mode (or ``parse``; ``strict=True`` means
        ``"strict"``). Lenient and official parsing fall back to a global edit when the reply has no usable regions
        and record why in ``plan.repairs``; strict parsing raises ``PlanParseError`` instead."""
        image = to_rgb(image)
        prompt = build_prompt(self.template, instruction)
        start = time.perf_counter()
        reply = self.generate(image, prompt)
        reply.seconds = reply.seconds or time.perf_counter() - start
        self.last_reply = reply
        mode = parse_mode(parse, bool(strict)) if parse is not None or strict else self.parse
        plan = parse_plan(reply.text, image_size=image.size, mode=mode, planner_size=reply.frame)
        for repair in plan.repairs:
            logger.info("planner reply repaired: %s", repair)
        return plan
