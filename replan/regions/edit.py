"""Predict a mask, then regenerate inside it with a stock diffusers inpainting pipeline (spec §5, Appendix A).

``MaskEditor`` wraps ``StableDiffusionInpaintPipeline``, ``StableDiffusionXLInpaintPipeline`` or ``FluxFillPipeline``
(loaded by model id or local directory). Besides the pipeline's own mask conditioning it **blends every step**
(Appendix A): after each denoising step the latents outside the (latent-resolution) mask are replaced by the source
image's latents noised to the next timestep with fresh noise::

    z_{t-1} <- m * z_{t-1} + (1 - m) * noised(z_0, t-1, eps')

(DDPM-style schedulers: ``scheduler.add_noise``; flow matching (FLUX Fill): ``(1 - sigma) z_0 + sigma eps'``, on
packed 2x2 latents). After the last step the outside equals ``z_0`` exactly, so the output there is the VAE
round-trip of the input. The mask may be an array/tensor/PIL image at any resolution (e.g. the region generator's
patch grid; resized to the image with nearest neighbour) or a callable ``mask(image, prompt)`` returning one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SUPPORTED = ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline", "FluxFillPipeline")


@dataclass
class MaskEditResult:
    image: Image.Image  # at the input's size
    mask: np.ndarray  # (H, W) bool pixel mask actually used, input frame
    # extras: blend, latents (final, unpacked), source_latents (z_0 when blending)
    latent_mask: torch.Tensor  # (h, w) bool mask at latent resolution used for blending (outward rounding)
    generation_size: tuple[int, int]
    extras: dict = field(default_factory=dict)


def to_pixel_mask(mask, size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Any 2-D mask (bool, probabilities in [0, 1], uint8 0..255, PIL, tensor) → (H, W) bool at ``size`` = (W, H)."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) > 127
    else:
        if hasattr(mask, "detach"):
            mask = mask.detach().float().cpu().numpy() if mask.dtype != torch.bool else mask.cpu().numpy()
        arr = np.asarray(mask)
        arr = np.squeeze(arr) if arr.ndim > 2 else arr
        if arr.ndim != 2:
            raise ValueError(f"a mask must be 2-D (H, W), got shape {np.asarray(mask).shape}")
        if arr.dtype == np.bool_:
            pass
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr > (127 if arr.max(initial=0) > 1 else 0)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr > threshold
        else:
            raise ValueError(f"a mask must be boolean or numeric, got dtype {arr.dtype}")
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize(tuple(size), Image.NEAREST)) > 127
    return arr


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (in the generation frame) → latent-resolution mask; a cell is inside if any of its pixels is."""
    t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return F.adaptive_max_pool2d(t, latent_hw)[0, 0] > 0


