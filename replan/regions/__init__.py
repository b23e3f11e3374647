"""Learnable edit regions (arXiv 2505.19352): region predictor, its losses, descriptive texts and training.

Public API (import from the modules; nothing is imported here):

* ``model``: ``RegionGenerator``, ``RegionOutput``; ``losses`` / ``objective``: the loss terms, ``compute_losses``.
* ``config``: ``TrainConfig`` and its sections, ``load_config``; ``train``: ``train``
  (``python -m replan.regions.train``); ``checkpoint``: save / resume.
* ``data`` / ``stream``: ``open_data`` (map-style), ``StreamData`` (sharded streaming).
* ``descriptions`` / ``describe``: ``Describer`` (the descriptive-text pre-pass).
* ``planner``: ``MaskPlanner`` (mask-shaped RePlan regions); ``edit``: ``MaskEditor`` (inpainting).
* ``metrics`` / ``benchmarks`` / ``evaluate``: ``ClipScorer``, ``DinoScorer``; Emu Edit and MagicBrush
  (``python -m replan.regions.evaluate``).
"""

__all__ = ["benchmarks", "checkpoint", "config", "data", "describe", "descriptions", "edit", "evaluate", "losses",
           "metrics", "model", "objective", "planner", "stream", "train"]
