"""The planner interface: ``plan(image, instruction) -> RegionPlan``, shared by every backend.

A backend only has to turn (image, prompt text) into reply text and say which frame (W, H) the model saw the image
in; building the prompt, parsing the reply and mapping boxes to original-image pixels happen here.

``box_frame`` says how a reply's boxes are read: ``"processor"`` (default) maps them from the frame the model saw to
original pixels; ``"original"`` reads them as original pixels, as the official code does (and as the released
planner was trained). Training rewards read replies with the same setting (``replan.train.remote``).

The prompt template: replan's wording of the official one by default, any file with ``--prompt_template`` (e.g. the
official ``replan.txt`` from ``python -m replan.templates fetch``). ``Planner.provenance()`` names the template and
its SHA-256 for every output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image

from replan.coords import BOX_FRAMES, Size
from replan.images import to_rgb
from replan.parse import parse_mode, parse_plan
from replan.plan import RegionPlan
from replan.templates import describe

SHIPPED_TEMPLATE = "replan:planner/prompt.txt"  # the name outputs record for replan's own prompt

logger = logging.getLogger(__name__)


class PlannerError(RuntimeError):
    """The planner could not produce a reply (unreachable endpoint, refused request, model failure)."""


def load_template(path: str | Path | None = None) -> str:
    """The planner prompt prefix: ``path`` if given, else replan's own wording of the official template."""
    if path is None:
        return resources.files("replan.planner").joinpath("prompt.txt").read_text(encoding="utf-8")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"planner template {path} does not exist: pass a text file, e.g. the official one from "
                         "'python -m replan.templates fetch' (templates/official/replan.txt)")
    return path.read_text(encoding="utf-8")


def describe_template(text: str, path: str | Path | None = None) -> dict:
    """``{"name", "sha256"}`` of a planner template: ``official:replan.txt@…`` for the official file, replan's own
    name for the shipped prompt, else ``path`` (or ``custom``)."""
    if path is None and text == load_template():
        return describe(text, SHIPPED_TEMPLATE)
    return describe(text, str(path) if path is not None else None)


def check_box_frame(box_frame: str) -> str:
    if box_frame not in BOX_FRAMES:
        raise ValueError(f"box_frame must be one of {', '.join(BOX_FRAMES)}, got {box_frame!r}")
    return box_frame


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

    def __init__(self, template: str | None = None, strict: bool = False, parse: str | None = None,
                 box_frame: str = "processor", template_name: str | None = None):
        """``parse``: how replies are read, ``"lenient"`` (default), ``"strict"`` or ``"official"``
        (``replan.parse``); ``strict=True`` is the same as ``parse="strict"``. ``box_frame``: see the module doc."""
        self.template = template if template is not None else load_template()
        self.template_info = describe_template(self.template, template_name)
        self.parse = parse_mode(parse, strict)
        self.strict = self.parse == "strict"
        self.box_frame = check_box_frame(box_frame)
        self.last_reply: PlannerReply | None = None  # the latest reply with its timing and backend details

    def provenance(self) -> dict:
        """What produced the latest plan: template name and SHA-256, the box frame, and the frame the model saw."""
        frame = list(self.last_reply.frame) if self.last_reply is not None else None
        return {"template": self.template_info["name"], "template_sha256": self.template_info["sha256"],
                "box_frame": self.box_frame, "planner_frame": frame}

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
        planner_size = reply.frame if self.box_frame == "processor" else None
        plan = parse_plan(reply.text, image_size=image.size, mode=mode, planner_size=planner_size)
        for repair in plan.repairs:
            logger.info("planner reply repaired: %s", repair)
        return plan
