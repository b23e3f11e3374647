"""Qwen-Image-Edit (``QwenImageEditPipeline``) and its EditPlus successors — Qwen-Image-Edit-2509, -2511 and
FireRed-Image-Edit (``QwenImageEditPlusPipeline``) — as region editors (replan-spec §2.9).

* Resolution: the pipeline's own ~1 MP size for the input's aspect ratio (``calculate_dimensions``; for EditPlus the
  VAE-image size), for both the generated image and the reference; the output is resized back by the base class.
  Qwen-Image-Edit resizes the input with PIL's BICUBIC, as the official pipeline (``image.resize((w, h))``); stock
  diffusers uses Lanczos. EditPlus keeps its pipeline's own resizing (the official code has no EditPlus pipeline).
* Text: Qwen2.5-VL encodes the main prompt with the image; its vision-token span is the ``Image Prompt`` group,
  visible to and from every group. Each hint is encoded with the same template and the same image, then its
  vision span (and for EditPlus the "Picture 1: " label before it) is removed: a hint span is its text plus the
  chat suffix, unpadded. The system prefix that is dropped is measured with the tokenizer actually loaded.
* Encoding once: the processor runs once per edit (main prompt + image); the vision span is read from those ids, and
  every hint's (and the negative prompt's) ids are the same system prefix + vision span followed by its own text,
  tokenised alone (special tokens bound every segment, so this is the processor's tokenisation — tested). The vision
  tower runs once; the main prompt, the negative prompt and the hints go through the language model as one padded
  batch (in chunks), each still seeing the image, as official. A plan without regions is encoded by the pipeline's
  own code, so it stays the stock pipeline bit for bit.
* True CFG 4.0 with negative prompt " ": the negative pass has no hints and runs unmasked, as official; masks
  follow the text length of each pass. 2511's ``zero_cond_t`` comes with its transformer config.
* ``delete_main_prompt``, as official: the text is the hint spans alone, so the image-prompt tokens (which live in the
  main prompt's encoding) are gone too; the official rules still name ``Image Prompt`` but its group is empty, which
  is what leaving the group out gives. The negative pass keeps its full prompt with the image.

The stock ``QwenDoubleStreamAttnProcessor2_0`` rejects attention masks, so masked passes go through
``RegionQwenAttnProcessor``, which repeats its math with the region mask; unmasked passes call the stock processor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from PIL import Image

from replan.attention import RegionCall, RegionWrapper
from replan.attention.joint import qwen_joint_out, qwen_joint_qkv
from replan.backbones.base import EncodedPrompt, RegionEditor, TextTokens
from replan.coords import Size
from replan.hub import load_error
from replan.plan import RegionPlan

logger = logging.getLogger(__name__)

EDIT_PLUS_IMAGE_LABEL = "Picture 1: "  # what QwenImageEditPlusPipeline writes before the image's vision tokens
ROPE_POSITIONS = 4096  # QwenEmbedRope precomputes this many positions
PIPELINE_AREA = 1024 * 1024  # the stock pipelines' generation / reference area
_SIZE_LOCK = threading.RLock()  # the stock pipelines read their sizes from module globals (see ``max_area``)
ENCODE_CHUNK_TOKENS = 8192  # padded tokens per text-encoder forward when hints are batched (bounds hidden states)


class RegionQwenAttnProcessor(RegionWrapper):
    """Joint attention of a Qwen-Image double-stream block with the mask of the ``region`` kwarg.

    Same computation as diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (projections, QK-norm, complex RoPE applied
    separately to image and text, ``[text, image]`` joint attention, output projections), plus the mask. Without a
    ``region`` it is the stock processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, region: RegionCall | None = None):
        if region is None or encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                             image_rotary_emb)
        mask = region.mask  # text padding is refused before the pass (RegionProcessors)
        q, k, v = qwen_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        backend = "flex" if region.kind == "flex" else self.base._attention_backend
        joint = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend,
                                      parallel_config=self.base._parallel_config)
        return qwen_joint_out(attn, joint, encoder_hidden_states.shape[1], q.dtype)


