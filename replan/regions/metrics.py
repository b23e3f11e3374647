"""Evaluation metrics of the learnable-regions paper (spec §10): Emu Edit (CLIPdir, CLIPout, L1, CLIPimg, DINO) and
MagicBrush (L1, L2, CLIP-I, DINO).

Two layers:

* pure functions on embeddings / pixel tensors (``clip_direction``, ``cosine``, ``l1_distance``, ``l2_distance``,
  ``pixels``) — the exact maths, testable on hand-made numbers;
* ``ClipScorer`` and ``DinoScorer`` — a checkpoint loaded with ``transformers``' ``from_pretrained`` (hub id or a
  local directory; no torchvision: PIL + numpy preprocessing) that turns PIL images / captions into embeddings, and
  ``emu_metrics`` / ``magicbrush_metrics`` which combine them per sample.

Definitions (all cosines are raw, in [-1, 1]; not the ×100 CLIPScore):

* CLIPdir  = cos(ê_I(out) − ê_I(in), ê_T(output_caption) − ê_T(input_caption)), with ê the L2-normalised projected
  CLIP embedding (normalised *before* the differences, as InstructPix2Pix' ``ClipSimilarity``).
* CLIPout  = cos(E_I(out), E_T(output_caption)).
* CLIPimg / CLIP-I = cos(E_I(a), E_I(b)).
* DINO     = cos of the final-norm [CLS] tokens (``last_hidden_state[:, 0]``, not the ViT pooler), preprocessing as
  MagicBrush' script: resize shorter side to 256 (bicubic) → centre crop 224 → ImageNet normalisation (for a model
  with another ``image_size`` s: resize round(s·256/224), crop s).
* L1 = mean |a − b|, L2 = mean (a − b)² (MSE, not RMSE; MagicBrush' ``nn.MSELoss``) over RGB pixels in [0, 1]; the
  second image is resized (PIL bicubic) to the first's size when they differ: the generated image to the ground
  truth (MagicBrush), the edited image to the source (Emu Edit).

CLIP preprocessing is the checkpoint's own ``CLIPImageProcessorPil`` (for the OpenAI checkpoints: shorter side to 224
bicubic → centre crop 224 → CLIP normalisation, the same as ``clip.load``'s preprocess).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Defaults: spec §10.1 recommends OpenAI CLIP ViT-L/14 for Emu Edit; MagicBrush' official script uses ViT-B/32;
# both use DINO (v1) ViT-S/16 for DINO.
EMU_CLIP = "openai/clip-vit-large-patch14"
MAGICBRUSH_CLIP = "openai/clip-vit-base-patch32"
DINO = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------- pure maths
def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (float64 for stable small numbers)."""
    return F.normalize(x.double(), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (broadcasting); a zero vector gives 0."""
    return (normalize(a) * normalize(b)).sum(-1)


def clip_direction(image_in: torch.Tensor, image_out: torch.Tensor, text_in: torch.Tensor,
                   text_out: torch.Tensor) -> torch.Tensor:
    """CLIPdir: cos(ê(image_out) − ê(image_in), ê(text_out) − ê(text_in)), each embedding L2-normalised first."""
    return cosine(normalize(image_out) - normalize(image_in), normalize(text_out) - normalize(text_in))


def pixels(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB PIL image → float64 tensor (3, H, W) in [0, 1] (``ToTensor``); resized first (PIL bicubic) to ``size``
    = (width, height) when given and different."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float64) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def _pair(reference: Image.Image | torch.Tensor, other: Image.Image | torch.Tensor):
    if isinstance(reference, Image.Image):
        ref = pixels(reference)
        oth = pixels(other, reference.size) if isinstance(other, Image.Image) else other.double()
    else:
        ref = reference.double()
        oth = pixels(other, (ref.shape[-1], ref.shape[-2])) if isinstance(other, Image.Image) else other.double()
    if ref.shape != oth.shape:
        raise ValueError(f"pixel tensors differ in shape: {tuple(ref.shape)} vs {tuple(oth.shape)}")
    return ref, oth


def l1_distance(reference, other) -> float:
    """Mean absolute difference of [0, 1] RGB pixels; ``other`` resized (bicubic) to ``reference``'s size."""
    ref, oth = _pair(reference, other)
    return float((ref - oth).abs().mean())


def l2_distance(reference, other) -> float:
    """Mean squared difference (MSE) of [0, 1] RGB pixels; ``other`` resized (bicubic) to ``reference``'s size."""
    ref, oth = _pair(reference, other)
    return float(((ref - oth) ** 2).mean())


# ---------------------------------------------------------------------------------------------------- models
def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in older transformers and a ``BaseModelOutputWithPooling`` (projected
    ``pooler_output``) in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """Projected CLIP image / text embeddings from a ``CLIPModel`` checkpoint (hub id or local directory)."""

    def __init__(self, checkpoint: str = EMU_CLIP, device: str | None = None, batch_size: int = 16):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        self.checkpoint = str(checkpoint)
        self.device = _device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(self.checkpoint).eval().to(self.device)
        self.image_processor = CLIPImageProcessorPil.from_pretrained(self.checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pv = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pv = pv.to(self.device, self.model.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=pv)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        max_length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                         int(self.model.config.text_config.max_position_embeddings))
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            out.append(_features(feats).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def dino_preprocess(image: Image.Image, crop: int = 224, resize: int | None = None) -> torch.Tensor:
    """MagicBrush' DINO transform without torchvision: shorter side → ``resize`` (default round(crop·256/224)),
    bicubic; centre crop ``crop``; [0, 1]; ImageNet mean/std. Returns (3, crop, crop) float32."""
    resize = resize or int(round(crop * 256 / 224))
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)  # torchvision Resize(int): the long side is truncated
    else:
        nw, nh = int(resize * w / h), resize
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


class DinoScorer:
    """[CLS] embeddings of a DINO / DINOv2 ViT (``AutoModel``; hub id or local directory)."""

    def __init__(self, checkpoint: str = DINO, device: str | None = None, batch_size: int = 16):
        from transformers import AutoConfig, AutoModel

        self.checkpoint = str(checkpoint)
        self.device = _device(device)
        self.batch_size = batch_size
        config = AutoConfig.from_pretrained(self.checkpoint)
        kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # DINO ships no ViT pooler
        self.model = AutoModel.from_pretrained(self.checkpoint, **kwargs).eval().to(self.device)
        size = getattr(self.model.config, "image_size", 224)
        self.crop = int(size[0] if isinstance(size, (list, tuple)) else size)
        if self.crop > 224 * 2:  # DINOv2 configs say 518 (their pretraining size); evaluate at 224 as MagicBrush
            self.crop = 224

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pv = torch.stack([dino_preprocess(im, self.crop) for im in images[i : i + self.batch_size]])
            pv = pv.to(self.device, self.model.dtype)
            hidden = self.model(pixel_values=pv).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def checkpoint_name(checkpoint) -> str:
    """A checkpoint as recorded in results: a hub id as given, a local directory as its resolved path."""
    path = Path(str(checkpoint))
    return str(path.resolve()) if path.exists() else str(checkpoint)


# ---------------------------------------------------------------------------------------------------- per sample
def emu_metrics(source: Image.Image, edited: Image.Image, input_caption: str | None, output_caption: str | None,
                clip: ClipScorer, dino: DinoScorer) -> dict:
    """Emu Edit metrics of one sample. CLIPdir needs both captions and CLIPout the output caption; a missing
    (empty) caption gives ``None`` for those."""
    img = clip.images([source, edited])
    has_in, has_out = bool(input_caption and input_caption.strip()), bool(output_caption and output_caption.strip())
    result = {"clip_dir": None, "clip_out": None}
    if has_out:
        captions = [input_caption, output_caption] if has_in else [output_caption]
        txt = clip.texts(captions)
        result["clip_out"] = float(cosine(img[1], txt[-1]))
        if has_in:
            result["clip_dir"] = _finite(clip_direction(img[0], img[1], txt[0], txt[1]))
    dn = dino.images([source, edited])
    result.update(l1=l1_distance(source, edited), clip_img=float(cosine(img[0], img[1])),
                  dino=float(cosine(dn[0], dn[1])))
    return result


def magicbrush_metrics(target: Image.Image, generated: Image.Image, clip: ClipScorer, dino: DinoScorer) -> dict:
    """MagicBrush metrics of one (generated, ground-truth) pair; the generated image is resized to the GT size."""
    img, dn = clip.images([generated, target]), dino.images([generated, target])
    return {"l1": l1_distance(target, generated), "l2": l2_distance(target, generated),
            "clip_i": float(cosine(img[0], img[1])), "dino": float(cosine(dn[0], dn[1]))}


def _finite(x: torch.Tensor) -> float:
    value = float(x)
    return value if math.isfinite(value) else 0.0
