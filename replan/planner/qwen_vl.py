"""Local planner: a Qwen2.5-VL checkpoint through transformers (default ``TainU/RePlan-Qwen2.5-VL-7B``).

    planner = QwenVLPlanner.from_pretrained("TainU/RePlan-Qwen2.5-VL-7B", device="cuda")   # or a local dir
    plan = planner.plan(image, "replace the cup that was used with a cactus")

flash-attn is used when installed (and on CUDA), SDPA otherwise. Decoding is greedy with at most 2048 new tokens.
With ``box_frame="processor"`` (default) the boxes are read in the frame the processor resized the image to
(``image_grid_thw × patch size``) and mapped back to original pixels, so they are right at any image size;
``box_frame="original"`` reads them as original pixels, as official.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from PIL import Image

from replan.hub import load_error
from replan.planner.base import Planner, PlannerError, PlannerReply
from replan.qwen_processor import ImageOnlyQwen2_5_VLProcessor, load_processor  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

DEFAULT_PLANNER = "TainU/RePlan-Qwen2.5-VL-7B"


def default_attention() -> str:
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


class QwenVLPlanner(Planner):
    name = "local"

    def __init__(self, model, processor, *, max_new_tokens: int = 2048, do_sample: bool = False,
                 template: str | None = None, strict: bool = False, parse: str | None = None,
                 box_frame: str = "processor", template_name: str | None = None):
        super().__init__(template, strict, parse, box_frame, template_name)
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_PLANNER, *, lora_path: str | None = None, device=None,
                        torch_dtype=None, attn_implementation: str | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, **kwargs) -> QwenVLPlanner:
        """Load a Qwen2.5-VL checkpoint (hub id or local dir) and optionally a LoRA adapter (needs ``peft``)."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        from replan.backbones.base import resolve_dtype

        dtype = resolve_dtype(torch_dtype, device)
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation or default_attention()
            )
            processor = load_processor(path, min_pixels, max_pixels)
        except OSError as e:
            raise ValueError(load_error("the planner", path, e, "--vlm_ckpt_path")) from e
        if lora_path:
            try:
                from peft import PeftModel
            except ImportError as e:
                raise ImportError("--vlm_lora_path needs peft: pip install 'replan[train]'") from e
            model = PeftModel.from_pretrained(model, lora_path).merge_and_unload()
        if device is not None:
            model.to(device)
        return cls(model.eval(), processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> QwenVLPlanner:
        self.model.to(device)
        return self

    def generate(self, image: Image.Image, prompt: str) -> PlannerReply:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[image], padding=True, return_tensors="pt").to(self.device)
        _, grid_h, grid_w = (int(v) for v in inputs["image_grid_thw"][0])
        patch = int(getattr(self.processor.image_processor, "patch_size", 14))
        frame = (grid_w * patch, grid_h * patch)
        new_tokens, reply = self._decode(inputs)
        return PlannerReply(reply, frame, extras={"new_tokens": new_tokens})

    def generate_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], padding=True, return_tensors="pt").to(self.device)
        return self._decode(inputs)[1]

    def _decode(self, inputs) -> tuple[int, str]:
        """Generate from processor outputs; return (number of new tokens, decoded reply)."""
        try:
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        except RuntimeError as e:
            raise PlannerError(f"the planner model failed to generate: {e}") from e
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        reply = self.processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return int(new_tokens.shape[1]), reply[0]
