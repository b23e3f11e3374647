"""Editors: thin region-attention adapters over stock diffusers pipelines, and the registry of backbones."""

from replan.backbones.registry import ALIASES, BACKBONES, BackboneSpec, EntryDefaults, load_editor, names, resolve

__all__ = ["ALIASES", "BACKBONES", "BackboneSpec", "EntryDefaults", "load_editor", "names", "resolve"]
