"""FLUX.2 [klein] as a region editor, driving the stock ``diffusers.Flux2KleinPipeline``.

* Resolution: the reference size the pipeline itself uses for the input — the native size when it is at most
  ``max_area`` (1 MP, the pipeline's limit), otherwise scaled to ``max_area``, floored to a multiple of 16. The noise
  grid is generated at that size too (height/width passed explicitly), so noise grid == reference grid. We resize the
  whole input to that size ourselves (Lanczos) and pass the result as the reference; the pipeline then keeps it as is
  (it only resizes above 1 MP and floors/crops to 16, both no-ops). Unlike the pipeline, which center-crops up to 15
  px away, the whole input is kept, so the boxes and the output (resized back to the input size) stay aligned with
  the input. For an input already at that size the reference is the input itself, pixel for pixel.
* Text: the Qwen3 chat-template prompt, hidden states of ``text_encoder_out_layers`` stacked (``pipe.encode_prompt``),
  padded to ``max_sequence_length`` (512). Each hint goes through the same path and is a padded span of its own;
  ``trim_hint_padding=True`` keeps only each hint's real tokens (the same states: the LM is causal and the padding
  is masked); by default (None) only when the padded layout would not fit the attention memory budget. Hints go
  through the text encoder a few at a time (the same padded inputs, float-rounding-level differences).
  ``prompt_embeds = cat([main, hint 1, …])``; the pipeline builds the text position ids for the whole
  concatenation (L axis 0…T-1), as it does for any prompt.
* Guidance: a base checkpoint (``pipe.config.is_distilled`` False) uses true CFG with the pipeline's empty negative
  prompt when ``guidance`` (alias ``true_cfg``; default: the spec's ``true_cfg``, 4.0) is > 1; the negative pass has
  no hint tokens and runs unmasked. A step-distilled checkpoint makes one transformer call per step; asking it for
  CFG is a ``ValueError``.
* ``text_encoder_out_layers`` is an editor option (constructor keyword, default the pipeline's (9, 18, 27)) because
  it is a call argument of the pipeline, not part of a saved checkpoint; it is checked against the loaded text
  encoder and transformer at construction. Tiny test checkpoints need ``(1, 2, 3)``
  (``replan.testing.klein.TINY_KLEIN_OUT_LAYERS``).

Region masks cover ``[text, noise, reference]``; the same mask reaches FLUX.2's double-stream blocks
(``Flux2AttnProcessor``) and single-stream blocks (``Flux2ParallelSelfAttnProcessor``) through our wrapped processors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from PIL import Image

from replan.backbones.base import EncodedPrompt, RegionEditor, TextTokens
from replan.coords import Size
from replan.plan import RegionPlan

logger = logging.getLogger(__name__)

DEFAULT_OUT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default: Qwen3-4B / Qwen3-8B hidden states
PIPELINE_MAX_AREA = 1024 * 1024  # Flux2KleinPipeline resizes larger references down to this area
BASE_CFG = 4.0  # Flux2KleinPipeline's default guidance_scale
MIN_SIDE, MAX_ASPECT = 64, 8  # Flux2ImageProcessor.check_image_input
HINT_BATCH = 16  # hints per text-encoder forward (each padded to max_sequence_length, as official)


def klein_reference_size(image_size: Size, max_area: int = PIPELINE_MAX_AREA, multiple: int = 16) -> Size:
    """(W, H) of the reference ``Flux2KleinPipeline`` makes from an image: native if at most ``max_area`` pixels,
    otherwise scaled to ``max_area`` (int-truncated, as ``Flux2ImageProcessor._resize_to_target_area``), then floored
    to ``multiple``."""
    w, h = image_size
    if w * h > max_area:
        scale = math.sqrt(max_area / (w * h))
        w, h = int(w * scale), int(h * scale)
    return (w // multiple * multiple, h // multiple * multiple)


class Flux2KleinEditor(RegionEditor):
    """Region editing on FLUX.2 [klein] (distilled or base). Options per call: ``guidance`` (alias ``true_cfg``),
    ``negative_prompt`` (base only; default the pipeline's empty prompt), ``max_sequence_length``,
    ``trim_hint_padding``.

    Args:
        max_area: the largest generation/reference area; at most the pipeline's 1 MP (smaller values are for quick
            tests).
        text_encoder_out_layers: the text-encoder hidden-state layers stacked into the prompt embedding; default the
            pipeline's (9, 18, 27).
    """

    def __init__(self, pipe, spec, max_area: int = PIPELINE_MAX_AREA, text_encoder_out_layers=None):
        super().__init__(pipe, spec)
        if not MIN_SIDE * MIN_SIDE <= int(max_area) <= PIPELINE_MAX_AREA:
            raise ValueError(
                f"max_area must be in {MIN_SIDE * MIN_SIDE}..{PIPELINE_MAX_AREA} for FLUX.2 klein (the pipeline "
                f"resizes larger references to 1 MP), got {max_area}"
            )
        self.max_area = int(max_area)
        self.patch = pipe.vae_scale_factor * 2
        self.text_encoder_out_layers = tuple(int(i) for i in (text_encoder_out_layers or DEFAULT_OUT_LAYERS))
        self._check_out_layers()
        if (spec.true_cfg is None) != self.distilled:
            logger.warning(
                "backbone %s expects a %s checkpoint but the loaded one is %s; its defaults (%d steps) may not fit",
                spec.name, "step-distilled" if spec.true_cfg is None else "base",
                "step-distilled" if self.distilled else "a base model", spec.steps,
            )

    @property
    def distilled(self) -> bool:
        return bool(self.pipe.config.is_distilled)

    def _check_out_layers(self) -> None:
        encoder = getattr(self.pipe, "text_encoder", None)
        if encoder is None:
            return
        config = getattr(encoder.config, "text_config", encoder.config)
        n, hidden = config.num_hidden_layers, config.hidden_size
        layers = self.text_encoder_out_layers
        fix = 'pass editor_kwargs={"text_encoder_out_layers": (...)}'
        if not layers or any(not -(n + 1) <= i <= n for i in layers):
            raise ValueError(
                f"text_encoder_out_layers {layers} do not fit the text encoder's {n} layers (valid: 0..{n}); {fix}"
            )
        expected = self.pipe.transformer.config.joint_attention_dim
        if len(layers) * hidden != expected:
            raise ValueError(
                f"text_encoder_out_layers {layers} give {len(layers)} x {hidden} = {len(layers) * hidden} text "
                f"features but the transformer expects {expected}; {fix}"
            )

    # ------------------------------------------------------------------------------------------------ sizes
    def generation_size(self, image_size: Size) -> Size:
        w, h = klein_reference_size(image_size, self.max_area, self.patch)
        if min(w, h) < MIN_SIDE or max(w / h, h / w) > MAX_ASPECT:
            raise ValueError(
                f"FLUX.2 klein would use a {w}x{h} reference for this {image_size[0]}x{image_size[1]} image; both "
                f"sides must be at least {MIN_SIDE} px and the aspect ratio at most {MAX_ASPECT}:1"
                + (" (raise max_area)" if self.max_area < PIPELINE_MAX_AREA else "")
            )
        return (w, h)

    def reference_image(self, image: Image.Image, gen_size: Size) -> Image.Image:
        """The whole input resized to the generation size (the input itself when it already has that size)."""
        w, h = gen_size
        return image if image.size == (w, h) else self.pipe.image_processor.resize(image, h, w)

    # ------------------------------------------------------------------------------------------------ text
    def _encode(self, text: str | list[str], max_len: int) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(
            prompt=text, device=self.device, max_sequence_length=max_len,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return embeds

    def _real_tokens(self, text: str, max_len: int) -> torch.Tensor:
        """Boolean (max_len,) mask of the non-padding positions of ``text`` as the pipeline tokenizes it."""
        tok = self.pipe.tokenizer
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        ids = tok(chat, return_tensors="pt", padding="max_length", truncation=True, max_length=max_len)
        return ids["attention_mask"][0].bool()

    def text_tokens(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict) -> TextTokens:
        """Every span is padded to ``max_sequence_length``; a trimmed hint keeps its real (chat-template) tokens."""
        max_len = self._max_len(options)
        trimmed = [int(self._real_tokens(h, max_len).sum()) for h in plan.hints]
        main = None if options["delete_main_prompt"] else max_len
        return TextTokens(main, [max_len] * len(plan.hints), trimmed)

    def encode(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict,
               tokens: TextTokens | None = None) -> EncodedPrompt:
        max_len = self._max_len(options)
        guidance = self._guidance(options)
        trim = options.get("trim_hint_padding")
        with torch.no_grad():
            main = self._encode(plan.prompt_text, max_len)
            spans = [] if options["delete_main_prompt"] else [main]
            hint_lens = []
            hints = plan.hints
            for start in range(0, len(hints), HINT_BATCH):  # the same padded inputs, a few hints per forward
                batch = self._encode(list(hints[start : start + HINT_BATCH]), max_len)
                for hint, emb in zip(hints[start : start + HINT_BATCH], batch):
                    if trim:
                        emb = emb[self._real_tokens(hint, max_len).to(emb.device)]
                    spans.append(emb[None])
                    hint_lens.append(emb.shape[0])
            kwargs = {"prompt_embeds": torch.cat(spans, dim=1)}
            negative = options.get("negative_prompt")
            if guidance > 1 and negative:  # otherwise the pipeline encodes its own empty negative prompt
                kwargs["negative_prompt_embeds"] = self._encode(negative, max_len)
        return EncodedPrompt(kwargs, None if options["delete_main_prompt"] else main.shape[1], hint_lens)

    @staticmethod
    def _max_len(options: dict) -> int:
        max_len = int(options.get("max_sequence_length", 512))
        if max_len < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_len}")
        return max_len

    # ------------------------------------------------------------------------------------------------ guidance
    def _guidance(self, options: dict) -> float:
        """The pipeline's ``guidance_scale``: the true-CFG scale of a base checkpoint, 1.0 for a distilled one."""
        guidance, true_cfg = options.get("guidance"), options.get("true_cfg")
        if guidance is not None and true_cfg is not None and float(guidance) != float(true_cfg):
            raise ValueError(f"guidance ({guidance}) and true_cfg ({true_cfg}) are the same CFG scale for FLUX.2 "
                             "klein; give one")
        value = guidance if guidance is not None else true_cfg
        if self.distilled:
            if (value is not None and float(value) > 1) or options.get("negative_prompt"):
                raise ValueError(f"this FLUX.2 klein checkpoint is step-distilled and ignores CFG: drop guidance/"
                                 f"true_cfg/negative_prompt (got guidance {value})")
            return 1.0
        if value is None:
            return float(self.spec.true_cfg if self.spec.true_cfg is not None else BASE_CFG)
        return float(value)

    def allows_unmasked_passes(self, options: dict) -> bool:
        return not self.distilled and self._guidance(options) > 1

    # ------------------------------------------------------------------------------------------------ run
    def run_pipeline(self, image: Image.Image, gen_size: Size, encoded: EncodedPrompt, options: dict,
                     callback: Callable | None) -> Image.Image:
        w, h = gen_size
        out = self.pipe(
            image=self.reference_image(image, gen_size),
            height=h,
            width=w,
            num_inference_steps=options["steps"],
            guidance_scale=self._guidance(options),
            generator=options["generator"],
            max_sequence_length=self._max_len(options),
            text_encoder_out_layers=self.text_encoder_out_layers,
            callback_on_step_end=callback,
            output_type="pil",
            **encoded.pipeline_kwargs,
        )
        return out.images[0]
