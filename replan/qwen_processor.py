"""The Qwen2.5-VL processor, loadable without torchvision: used by the local planner (``replan.planner.qwen_vl``) and
by the Qwen-Image-Edit editors (``replan.backbones.qwen_image_edit``, whose text encoder is a Qwen2.5-VL), so it lives
below both.
"""

from __future__ import annotations

import logging

from transformers import Qwen2_5_VLProcessor

logger = logging.getLogger(__name__)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video sub-processor, which needs torchvision (absent on CPU installs)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None, subfolder: str = ""):
    """``AutoProcessor`` when it works; otherwise image processor + tokenizer assembled without a video processor.

    ``min_pixels``/``max_pixels`` override the checkpoint's resize bounds (None keeps them).
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if subfolder:
        bounds["subfolder"] = subfolder
    try:
        processor = AutoProcessor.from_pretrained(path, **bounds)
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, AttributeError, ValueError, OSError, TypeError) as e:
        logger.info("AutoProcessor failed for %s (%s); assembling an image-only processor", path, e)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder)
    image_processor = AutoImageProcessor.from_pretrained(path, **bounds)
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=getattr(tokenizer, "chat_template", None))
