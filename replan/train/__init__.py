"""GRPO training of the planner: rewards (stage-1 format, stage-2 planning), remote reward clients, data, trainer.

Public API (import from the modules; nothing is imported here, so ``import replan.train`` needs neither TRL nor verl):

* ``rewards``: ``stage1_rewards``, ``editing_score``, ``planning_score``, ``should_execute`` (pure functions).
* ``remote`` / ``reward_clients``: ``Stage2Reward``, ``RewardConfig``; ``EditClient``, ``JudgeClient`` (async).
* ``data``: ``DataConfig``, ``iter_records``, ``to_trl_dataset``, ``write_verl_parquet``
  (``python -m replan.train.data``).
* ``config`` / ``loading`` / ``grpo``: ``TrainConfig``, ``load_config``; ``load_model``; ``build_trainer``,
  ``train`` (``python -m replan.train.grpo``).
* ``verl_reward`` / ``verl_check``: verl's ``compute_score`` / ``compute_score_stage2``; the launch pre-flight.
"""

__all__ = ["config", "data", "grpo", "loading", "remote", "reward_clients", "rewards", "verl_check", "verl_reward"]
