"""Backbone registry: name → ``BackboneSpec`` (pipeline class, default model id and the official defaults).

``resolve("flux")`` returns the spec of ``flux_kontext``; ``load_editor(name, model=None, device=..., torch_dtype=...)``
loads the stock diffusers pipeline from the default hub id or any local directory and wraps it in the region
editor of its family. Importing this module imports neither torch-heavy code nor diffusers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EntryDefaults:
    """Defaults that the official code sets per entry point (replan-spec §2.3, §2.6.2)."""

    switch: float  # rule switch: a ratio <= 1 of the steps, or an absolute step > 1
    expand: float  # box expansion (ratio mode)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # module in replan.backbones holding the editor class
    editor_class: str
    pipeline_class: str  # the stock diffusers pipeline
    model_id: str
    steps: int
    guidance: float | None = None  # embedded (distilled) guidance
    true_cfg: float | None = None  # true classifier-free guidance scale
    negative_prompt: str | None = None
    dtype: str = "bfloat16"
    has_image_prompt: bool = False  # the text encoder sees the image (Qwen): an "Image Prompt" group exists
    expand_mode: str = "ratio"
    entries: dict[str, EntryDefaults] = field(default_factory=dict)
    description: str = ""

    def defaults(self, entry: str = "cli") -> EntryDefaults:
        """Official defaults for an entry point: ``cli``, ``app``, ``eval`` or ``server``."""
        if entry not in self.entries:
            raise ValueError(f"unknown entry point {entry!r} for {self.name}; choose from {sorted(self.entries)}")
        return self.entries[entry]


def _entries(cli: tuple[float, float], app: tuple[float, float], eval: tuple[float, float], server=None):
    out = {"cli": EntryDefaults(*cli), "app": EntryDefaults(*app), "eval": EntryDefaults(*eval)}
    if server:
        out["server"] = EntryDefaults(*server)
    return out


BACKBONES: dict[str, BackboneSpec] = {
    "flux_kontext": BackboneSpec(
        name="flux_kontext",
        family="flux_kontext",
        editor_class="FluxKontextEditor",
        pipeline_class="FluxKontextPipeline",
        model_id="black-forest-labs/FLUX.1-Kontext-dev",
        steps=28,
        guidance=2.5,
        # (switch, expand): CLI 0.05/0.15, Gradio 0.0/0.15, IV-Edit eval 0.0/0.15, reward server 0.0/0.15
        entries=_entries(cli=(0.05, 0.15), app=(0.0, 0.15), eval=(0.0, 0.15), server=(0.0, 0.15)),
        description="FLUX.1 Kontext [dev], 12B guidance-distilled MMDiT (19 double + 38 single blocks)",
    ),
}

ALIASES: dict[str, str] = {"flux": "flux_kontext"}


def names() -> list[str]:
    """Every accepted name: registered backbones and aliases."""
    return sorted(BACKBONES) + sorted(ALIASES)


def resolve(name: str) -> BackboneSpec:
    """The spec for a backbone name or alias; ``ValueError`` listing the valid names otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKBONES:
        valid = ", ".join(sorted(BACKBONES)) + " (aliases: " + ", ".join(f"{a}→{t}" for a, t in ALIASES.items()) + ")"
        raise ValueError(f"unknown backbone {name!r}; valid names: {valid}")
    return BACKBONES[key]


def editor_class(spec: BackboneSpec):
    module = importlib.import_module(f"replan.backbones.{spec.family}")
    return getattr(module, spec.editor_class)


def load_editor(name: str, model: str | None = None, **kwargs):
    """Load a backbone's stock pipeline (hub id or local dir; default: the spec's model id) as a region editor.

    ``kwargs`` go to the editor's ``from_pretrained`` (``device``, ``torch_dtype``, ``offload``, …).
    """
    spec = resolve(name)
    return editor_class(spec).from_pretrained(model, spec=spec, **kwargs)