class MaskEditor:
    """Regenerate the masked part of an image with a frozen inpainting pipeline, blending the rest every step."""

    def __init__(self, pipe, multiple: int | None = None):
        name = type(pipe).__name__
        if name not in SUPPORTED:
            raise ValueError(f"MaskEditor needs one of {', '.join(SUPPORTED)}, got {name}")
        self.pipe = pipe
        self.flow = name == "FluxFillPipeline"
        vae_factor = getattr(pipe, "vae_scale_factor", 8)
        self.multiple = int(multiple or (vae_factor * 2 if self.flow else vae_factor))

    @classmethod
    def from_pretrained(cls, model: str, *, pipeline: str | None = None, device=None, torch_dtype=None,
                        multiple: int | None = None, **load_kwargs) -> MaskEditor:
        """Load an inpainting pipeline from a hub id or local directory; ``pipeline`` names the class (default:
        the ``_class_name`` of a local ``model_index.json``, else ``StableDiffusionInpaintPipeline``)."""
        import json
        from pathlib import Path

        import diffusers

        from replan.backbones.base import resolve_dtype

        if pipeline is None:
            index = Path(model) / "model_index.json"
            pipeline = json.loads(index.read_text())["_class_name"] if index.is_file() else SUPPORTED[0]
            if pipeline == "StableDiffusionPipeline":
                pipeline = SUPPORTED[0]
        if pipeline not in SUPPORTED:
            raise ValueError(f"pipeline must be one of {', '.join(SUPPORTED)}, got {pipeline!r}")
        dtype = resolve_dtype(torch_dtype, device, "float16" if "StableDiffusion" in pipeline else "bfloat16")
        try:
            pipe = getattr(diffusers, pipeline).from_pretrained(model, dtype=dtype, **load_kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load {pipeline} from {model!r}: {e}") from e
        if device is not None:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, multiple=multiple)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def generation_size(self, size: tuple[int, int]) -> tuple[int, int]:
        m = self.multiple
        return (max(m, size[0] // m * m), max(m, size[1] // m * m))

    # ------------------------------------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode(self, image: Image.Image, gen_size: tuple[int, int]) -> torch.Tensor:
        """Source latents ``z_0`` (VAE posterior mode, scaled as the pipeline scales them; unpacked)."""
        vae = self.pipe.vae
        x = self.pipe.image_processor.preprocess(image, height=gen_size[1], width=gen_size[0])
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            z = vae.encode(x.to(self.device, dtype)).latent_dist.mode()
        finally:
            if upcast:
                vae.to(torch.float16)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> Image.Image:
        """Decode unpacked scaled latents to an image (for the VAE round-trip reference)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode((z / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return self.pipe.image_processor.postprocess(x, output_type="pil")[0]

    def round_trip(self, image: Image.Image) -> Image.Image:
        """The input through VAE encode/decode at the generation size, resized back: what blending preserves."""
        gen = self.generation_size(image.size)
        out = self.decode(self.encode(image.convert("RGB"), gen))
        return out if out.size == image.size else out.resize(image.size, Image.LANCZOS)

    # ------------------------------------------------------------------------------------------------ editing
    def edit(self, image: Image.Image, mask, prompt: str, steps: int = 50, seed: int = 0, blend: bool = True,
             *, guidance_scale: float | None = None, callback: Callable | None = None, **pipeline_kwargs
             ) -> MaskEditResult:
        """Regenerate ``image`` inside ``mask`` following ``prompt`` (the target description t_e)."""
        image = image.convert("RGB")
        if callable(mask):
            mask = mask(image, prompt)
        pixel = to_pixel_mask(mask, image.size)
        if not pixel.any():
            raise ValueError("the mask is empty: nothing to edit")
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        gen = self.generation_size(image.size)
        gen_pixel = to_pixel_mask(pixel, gen)
        factor = self.pipe.vae_scale_factor
        lat_hw = (gen[1] // factor, gen[0] // factor)
        lmask = latent_mask(gen_pixel, lat_hw)
        if self.flow:  # a packed token covers 2x2 latent cells: round outward to tokens
            tok = F.adaptive_max_pool2d(lmask[None, None].float(), (lat_hw[0] // 2, lat_hw[1] // 2))[0, 0] > 0
            lmask = tok.repeat_interleave(2, 0).repeat_interleave(2, 1)
        # the pipeline's own mask: the latent mask upsampled, so conditioning and blending agree
        cond_mask = Image.fromarray(lmask.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
                                    .numpy().astype(np.uint8) * 255)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        kwargs = dict(prompt=prompt, image=image.resize(gen, Image.LANCZOS) if image.size != gen else image,
                      mask_image=cond_mask, height=gen[1], width=gen[0], num_inference_steps=steps,
                      generator=generator, **pipeline_kwargs)
        if not self.flow:
            kwargs["strength"] = 1.0
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        z0 = self.encode(image, gen) if blend else None
        final: dict = {}
        kwargs["callback_on_step_end"] = self._blender(z0, lmask, seed, callback, final)
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        out = self.pipe(**kwargs).images[0]
        if out.size != image.size:
            out = out.resize(image.size, Image.LANCZOS)
        latents = final.get("latents")
        if latents is not None and self.flow:
            latents = self.pipe._unpack_latents(latents, gen[1], gen[0], self.pipe.vae_scale_factor)
        return MaskEditResult(out, pixel, lmask, gen, {"blend": blend, "latents": latents, "source_latents": z0})

    def _blender(self, z0: torch.Tensor | None, lmask: torch.Tensor, seed: int, callback: Callable | None,
                 final: dict):
        noise_gen = torch.Generator("cpu").manual_seed(int(seed) + 1)
        flow = self.flow

        def step_end(pipe, i, t, callback_kwargs):
            latents = callback_kwargs["latents"]
            if z0 is not None:
                timesteps = pipe.scheduler.timesteps
                last = i + 1 >= len(timesteps)
                eps = torch.randn(z0.shape, generator=noise_gen, dtype=torch.float32).to(z0.device, z0.dtype)
                if flow:
                    sigma = 0.0 if last else float(pipe.scheduler.sigmas[i + 1])
                    ref = z0 if last else (1 - sigma) * z0 + sigma * eps
                else:
                    ref = z0 if last else pipe.scheduler.add_noise(z0, eps, timesteps[i + 1 : i + 2])
                m = lmask.to(latents.device, latents.dtype)[None, None].expand(ref.shape[0], ref.shape[1], -1, -1)
                if flow:
                    b, c, h, w = ref.shape
                    ref = pipe._pack_latents(ref, b, c, h, w)
                    m = pipe._pack_latents(m.contiguous(), b, c, h, w)
                ref = ref.to(latents.dtype).expand_as(latents) if ref.shape[0] == 1 else ref.to(latents.dtype)
                m = m.expand_as(latents) if m.shape[0] == 1 else m
                latents = m * latents + (1 - m) * ref
                callback_kwargs = {**callback_kwargs, "latents": latents}
            if callback is not None:
                callback_kwargs = callback(pipe, i, t, callback_kwargs) or callback_kwargs
            final["latents"] = callback_kwargs["latents"].detach().clone()
            return callback_kwargs

        return step_end

