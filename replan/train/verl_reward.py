"""verl 0.9.1 ``custom_reward_function`` adapters for the RePlan rewards (no verl import: plain functions).

verl calls, per sample (``verl/experimental/reward_loop/reward_manager/naive.py``)::

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs) -> dict

and uses ``result["score"]`` as the reward (on the last response token); every other key goes to
``reward_extra_info``, which needs the same numeric keys for every sample, so both functions always return the same
keys with float values and never raise for one bad sample.

* ``compute_score`` (stage 1): ``replan.train.rewards.stage1_rewards``, keys ``score`` + ``rewards.EDITING_KEYS``.
* ``compute_score_stage2`` (stage 2, async): ``replan.train.remote.Stage2Reward`` on one sample, keys ``score`` +
  ``rewards.PLANNING_KEYS``. ``reward_kwargs`` are ``RewardConfig`` fields (``edit_url``, ``judge_url``,
  ``judge_model``, ...); with a verl-hosted judge (``reward.reward_model.enable``) verl adds
  ``reward_router_address`` and the judge URL defaults to ``http://<that address>/v1``. The input image is the raw
  image verl hands back in ``extra_info["raw_prompt"]``, else ``extra_info["image_path"]`` (written by
  ``python -m replan.train.data --stage 2``). verl does not hand the reward ``image_grid_thw``; with
  ``box_frame: processor`` the edit server gets ``smart_resize`` of the raw image with ``planner_min_pixels`` /
  ``planner_max_pixels`` (the qwen_vl_utils bounds the rollout uses by default), which is the same frame. One
  ``Stage2Reward`` per process and configuration: its semaphores bound the edits and judge calls in flight across
  all samples of that reward worker.

Config (``configs/train/verl_stage{1,2}.yaml``)::

    reward.custom_reward_function.path=pkg://replan.train.verl_reward
    reward.custom_reward_function.name=compute_score            # stage 2: compute_score_stage2
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading

logger = logging.getLogger("replan.train.verl_reward")

# keys verl itself may pass to a custom reward function besides our reward_kwargs
_VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")


def _number(value) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return float(value)
    return 0.0


def _as_result(scores: dict, keys) -> dict:
    out = {"score": _number(scores.get("overall"))}
    out.update({k: _number(scores.get(k)) for k in keys})
    return out


# ---------------------------------------------------------------------------------------------------- stage 1
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """Stage-1 format reward of one decoded response (``ground_truth`` is unused, as official)."""
    from replan.train.rewards import EDITING_KEYS, stage1_rewards

    try:
        scores = stage1_rewards([solution_str])[0]
    except Exception:  # noqa: BLE001 - a reward must never stop the trainer
        logger.exception("stage-1 reward failed on one sample; scored 0")
        scores = {}
    return _as_result(scores, EDITING_KEYS)


# ---------------------------------------------------------------------------------------------------- stage 2
_rewards: dict[str, object] = {}
_ready: dict[tuple[str, int], asyncio.Lock] = {}
_guard = threading.Lock()


def reward_config(kwargs: dict):
    """``RewardConfig`` from verl's ``reward_kwargs`` (a verl-hosted judge's router address fills ``judge_url``)."""
    from replan.train.remote import RewardConfig

    data = {k: v for k, v in kwargs.items() if k not in _VERL_KWARGS}
    router = kwargs.get("reward_router_address")
    if router and "judge_url" not in data:
        data["judge_url"] = f"http://{router}/v1"
    return RewardConfig.from_dict(data)


def _stage2(kwargs: dict):
    cfg = reward_config(kwargs)
    key = json.dumps(vars(cfg), sort_keys=True, default=str)
    with _guard:
        reward = _rewards.get(key)
        if reward is None:
            reward = _rewards[key] = cfg.build()
    return key, reward


async def _ensure_ready(key: str, reward) -> None:
    """One readiness wait per configuration and event loop, however many samples arrive at once."""
    if getattr(reward, "_ready", False):
        return
    loop_key = (key, id(asyncio.get_running_loop()))
    with _guard:
        lock = _ready.setdefault(loop_key, asyncio.Lock())
    async with lock:
        if not getattr(reward, "_ready", False):
            await reward.wait_ready()


def raw_image(extra_info):
    """The raw input image: from verl's ``raw_prompt`` messages, else ``extra_info["image_path"]``, else None."""
    if not isinstance(extra_info, dict):
        return None
    from PIL import Image

    for message in extra_info.get("raw_prompt") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            image = part.get("image") if isinstance(part, dict) else None
            if isinstance(image, Image.Image):
                return image
    path = extra_info.get("image_path")
    return path if isinstance(path, str) and path else None


async def compute_score_stage2(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """Stage-2 planning reward of one decoded response: execute the plan, judge the edit (see the module doc)."""
    from replan.train.rewards import PLANNING_KEYS

    extra = extra_info if isinstance(extra_info, dict) else {}
    key, reward = _stage2(kwargs)
    await _ensure_ready(key, reward)  # never ready / wrong URL: raises, which stops the run (every call would fail)
    sample = {"image": raw_image(extra), "instruction": extra.get("instruction", ""),
              "referring_expression": extra.get("referring_expression", ""), "response": solution_str}
    scores = (await reward.score([sample]))[0]
    return _as_result(scores, PLANNING_KEYS)
