"""The Gradio demo: ``python -m replan.app --backbone flux`` (needs ``pip install 'replan[app]'``).

Public API (import from the modules; nothing is imported here, so ``import replan.app`` needs no Gradio):

* ``replan.app.ui``: ``build_app`` (the page), ``submitted_plan``.
* ``replan.app.callbacks``: plain functions behind the page, no Gradio: ``plan_to_annotator`` /
  ``annotator_to_plan``, ``default_matrix`` / ``matrix_to_rules`` (the rule matrix), ``mask_preview``, ``AppError``.
* ``replan.app.__main__``: ``build_parser``, ``main`` (the CLI).
"""

__all__ = ["callbacks", "ui"]
