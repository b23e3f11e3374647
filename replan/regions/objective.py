"""One training step's objective (Eq. 11) and the frozen generator output it is computed on.

* ``compute_losses`` — L = α L_sa + β L_CLIP for a batch, with the mask gradient of ``loss.mask_grad``: ``ste``
  (straight-through) or ``reinforce`` (score function; leave-one-out baseline for a batch of ≥ 2 samples, the
  ``RunningBaseline`` of earlier steps for a batch of one — both unbiased, see ``losses.reinforce``).
* ``ProxyGenerator`` — ``I_gen`` for the proxy edit ``up(M) ⊙ I_gen + (1 − up(M)) ⊙ X`` (spec §6.4). Inpainted
  images are cached as PNGs keyed by everything that produced them: the generator's settings (a fingerprint that
  names the cache folder) and, per file, the sample and its target text ``t_e``. A changed setting or description
  regenerates; ``reused``/``generated`` count both.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from replan.io import write_file
from replan.regions import losses as L
from replan.regions.config import GeneratorConfig, TrainConfig


def compute_losses(model, head, cfg: TrainConfig, pixel_values, texts, gen_pixels,
                   rng: torch.Generator | None = None, running: L.RunningBaseline | None = None) -> dict:
    """All loss terms for one batch; ``loss`` is the differentiable objective, ``loss_total`` its value (Eq. 11).
    ``running``: the running baseline of the reinforce estimator (read, then updated with this batch's costs)."""
    lc = cfg.loss
    out = model(pixel_values, [t["t_ins"] for t in texts], with_g=True, hidden_layer=lc.struct_layer, head=head)
    with torch.no_grad():
        t_e = model.encode_text([t["t_e"] for t in texts])
        t_o = model.encode_text([t["t_o"] for t in texts])
    sa = L.semantic_alignment(out.g_fused, out.g_source, t_e, t_o)
    terms = {k: v.detach().mean() for k, v in sa.items()}
    b, n = out.probs.shape
    side = math.isqrt(n)
    if lc.beta:
        lambdas = (lc.lambda_clip, lc.lambda_dir, lc.lambda_struct)

        def clip_terms(mask):
            proxy = L.composite(model.upsample(mask.view(b, side, side)), gen_pixels, pixel_values)
            _, i_e, hidden = model.vision(proxy, lc.struct_layer)
            return L.clip_supervision(i_e, out.image_embeds, t_e, t_o, hidden.float(), out.hidden.float(), lambdas,
                                      lc.dir_normalize, lc.struct_reduction)

        if lc.mask_grad == "ste":
            cl = clip_terms(L.straight_through(out.probs, model.cfg.theta))
            clip_obj = cl["clip_total"].mean()
            mask_frac = out.mask.mean()
        else:
            sample, log_prob = L.bernoulli_mask(out.probs.float(), rng)
            with torch.no_grad():
                cl = clip_terms(sample)
            cost = cl["clip_total"].float()
            clip_obj = L.reinforce(log_prob, cost, reinforce_baseline(lc.baseline, b, running))
            if running is not None:
                running.update(cost)
            mask_frac = sample.mean()
        terms.update({k: v.detach().mean() for k, v in cl.items()})
        loss = lc.alpha * sa["sa"].mean() + lc.beta * clip_obj
    else:
        loss = lc.alpha * sa["sa"].mean()
        mask_frac = out.mask.mean()
    terms["mask_frac"] = mask_frac.detach()
    terms["loss_total"] = lc.alpha * terms["sa"] + lc.beta * terms.get("clip_total", torch.zeros(()))
    terms["loss"] = loss
    return terms


def reinforce_baseline(kind: str, batch: int, running: L.RunningBaseline | None):
    """``auto``: leave-one-out for ≥ 2 samples, else the running baseline; ``running``; ``none``."""
    if kind == "none":
        return None
    if kind == "auto" and batch >= 2:
        return "loo"
    return None if running is None else running.value


# -------------------------------------------------------------------------------------------------- generator
def generator_fingerprint(cfg: GeneratorConfig, seed: int) -> str:
    """sha256 of everything that decides an inpainted image besides the sample and its prompt."""
    spec = {k: getattr(cfg, k) for k in ("kind", "path", "mask", "steps", "guidance_scale", "resolution", "dtype")}
    return hashlib.sha256(json.dumps({**spec, "seed": seed}, sort_keys=True).encode()).hexdigest()


class ProxyGenerator:
    """I_gen for the proxy edit, as CLIP-normalised pixels (B, 3, S, S), never differentiated."""

    def __init__(self, cfg: GeneratorConfig, model, cache_dir: str | Path, seed: int = 0):
        self.cfg, self.model, self.pipe, self.seed = cfg, model, None, seed
        self.fingerprint = generator_fingerprint(cfg, seed)
        self.cache_dir = Path(cache_dir) / self.fingerprint[:16]
        self.reused = self.generated = 0

    def __call__(self, images, pixel_values, texts, hard_mask=None):
        if self.cfg.kind == "offline":  # stand-in (NOT an edit model): colour channels rotated
            unit = self.model.to_unit(pixel_values)
            return ((unit.roll(1, dims=1) - self.model.mean) / self.model.std).detach()
        outs = []
        for k, (img, t) in enumerate(zip(images, texts)):
            if self.cfg.mask == "current":
                outs.append(self._inpaint(img, hard_mask[k], t["t_e"], t["key"]))
                self.generated += 1
            else:
                outs.append(self._cached(img, t))
        return self.model.preprocess(outs).detach()

    def entry(self, key: str, t_e: str) -> Path:
        """The cache file of one sample under one target text (in the folder of this generator's settings)."""
        return self.cache_dir / (hashlib.sha256(f"{key}\0{t_e}".encode()).hexdigest()[:32] + ".png")

    def _cached(self, image, t: dict):
        from PIL import Image

        path = self.entry(t["key"], t["t_e"])
        if path.is_file():
            try:
                with Image.open(path) as im:
                    out = im.convert("RGB")
                self.reused += 1
                return out
            except OSError:  # a damaged entry is regenerated
                pass
        out = self._inpaint(image, None, t["t_e"], t["key"])
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.cache_dir / "generator.json"
        if not manifest.is_file():
            write_file(manifest, lambda p: p.write_text(json.dumps(
                {"fingerprint": self.fingerprint, "seed": self.seed, **vars(self.cfg)}, indent=2), encoding="utf-8"))
        write_file(path, lambda p: out.save(p, format="PNG"))
        self.generated += 1
        return out

    def _inpaint(self, image, mask, prompt, key: str):
        from PIL import Image

        if self.pipe is None:
            from diffusers import AutoPipelineForInpainting

            dtype = getattr(torch, self.cfg.dtype)
            device = self.model.mean.device
            if device.type == "cpu":
                dtype = torch.float32
            self.pipe = AutoPipelineForInpainting.from_pretrained(self.cfg.path, dtype=dtype).to(device)
            self.pipe.set_progress_bar_config(disable=True)
        r = self.cfg.resolution
        if mask is None:
            mask_img = Image.new("L", (r, r), 255)
        else:
            m = (mask.detach().float().cpu().numpy() > 0.5).astype("uint8") * 255
            mask_img = Image.fromarray(m).resize((r, r), Image.NEAREST)
        digest = int(hashlib.sha256(str(key).encode()).hexdigest()[:8], 16)
        generator = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + digest)
        with torch.no_grad():
            return self.pipe(prompt=prompt, image=image.resize((r, r)), mask_image=mask_img, height=r, width=r,
                             num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                             generator=generator).images[0]


