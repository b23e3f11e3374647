"""FLUX.1 Kontext as a region editor, driving the stock ``diffusers.FluxKontextPipeline`` (replan-spec §2.8).

* Resolution: the preferred Kontext resolution closest in aspect to the input (floored to 16) for both the
  generated image and the reference; the output is resized back to the input size.
* Text: main prompt → CLIP pooled vector + T5 sequence (padded to ``max_sequence_length``, 512); each hint → T5
  only, padded the same way (official), so every hint is a 512-token span. ``trim_hint_padding=True`` keeps only
  each hint's real tokens (+ EOS) — the same states, a much shorter sequence; by default (None) the padding is
  trimmed only when the padded layout would not fit the attention memory budget. Hints go through T5 a few at a
  time (the same padded inputs; a batch changes results only at float rounding level).
* Guidance 2.5 (embedded), 28 steps. Optional true CFG (``true_cfg`` > 1 with a ``negative_prompt``): the negative
  pass has no hint tokens and runs unmasked.

All of it goes through the pipeline's public arguments (``prompt_embeds``, ``pooled_prompt_embeds``,
``callback_on_step_end``); the region mask reaches every block through our wrapped attention processors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from PIL import Image

from replan.backbones.base import EncodedPrompt, RegionEditor, TextTokens
from replan.coords import Size, resolution_for_area
from replan.plan import RegionPlan

HINT_BATCH = 16  # hints per T5 forward (each padded to max_sequence_length, as official)
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


def kontext_resolution(image_size: Size, max_area: int = 1024 * 1024) -> Size:
    """Generation (W, H) for an input size: the preferred Kontext resolution closest in aspect ratio, floored to 16.

    ``max_area`` scales the preferred list (1024² keeps it exactly as official; smaller values are for quick tests).
    """
    scale = math.sqrt(max_area) / 1024
    candidates = PREFERRED_KONTEXT_RESOLUTIONS
    if scale != 1:
        candidates = [(max(16, round(w * scale)), max(16, round(h * scale))) for w, h in candidates]
    return resolution_for_area(candidates, image_size, multiple=16)


class FluxKontextEditor(RegionEditor):
    """Region editing on FLUX.1 Kontext. Options per call: ``guidance``, ``max_sequence_length``,
    ``trim_hint_padding``, ``true_cfg``, ``negative_prompt``."""

    def __init__(self, pipe, spec, max_area: int = 1024 * 1024):
        super().__init__(pipe, spec)
        self.max_area = max_area
        self.patch = pipe.vae_scale_factor * 2

    def generation_size(self, image_size: Size) -> Size:
        return kontext_resolution(image_size, self.max_area)

    @staticmethod
    def _max_len(options: dict) -> int:
        max_len = int(options.get("max_sequence_length", 512))
        if not 1 <= max_len <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 for FLUX.1 Kontext, got {max_len}")
        return max_len

    def text_tokens(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict) -> TextTokens:
        """T5 pads every span to ``max_sequence_length``; a trimmed hint keeps its real tokens and EOS."""
        max_len = self._max_len(options)
        trimmed = [len(self.pipe.tokenizer_2(h, truncation=True, max_length=max_len).input_ids) for h in plan.hints]
        main = None if options["delete_main_prompt"] else max_len
        return TextTokens(main, [max_len] * len(plan.hints), trimmed)

    def encode(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict,
               tokens: TextTokens | None = None) -> EncodedPrompt:
        pipe, device = self.pipe, self.device
        max_len = self._max_len(options)
        trim = options.get("trim_hint_padding")
        if trim and plan.hints:
            tokens = tokens or self.text_tokens(plan, image, gen_size, options)
        with torch.no_grad():
            main, pooled, _ = pipe.encode_prompt(
                prompt=plan.prompt_text, prompt_2=None, device=device, max_sequence_length=max_len
            )
            spans = [] if options["delete_main_prompt"] else [main]
            hint_lens = []
            hints = plan.hints
            for start in range(0, len(hints), HINT_BATCH):  # the same padded inputs, a few hints per T5 forward
                batch = pipe._get_t5_prompt_embeds(prompt=list(hints[start : start + HINT_BATCH]),
                                                   max_sequence_length=max_len, device=device)
                for row, emb in enumerate(batch, start):
                    # a trimmed span is copied out: a view would keep the whole padded batch alive until the end
                    emb = emb[None, : tokens.trimmed_hint_lens[row]].clone() if trim else emb[None]
                    spans.append(emb)
                    hint_lens.append(emb.shape[1])
        kwargs = {"prompt_embeds": torch.cat(spans, dim=1), "pooled_prompt_embeds": pooled}
        return EncodedPrompt(kwargs, None if options["delete_main_prompt"] else main.shape[1], hint_lens)

    def allows_unmasked_passes(self, options: dict) -> bool:
        return self._true_cfg(options)

    @staticmethod
    def _true_cfg(options: dict) -> bool:
        return float(options.get("true_cfg") or 1.0) > 1 and options.get("negative_prompt") is not None

    def run_pipeline(self, image: Image.Image, gen_size: Size, encoded: EncodedPrompt, options: dict,
                     callback: Callable | None) -> Image.Image:
        w, h = gen_size
        guidance = options.get("guidance")
        extra = {}
        if self._true_cfg(options):
            extra = {"true_cfg_scale": float(options["true_cfg"]), "negative_prompt": options["negative_prompt"]}
        reference = self.pipe.image_processor.resize(image, h, w)
        out = self.pipe(
            image=reference,
            height=h,
            width=w,
            max_area=w * h,
            _auto_resize=False,
            num_inference_steps=options["steps"],
            guidance_scale=self.spec.guidance if guidance is None else float(guidance),
            generator=options["generator"],
            max_sequence_length=self._max_len(options),
            callback_on_step_end=callback,
            output_type="pil",
            **encoded.pipeline_kwargs,
            **extra,
        )
        return out.images[0]