class QwenImageEditor(RegionEditor):
    """Region editing on Qwen-Image-Edit / EditPlus. Options per call: ``true_cfg``, ``negative_prompt``."""

    @classmethod
    def from_pretrained(cls, model: str | None = None, *, spec, **kwargs):
        """As ``RegionEditor.from_pretrained``; the processor is loaded by replan so that it also works without
        torchvision (whose absence breaks the Qwen2-VL video processor on CPU-only installs)."""
        from replan.qwen_processor import load_processor

        if "processor" not in kwargs:
            try:
                kwargs["processor"] = load_processor(model or spec.model_id, subfolder="processor")
            except (OSError, ValueError) as e:
                raise ValueError(load_error("the Qwen processor", model or spec.model_id, e, "--model")) from e
        return super().from_pretrained(model, spec=spec, **kwargs)

    def __init__(self, pipe, spec, max_area: int | None = None):
        """``max_area``: generate (and feed the reference and the prompt image) at this many pixels instead of the
        pipeline's ~1 MP, scaling the EditPlus condition size alike — for quick runs of tiny offline weights. The
        stock pipelines hard-code their sizes as module globals, so during a call with ``max_area`` set those
        globals are scaled under a lock and restored afterwards: do not run a full-size Qwen editor in another
        thread of the same process at the same time."""
        super().__init__(pipe, spec)
        if max_area is not None and not 64 * 64 <= int(max_area) <= PIPELINE_AREA:
            raise ValueError(f"max_area must be in {64 * 64}..{PIPELINE_AREA} pixels, got {max_area}")
        self.scale = 1.0 if max_area is None else int(max_area) / PIPELINE_AREA
        self.patch = pipe.vae_scale_factor * 2
        self.module = inspect.getmodule(type(pipe))  # read sizes through it, so patched module constants apply
        self.plus = hasattr(self.module, "VAE_IMAGE_SIZE")
        if not self.plus:  # the official pipeline resizes the input with PIL's default filter, BICUBIC
            processor = pipe.image_processor
            pipe.image_processor = type(processor)(**{**processor.config, "resample": "bicubic"})
        tok = pipe.tokenizer
        self.vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        self.prefix_ids = system_prefix_ids(pipe.prompt_template_encode, tok)
        if pipe.prompt_template_encode_start_idx != len(self.prefix_ids):
            logger.info("system prefix is %d tokens with this tokenizer (pipeline default %d); using %d",
                        len(self.prefix_ids), pipe.prompt_template_encode_start_idx, len(self.prefix_ids))
        pipe.prompt_template_encode_start_idx = len(self.prefix_ids)

    def wrap_processor(self, base):
        return RegionQwenAttnProcessor(base)

    # ------------------------------------------------------------------------------------------------ sizes
    def _area(self, area: int) -> int:
        return area if self.scale == 1.0 else round(area * self.scale)

    def generation_size(self, image_size: Size) -> Size:
        area = self._area(self.module.VAE_IMAGE_SIZE if self.plus else PIPELINE_AREA)
        w, h = self.module.calculate_dimensions(area, image_size[0] / image_size[1])[:2]
        return (int(w) // self.patch * self.patch, int(h) // self.patch * self.patch)

    def prompt_image(self, image: Image.Image):
        """The image the text encoder sees, exactly as the pipeline prepares it."""
        if self.plus:
            w, h = self.module.calculate_dimensions(self._area(self.module.CONDITION_IMAGE_SIZE),
                                                    image.size[0] / image.size[1])
            return [self.pipe.image_processor.resize(image, h, w)]
        w, h = self.module.calculate_dimensions(self._area(PIPELINE_AREA), image.size[0] / image.size[1])[:2]
        return self.pipe.image_processor.resize(image, h, w)

    @contextlib.contextmanager
    def _pipeline_sizes(self):
        """Scale the sizes the stock pipeline reads from its module while it runs (``max_area`` only)."""
        if self.scale == 1.0:
            yield
            return
        module = self.module
        with _SIZE_LOCK:
            saved = {k: getattr(module, k) for k in ("calculate_dimensions", "VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE")
                     if hasattr(module, k)}
            if self.plus:
                module.VAE_IMAGE_SIZE = self._area(saved["VAE_IMAGE_SIZE"])
                module.CONDITION_IMAGE_SIZE = self._area(saved["CONDITION_IMAGE_SIZE"])
            else:
                original = saved["calculate_dimensions"]
                module.calculate_dimensions = lambda area, ratio: original(self._area(area), ratio)
            try:
                yield
            finally:
                for key, value in saved.items():
                    setattr(module, key, value)

    # ------------------------------------------------------------------------------------------------ text
    def _vision_span(self, ids: list[int]) -> tuple[int, int]:
        if self.vision_start not in ids or self.vision_end not in ids:
            raise RuntimeError("no vision tokens in the encoded prompt: the text encoder did not see the image")
        return ids.index(self.vision_start), len(ids) - ids[::-1].index(self.vision_end)

    def _user_text(self, text: str) -> str:
        return (EDIT_PLUS_IMAGE_LABEL + "<|vision_start|><|image_pad|><|vision_end|>" if self.plus else "") + text

    def text_tokens(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict) -> TextTokens:
        """One processor pass (main prompt + image); every other prompt's ids are spliced from it.

        ``prepared``: ``inputs`` (the processor's tensors), ``ids`` (main prompt, system prefix included),
        ``head`` (system prefix + vision span: what precedes each hint), ``hints``/``negative`` (each one's own
        tokens), ``image_prompt`` (the vision span after the prefix; None when the main prompt is deleted)."""
        delete_main = bool(options["delete_main_prompt"])
        template, tok = self.pipe.prompt_template_encode, self.pipe.tokenizer
        inputs = self.pipe.processor(text=[template.format(self._user_text(plan.prompt_text))],
                                     images=self.prompt_image(image), padding=True, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        prefix = len(self.prefix_ids)
        if ids[:prefix] != self.prefix_ids:
            raise RuntimeError("the pipeline's prompt template no longer matches replan's token accounting; "
                               "please report the diffusers version")
        start, end = self._vision_span(ids[prefix:])
        suffix = template.split("{}", 1)[1]
        hints = [tok(hint + suffix)["input_ids"] for hint in plan.hints]
        negative = None
        if self._cfg(options):
            negative = tok(options.get("negative_prompt", self.spec.negative_prompt) + suffix)["input_ids"]
        main_len = None if delete_main else len(ids) - prefix
        text_len = (main_len or 0) + sum(len(h) for h in hints)
        if self.processors.ulysses is not None:  # context parallelism may pad the text to its split
            text_len += self.processors.ulysses.degree - 1
        grid = max(gen_size[0], gen_size[1]) // self.patch
        offset = grid // 2 if getattr(self.pipe.transformer.pos_embed, "scale_rope", True) else grid
        if text_len + offset > ROPE_POSITIONS:
            raise ValueError(f"the plan is {text_len} text tokens, more than Qwen-Image's rotary table allows "
                             f"({ROPE_POSITIONS - offset} at this size): shorten the hints or use fewer regions")
        prepared = {"inputs": inputs, "ids": None if delete_main else ids, "head": ids[: prefix + end], "hints": hints,
                    "negative": negative, "image_prompt": None if delete_main else (start, end)}
        return TextTokens(main_len, [len(h) for h in hints], None, prepared)

    def _encode_batch(self, inputs, sequences: list[list[int]], starts: list[int] | None = None) -> list[torch.Tensor]:
        """Last hidden states of each token sequence (each holds the image's vision span once), the vision tower
        run once, the language model on padded chunks of at most ``ENCODE_CHUNK_TOKENS`` tokens.

        ``starts[i]``: the first position of sequence i to return (default 0). What is returned is copied out of the
        padded chunk, so a chunk's states (vision span and padding included) are freed once the next chunk runs."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        encoder, device = self.pipe.text_encoder, self.device
        grid_thw = inputs["image_grid_thw"].to(device)
        features = encoder.get_image_features(inputs["pixel_values"].to(device), grid_thw)
        image_features = tuple(features.pooler_output)
        pad = self.pipe.tokenizer.pad_token_id or 0
        starts = [0] * len(sequences) if starts is None else starts
        out, chunk = [], []

        def run(chunk):
            width = max(len(s) for s, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (seq, _) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            hidden = encoder(
                input_ids=ids.to(device), attention_mask=mask.to(device), image_grid_thw=grid_thw.repeat(len(chunk), 1),
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=image_features * len(chunk))},
                output_hidden_states=True,
            ).hidden_states[-1]
            out.extend(hidden[row, start : len(seq)].clone() for row, (seq, start) in enumerate(chunk))

        longest = max(len(s) for s in sequences)
        for seq, start in zip(sequences, starts):
            if chunk and (len(chunk) + 1) * longest > ENCODE_CHUNK_TOKENS:
                run(chunk)
                chunk = []
            chunk.append((seq, start))
        run(chunk)
        return out

    def encode(self, plan: RegionPlan, image: Image.Image, gen_size: Size, options: dict,
               tokens: TextTokens | None = None) -> EncodedPrompt:
        dtype = self.pipe.text_encoder.dtype
        negative_text = options.get("negative_prompt", self.spec.negative_prompt)
        if not plan.regions:  # the stock encoding, so a plain edit is the stock pipeline bit for bit
            prompt_image = self.prompt_image(image)
            with torch.no_grad():
                main, _ = self.pipe._get_qwen_prompt_embeds(prompt=plan.prompt_text, image=prompt_image,
                                                            device=self.device)
                negative = None
                if self._cfg(options):
                    negative, _ = self.pipe._get_qwen_prompt_embeds(prompt=negative_text, image=prompt_image,
                                                                    device=self.device)
            return self._encoded(main, [], negative, None)
        tokens = tokens or self.text_tokens(plan, image, gen_size, options)
        t = tokens.prepared
        head, prefix = t["head"], len(self.prefix_ids)
        # with delete_main_prompt the official code drops the main prompt, image-prompt tokens included; the
        # negative pass keeps its full prompt with the image
        leading = ([t["ids"]] if t["ids"] is not None else []) + ([head + t["negative"]] if t["negative"] else [])
        hints = [head + h for h in t["hints"]]
        starts = [prefix] * len(leading) + [len(head)] * len(hints)  # after the system prefix / after the vision span
        with torch.no_grad():
            states = self._encode_batch(t["inputs"], leading + hints, starts)
        states = [s.to(dtype) for s in states]
        main = states.pop(0) if t["ids"] is not None else None
        negative = states.pop(0) if t["negative"] else None
        hints = states
        return self._encoded(main, hints, negative, t["image_prompt"])

    def _encoded(self, main: torch.Tensor | None, hints: list[torch.Tensor], negative: torch.Tensor | None,
                 image_prompt) -> EncodedPrompt:
        """Pipeline kwargs from (1, T, D) or (T, D) states; ``main`` None when the main prompt is deleted."""
        main = None if main is None else main if main.dim() == 3 else main[None]
        prompt_embeds = torch.cat(([main] if main is not None else []) + [h[None] for h in hints], dim=1)
        kwargs = {"prompt_embeds": prompt_embeds,
                  "prompt_embeds_mask": torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=self.device)}
        if negative is not None:
            negative = negative if negative.dim() == 3 else negative[None]
            kwargs["negative_prompt_embeds"] = negative
            kwargs["negative_prompt_embeds_mask"] = torch.ones(negative.shape[:2], dtype=torch.long,
                                                               device=self.device)
        return EncodedPrompt(kwargs, None if main is None else main.shape[1], [h.shape[0] for h in hints],
                             image_prompt=image_prompt)

    # ------------------------------------------------------------------------------------------------ call
    def _cfg(self, options: dict) -> bool:
        scale = options.get("true_cfg", self.spec.true_cfg)
        negative = options.get("negative_prompt", self.spec.negative_prompt)
        return scale is not None and float(scale) > 1 and negative is not None

    def allows_unmasked_passes(self, options: dict) -> bool:
        return self._cfg(options)

    def cfg_combine(self, options: dict):
        from replan.accel.controller import norm_rescaled_cfg

        return norm_rescaled_cfg(float(options.get("true_cfg", self.spec.true_cfg))) if self._cfg(options) else None

    def run_pipeline(self, image: Image.Image, gen_size: Size, encoded: EncodedPrompt, options: dict,
                     callback: Callable | None) -> Image.Image:
        if options.get("guidance") is not None:
            raise ValueError("Qwen-Image-Edit has no embedded guidance: use true_cfg (default 4.0) instead")
        if options["steps"] < 2 and self.pipe.scheduler.config.get("shift_terminal"):
            raise ValueError("this scheduler stretches sigmas to shift_terminal, which needs at least 2 steps "
                             "(1 step gives NaN images)")
        w, h = gen_size
        with self._pipeline_sizes():
            out = self.pipe(
                image=image,
                height=h,
                width=w,
                num_inference_steps=options["steps"],
                true_cfg_scale=float(options.get("true_cfg", self.spec.true_cfg) or 1.0),
                generator=options["generator"],
                callback_on_step_end=callback,
                output_type="pil",
                **encoded.pipeline_kwargs,
            )
        return out.images[0]


def system_prefix_ids(template: str, tokenizer) -> list[int]:
    """Token ids of the template's system turn up to the user turn's content (what the pipeline drops)."""
    marker = "<|im_start|>user\n"
    if marker not in template:
        raise RuntimeError("unexpected Qwen prompt template: no user turn")
    return tokenizer(template[: template.index(marker) + len(marker)])["input_ids"]
