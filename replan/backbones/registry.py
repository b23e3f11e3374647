"""Backbone registry: name → ``BackboneSpec`` (pipeline class, default model id and the official defaults).

``resolve("flux")`` returns the spec of ``flux_kontext``; ``load_editor(name, model=None, device=..., torch_dtype=...)``
loads the stock diffusers pipeline from the default hub id or any local directory and wraps it in the region
editor of its family. Importing this module imports neither torch-heavy code nor diffusers.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


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
    builder: str | None = None  # "module:function" that saves offline components (the tiny backbones of a plugin)
    editor_kwargs: dict = field(default_factory=dict)
    max_aspect: float | None = None  # the widest aspect ratio the pipeline accepts (None: no limit)

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

def _qwen(name, model_id, pipeline_class, steps, description):
    return BackboneSpec(
        name=name,
        family="qwen_image_edit",
        editor_class="QwenImageEditor",
        pipeline_class=pipeline_class,
        model_id=model_id,
        steps=steps,
        true_cfg=4.0,
        negative_prompt=" ",
        has_image_prompt=True,
        # (switch, expand): CLI 0.5/0.0, Gradio 0.5/0.05, IV-Edit eval 0.0/0.15 (replan-spec §2.6.2). The official
        # code documents these for Qwen-Image-Edit; the EditPlus checkpoints reuse them.
        entries=_entries(cli=(0.5, 0.0), app=(0.5, 0.05), eval=(0.0, 0.15)),
        description=description,
    )


def _klein(name, model_id, steps, guidance, distilled, description):
    return BackboneSpec(
        name=name,
        family="flux2_klein",
        editor_class="Flux2KleinEditor",
        pipeline_class="Flux2KleinPipeline",
        model_id=model_id,
        steps=steps,
        true_cfg=None if distilled else guidance,
        negative_prompt=None if distilled else "",
        # The official code gives no per-entry values for klein: the FLUX.1 Kontext ones are used.
        entries=_entries(cli=(0.05, 0.15), app=(0.0, 0.15), eval=(0.0, 0.15)),
        description=description,
        max_aspect=8.0,  # Flux2ImageProcessor.check_image_input
    )


BACKBONES.update({
    "qwenimageedit": _qwen("qwenimageedit", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 50,
                           "Qwen-Image-Edit, 20B MMDiT (60 double-stream blocks), Qwen2.5-VL-7B text encoder"),
    "qwenimageedit2509": _qwen("qwenimageedit2509", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 40,
                               "Qwen-Image-Edit-2509 (EditPlus pipeline)"),
    "qwenimageedit2511": _qwen("qwenimageedit2511", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 50,
                               "Qwen-Image-Edit-2511 (EditPlus pipeline; zero_cond_t transformer)"),
    "firerededit": _qwen("firerededit", "FireRedTeam/FireRed-Image-Edit-1.1", "QwenImageEditPlusPipeline", 50,
                         "FireRed-Image-Edit-1.1, retrained from Qwen-Image-Edit-2509 (EditPlus pipeline)"),
    "flux_klein": _klein("flux_klein", "black-forest-labs/FLUX.2-klein-9B", 4, 1.0, True,
                         "FLUX.2 [klein] 9B, step-distilled (8 double + 24 single blocks), Qwen3-8B text encoder"),
    "flux_klein_4b": _klein("flux_klein_4b", "black-forest-labs/FLUX.2-klein-4B", 4, 1.0, True,
                            "FLUX.2 [klein] 4B, step-distilled (5 double + 20 single blocks), Qwen3-4B text encoder"),
    "flux_klein_base": _klein("flux_klein_base", "black-forest-labs/FLUX.2-klein-base-9B", 50, 4.0, False,
                              "FLUX.2 [klein] base 9B (true CFG with an empty negative prompt)"),
    "flux_klein_base_4b": _klein("flux_klein_base_4b", "black-forest-labs/FLUX.2-klein-base-4B", 50, 4.0, False,
                                 "FLUX.2 [klein] base 4B (true CFG with an empty negative prompt)"),
})

ALIASES: dict[str, str] = {
    "flux": "flux_kontext",
    "qwen": "qwenimageedit",
    "qwen_plus": "qwenimageedit2509",
    "qwen2511": "qwenimageedit2511",
    "klein": "flux_klein",
}


# Modules that register more backbones when imported: the offline smoke backbones (``tiny``, ``tiny_qwen``,
# ``tiny_klein``) live with the rest of the test components, not in the table above. Imported on first need.
PLUGINS: tuple[str, ...] = ("replan.testing.backbones",)
_plugins_loaded = False


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone under ``spec.name`` (a plugin module calls this when imported); an existing name is refused."""
    if spec.name in BACKBONES or spec.name in ALIASES:
        if BACKBONES.get(spec.name) == spec:
            return spec
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


def load_plugins() -> None:
    """Import the ``PLUGINS`` modules once, so that the backbones they register are known."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module in PLUGINS:
            importlib.import_module(module)


def names() -> list[str]:
    """Every accepted name: registered backbones (plugins included) and aliases."""
    load_plugins()
    return sorted(BACKBONES) + sorted(ALIASES)


def resolve(name: str) -> BackboneSpec:
    """The spec for a backbone name or alias; ``ValueError`` listing the valid names otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKBONES:
        load_plugins()
    if key not in BACKBONES:
        valid = ", ".join(sorted(BACKBONES)) + " (aliases: " + ", ".join(f"{a}→{t}" for a, t in ALIASES.items()) + ")"
        raise ValueError(f"unknown backbone {name!r}; valid names: {valid}")
    return BACKBONES[key]


def editor_class(spec: BackboneSpec):
    module = importlib.import_module(f"replan.backbones.{spec.family}")
    return getattr(module, spec.editor_class)


def cache_dir() -> Path:
    """Where offline-built components are kept: ``$REPLAN_CACHE`` or ``~/.cache/replan``."""
    return Path(os.environ.get("REPLAN_CACHE") or Path.home() / ".cache" / "replan")


def build_offline(builder: str, name: str) -> Path:
    """Run a ``module:function`` builder once into the cache and return the directory."""
    path = cache_dir() / name
    if not path.exists():  # built into a temporary sibling and renamed: existing means complete
        module, func = builder.split(":")
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        if _in_process_group():  # transformers' save_pretrained writes nothing on ranks other than 0
            code = f"import {module} as m; m.{func}({str(tmp)!r})"
            subprocess.run([sys.executable, "-c", code], check=True)
        else:
            getattr(importlib.import_module(module), func)(tmp)
        if path.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.replace(path)
    return path


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def load_editor(name: str, model: str | None = None, **kwargs):
    """Load a backbone's stock pipeline (hub id or local dir; default: the spec's model id) as a region editor.

    ``kwargs`` go to the editor's ``from_pretrained`` (``device``, ``torch_dtype``, ``offload``, …).
    """
    spec = resolve(name)
    if model is None and spec.builder:
        model = str(build_offline(spec.builder, f"{spec.name}-{spec.family}"))
    if spec.editor_kwargs:
        kwargs["editor_kwargs"] = {**spec.editor_kwargs, **(kwargs.get("editor_kwargs") or {})}
    return editor_class(spec).from_pretrained(model, spec=spec, **kwargs)
