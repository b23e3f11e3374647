"""Region predictor of arXiv 2505.19352 (§4 of ``learnable-regions-spec.md``) around frozen CLIP and FLAN-T5.

    gen = RegionGenerator.from_pretrained("openai/clip-vit-large-patch14", "google/flan-t5-base")
    out = gen(pixel_values, ins_ids, ins_mask)   # out.probs (B, N), out.mask (B, √N, √N), gen.upsample(out.mask, H, W)

Frozen: the CLIP vision tower (patch features ``F_img`` and image embedding ``I_ori``), the CLIP text tower
(``T_o``/``T_e`` for the losses) and the FLAN-T5 encoder (``F_ins``). Trainable (``RegionHead``): cross-attention
patches ← instruction tokens (Eq. 1), self-attention (Eq. 2), token-wise MLP + sigmoid (Eq. 3) and the alignment
network ``g`` (Eqs. 4–5; training only). Every size the paper leaves open is a field of ``RegionModelConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# the config lives in a torch-free module (a CLI checks its config before importing torch); re-exported here
from replan.regions.config import RegionModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_FILE = "region_head.safetensors"
TINY = "tiny"  # offline random stand-ins (tests, smoke runs)
CONFIG_FILE = "region_config.json"


@dataclass
class RegionOutput:
    probs: torch.Tensor     # (B, N) P = σ(MLP(F_refined))
    mask: torch.Tensor      # (B, g, g) hard 1[P > θ] on the patch grid, float
    refined: torch.Tensor   # (B, N, d) F_refined
    patches: torch.Tensor   # (B, N, d) F_img (frozen CLIP patches, through ``patch_in``)
    image_embeds: torch.Tensor  # (B, d) I_ori (frozen)
    g_fused: torch.Tensor | None = None   # (B, d) g(F_refined), training only
    g_source: torch.Tensor | None = None  # (B, d) g(F_img), training only
    hidden: torch.Tensor | None = None    # (B, 1+N, C) CLIP vision hidden state for L_struct, when asked


class _Attn(nn.Module):
    """Pre-LN multi-head attention with a residual: x ← x + Attn(LN(x), kv)."""

    def __init__(self, d: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.cross = cross
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d) if cross else None
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, kv=None, kv_pad=None):
        q = self.norm_q(x)
        kv = self.norm_kv(kv) if self.cross else q
        x = x + self.attn(q, kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class AlignNet(nn.Module):
    """g: a set of N features → one CLIP-space vector (attention pooling or mean, then a 2-layer MLP)."""

    def __init__(self, d: int, out_dim: int, hidden: int, pool: str, heads: int):
        super().__init__()
        if pool not in ("attn", "mean"):
            raise ValueError(f"g_pool must be attn or mean, not {pool!r}")
        self.pool = pool
        if pool == "attn":
            self.query = nn.Parameter(torch.randn(1, 1, d) * d ** -0.5)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, feats):
        if self.pool == "attn":
            pooled = self.attn(self.query.expand(feats.shape[0], -1, -1), feats, feats, need_weights=False)[0][:, 0]
        else:
            pooled = feats.mean(1)
        return F.normalize(self.mlp(pooled), dim=-1)


class RegionHead(nn.Module):
    """All trainable parts: optional input maps, Eq. 1–3 and g."""

    def __init__(self, cfg: RegionModelConfig, vision_width: int, proj_dim: int, t5_width: int):
        super().__init__()
        d = proj_dim if cfg.patch_proj == "clip" else (proj_dim if cfg.patch_proj == "linear" else vision_width)
        if cfg.patch_proj not in ("clip", "linear", "none"):
            raise ValueError(f"patch_proj must be clip, linear or none, not {cfg.patch_proj!r}")
        if d % cfg.heads:
            raise ValueError(f"token width {d} is not divisible by heads={cfg.heads}")
        self.d = d
        self.patch_in = nn.Linear(vision_width, d) if cfg.patch_proj == "linear" else nn.Identity()
        # the paper picks FLAN-T5-Base so that d' = d; a learned map only when the widths differ (tiny models)
        self.ins_in = nn.Identity() if t5_width == d else nn.Linear(t5_width, d)
        self.cross = nn.ModuleList(_Attn(d, cfg.heads, cfg.dropout, True) for _ in range(cfg.cross_layers))
        self.self_attn = nn.ModuleList(_Attn(d, cfg.heads, cfg.dropout, False) for _ in range(cfg.self_layers))
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.mlp_hidden), nn.GELU(), nn.Linear(cfg.mlp_hidden, 1))
        self.g = AlignNet(d, proj_dim, cfg.g_hidden, cfg.g_pool, cfg.heads)

    def forward(self, patches, ins, ins_pad=None, with_g: bool = False) -> dict:
        """Raw CLIP patches and T5 states → ``probs``, ``refined``, ``patches`` (+ ``g_fused``/``g_source``).
        Everything trainable runs inside this one forward so that a DDP wrapper sees all of it."""
        patches = self.patch_in(patches)
        x = patches
        for layer in self.cross:
            x = layer(x, self.ins_in(ins), ins_pad)
        for layer in self.self_attn:
            x = layer(x)
        out = {"probs": torch.sigmoid(self.mlp(x).squeeze(-1)), "refined": x, "patches": patches}
        if with_g:
            out["g_fused"], out["g_source"] = self.g(x), self.g(patches)
        return out


class RegionGenerator(nn.Module):
    def __init__(self, cfg: RegionModelConfig, clip_vision, clip_text, t5, clip_tokenizer, t5_tokenizer,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD):
        super().__init__()
        self.cfg = cfg
        self.clip_vision, self.clip_text, self.t5 = clip_vision, clip_text, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        for m in (clip_vision, clip_text, t5):
            m.requires_grad_(False).eval()
        vc = clip_vision.config
        self.grid = vc.image_size // vc.patch_size
        if cfg.image_size != vc.image_size:
            raise ValueError(f"image_size={cfg.image_size} but the CLIP vision tower takes {vc.image_size}")
        self.head = RegionHead(cfg, vc.hidden_size, clip_vision.config.projection_dim, t5.config.d_model)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.eval()  # inference mode until a trainer calls ``head.train()``: dropout never acts outside training

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, clip: str | None = None, t5: str | None = None, config: RegionModelConfig | None = None,
                        torch_dtype=None, **overrides) -> RegionGenerator:
        from transformers import (
            AutoTokenizer,
            CLIPTextModelWithProjection,
            CLIPVisionModelWithProjection,
            T5EncoderModel,
        )

        cfg = dataclasses.replace(config or RegionModelConfig(), **overrides)
        cfg.clip, cfg.t5 = clip or cfg.clip, t5 or cfg.t5
        clip_dir, t5_dir = resolve_backbone(cfg.clip, "clip"), resolve_backbone(cfg.t5, "t5")
        kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir, **kw)
            text = CLIPTextModelWithProjection.from_pretrained(clip_dir, **kw)
            clip_tok = AutoTokenizer.from_pretrained(clip_dir)
        except OSError as e:
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"cannot load CLIP from model.clip={cfg.clip!r}: {why}") from None
        try:
            enc = T5EncoderModel.from_pretrained(t5_dir, **kw)
            t5_tok = AutoTokenizer.from_pretrained(t5_dir)
        except OSError as e:
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"cannot load FLAN-T5 from model.t5={cfg.t5!r}: {why}") from None
        mean, std = _image_stats(clip_dir)
        return cls(cfg, vision, text, enc, clip_tok, t5_tok, mean, std)

    def save(self, path: str | Path) -> Path:
        """Only the trainable head and the config (the frozen encoders are referenced by id/dir)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2), encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, path / HEAD_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path, config: RegionModelConfig | None = None, **kwargs) -> RegionGenerator:
        """Rebuild from ``save`` in inference mode (``eval()``); with ``config``, a checkpoint made under a different
        config is an error."""
        saved = cls.saved_config(path)
        if config is not None:
            check_same_config(saved, config, path)
        model = cls.from_pretrained(config=saved, **kwargs)
        model.load_head(path)
        return model.eval()

    @staticmethod
    def saved_config(path: str | Path) -> RegionModelConfig:
        """The ``RegionModelConfig`` a checkpoint folder was saved with."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"{path} is not a region-generator checkpoint (no {CONFIG_FILE})")
        return RegionModelConfig(**json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))

    def load_head(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(path) / HEAD_FILE))
        try:
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: the saved region head does not fit this model "
                             f"({str(e).splitlines()[0]})") from None

    # ------------------------------------------------------------------------------------------------ encoders
    def preprocess(self, images) -> torch.Tensor:
        """PIL images → CLIP-normalised (B, 3, S, S) (bicubic resize of the whole image, no crop)."""
        import numpy as np

        s = self.cfg.image_size
        arr = [np.asarray(im.convert("RGB").resize((s, s), 3), dtype=np.float32) / 255.0 for im in images]
        x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).to(self.mean.device)
        return (x - self.mean) / self.std

    def to_unit(self, pixel_values):
        return (pixel_values * self.std + self.mean).clamp(0, 1)

    def vision(self, pixel_values, hidden_layer: int | None = None):
        """(patch features F_img (B, N, d), image embedding (B, d), optional hidden state of ``hidden_layer``)."""
        out = self.clip_vision(pixel_values=pixel_values.to(self.clip_vision.dtype),
                               output_hidden_states=hidden_layer is not None)
        tokens = out.last_hidden_state[:, 1:]
        if self.cfg.patch_proj == "clip":
            tokens = self.clip_vision.visual_projection(self.clip_vision.vision_model.post_layernorm(tokens))
        hidden = out.hidden_states[hidden_layer] if hidden_layer is not None else None
        return tokens.float(), out.image_embeds.float(), hidden

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tok = self.clip_tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens,
                                  return_tensors="pt").to(self.mean.device)
        return self.clip_text(**tok).text_embeds.float()

    def encode_instruction(self, texts: list[str]):
        tok = self.t5_tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_ins_tokens,
                                return_tensors="pt").to(self.mean.device)
        hidden = self.t5(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        return hidden.float(), tok.attention_mask == 0

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, pixel_values, instructions: list[str], with_g: bool = False, hidden_layer: int | None = None,
                head: nn.Module | None = None) -> RegionOutput:
        """``head``: the (possibly DDP-wrapped) trainable head to run instead of ``self.head``."""
        with torch.no_grad():
            patches, image_embeds, hidden = self.vision(pixel_values, hidden_layer)
            ins, pad = self.encode_instruction(instructions)
        out = (head or self.head)(patches, ins, pad, with_g=with_g)
        return RegionOutput(probs=out["probs"], mask=self.threshold(out["probs"]), refined=out["refined"],
                            patches=out["patches"], image_embeds=image_embeds, g_fused=out.get("g_fused"),
                            g_source=out.get("g_source"), hidden=hidden)

    def threshold(self, probs):
        b, n = probs.shape
        side = math.isqrt(n)
        return (probs > self.cfg.theta).to(probs.dtype).view(b, side, side)

    def upsample(self, mask, height: int | None = None, width: int | None = None):
        """(B, g, g) → (B, 1, H, W); gradients flow through (nearest copies, bilinear interpolates)."""
        size = (height or self.cfg.image_size, width or self.cfg.image_size)
        m = mask.unsqueeze(1)
        if self.cfg.upsample == "nearest":
            return F.interpolate(m, size=size, mode="nearest")
        if self.cfg.upsample == "bilinear":
            return F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        raise ValueError(f"upsample must be nearest or bilinear, not {self.cfg.upsample!r}")

    @torch.no_grad()
    def predict(self, images, instructions: list[str], size=None):
        """Inference: PIL images + instructions → hard masks at ``size`` (W, H) or the model size, (B, H, W) bool.
        Runs in eval mode (no dropout: the same input always gives the same mask), then restores the mode."""
        was_training = self.head.training
        self.head.eval()
        try:
            out = self(self.preprocess(images), instructions)
        finally:
            self.head.train(was_training)
        w, h = size or (self.cfg.image_size, self.cfg.image_size)
        return self.upsample(out.mask, h, w)[:, 0] > 0.5


def check_same_config(saved: RegionModelConfig, wanted: RegionModelConfig, where) -> None:
    diff = {k: (getattr(saved, k), getattr(wanted, k)) for k in dataclasses.asdict(saved)
            if getattr(saved, k) != getattr(wanted, k)}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{where} was saved with a different region-model config ({pretty})")


def resolve_backbone(name: str, part: str) -> str:
    """``"tiny"`` → the offline tiny CLIP (``part="clip"``) or FLAN-T5 (``"t5"``) stand-in, built once into the cache
    (``replan.testing.regions``; ``model.image_size`` must then be 32); anything else is a hub id or a directory."""
    if name != TINY:
        return name
    from replan.backbones.registry import build_offline

    return str(build_offline("replan.testing.regions:save_tiny_regions_backbones", "tiny-regions") / part)


def _image_stats(clip: str):
    """Mean/std from the checkpoint's preprocessor_config.json when it is a local dir; OpenAI's otherwise."""
    p = Path(clip) / "preprocessor_config.json"
    if p.is_file():
        data = json.loads(p.read_text(encoding="utf-8"))
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD
