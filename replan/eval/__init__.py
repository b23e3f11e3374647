"""IV-Edit evaluation: dataset, generation (RePlan and baselines), VLM judges, scoring, fidelity metrics, reports.

Public API (import from the modules; nothing is imported here):

* ``dataset``: ``load_samples``, ``open_dataset``, ``EvalSample``.
* ``gen_config`` / ``generate``: ``GenerateConfig``, ``load_config``; ``run``, ``Generator``
  (``python -m replan.eval.generate``).
* ``judge_prompts``: rubric templates and reply parsing (``load_templates``, ``build_parts``, ``parse_judgement``).
* ``judge_base`` / ``judges``: ``Judge``, ``JudgeResult``, ``JudgeConfigError``; ``OpenAIJudge``, ``GenAIJudge``,
  ``make_judge`` (every judge name is importable from ``judges``).
* ``scoring`` / ``evaluate``: ``sample_metrics``, ``summarize``; ``evaluate`` (``python -m replan.eval.evaluate``).
* ``image_metrics`` / ``fidelity``: ``psnr``, ``ssim``, ``box_mask``, ``LPIPS``; ``measure``
  (``python -m replan.eval.fidelity``).
* ``report``: ``build_report`` (``python -m replan.eval.report``).
"""

__all__ = ["dataset", "evaluate", "fidelity", "gen_config", "generate", "image_metrics", "judge_base",
           "judge_prompts", "judges", "report", "scoring"]
