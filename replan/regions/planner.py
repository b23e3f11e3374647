"""The mask planner: a trained region generator proposes where to edit, RePlan's editors execute it.

    planner = MaskPlanner(RegionGenerator.load("outputs/regions/step-10000"))
    plan = planner.plan(image, "make the leftmost apple blue")        # one mask-shaped region, hint = instruction
    editor.edit(image, plan)                                          # region attention on any MMDiT backbone

The region is the predicted binary mask (free shape), executed with the same rules as a box (boxes are the rectangle
case of a mask). An empty prediction falls back to a plain global edit and says so in ``plan.repairs``.
"""

from __future__ import annotations

import torch
from PIL import Image

from replan.images import to_rgb
from replan.plan import NO_GLOBAL_EDIT, Region, RegionPlan


class MaskPlanner:
    """Wraps a ``RegionGenerator`` behind the planner interface ``plan(image, instruction) -> RegionPlan``."""

    def __init__(self, generator, global_prompt: str = NO_GLOBAL_EDIT):
        self.generator = generator
        self.global_prompt = global_prompt

    @torch.no_grad()
    def plan(self, image: Image.Image, instruction: str, strict: bool = False) -> RegionPlan:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("the instruction is empty: say what to edit")
        image = to_rgb(image)
        mask = self.generator.predict([image], [instruction.strip()], size=image.size)[0].cpu().numpy()
        if not mask.any():
            if strict:
                raise ValueError("the region generator found nothing to edit for this instruction")
            return RegionPlan(instruction.strip(), image_size=image.size,
                              repairs=("the region generator predicted an empty mask; global edit only",))
        region = Region.from_mask(mask, instruction.strip())
        return RegionPlan(self.global_prompt, (region,), image_size=image.size)
