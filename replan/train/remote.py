"""Stage-2 reward over the network (replan-spec §5.5): the edit server executes a plan, a VLM judge scores the edit.

    config = RewardConfig.from_yaml("configs/train/stage2.yaml")          # the ``reward:`` section
    reward = config.build()                                               # Stage2Reward(EditClient, JudgeClient)
    results = reward([{"image": pil, "instruction": "...", "referring_expression": "...", "response": text}, ...])
    rewards = [r["overall"] for r in results]                             # every dict has rewards.PLANNING_KEYS

The clients (``replan.train.reward_clients``): the edit server's ``POST /v1/plans/execute`` and ``GET /health``, and
an OpenAI-compatible judge (vLLM) with the eval rubrics (the official training judge uses the same files;
``prompts_dir`` takes the official ones) read with ``score_parse`` (``official``: a numeric score counts as given).
``parse`` (``official`` default) asks the edit server to read each reply as the official reward server does (no
repairs; a box partly or entirely outside the image is clamped after expanding and executed; what it cannot run is a
global edit). ``box_frame`` (``processor`` default, ``original`` as official) makes the edit server read a reply's
boxes exactly as inference does: with ``processor`` each sample's ``planner_size`` (the frame the policy saw: the
TRL trainer takes it from ``image_grid_thw``) or else ``smart_resize`` of the image with
``planner_min_pixels``/``planner_max_pixels`` is sent along. Before the first batch both servers are polled until
ready (the official client scored 0 while the models were loading). A wrong judge key, URL or model (401/403/404) and
a server that never becomes ready raise, since every later call would fail too.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from replan.clients import PerLoop, one_line
from replan.config_io import check_keys, read_yaml
from replan.coords import BOX_FRAMES, processor_frame
from replan.eval.judges import SCORE_PARSE, JudgeConfigError
from replan.images import load_image, to_rgb
from replan.parse import PARSE_MODES
from replan.train.reward_clients import (  # noqa: F401  (re-exported: the reward's public names in one place)
    EditClient,
    EditError,
    JudgeClient,
    RewardServerError,
    load_reward_templates,
    png_base64,
)
from replan.train.rewards import JUDGE_DIMENSIONS, editing_score, planning_score, should_execute

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- the reward
def _as_image(value) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and "bytes" in value:  # a datasets Image feature
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(bytes(value))) as im:
            im.load()
            return to_rgb(im)
    return load_image(value)


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


class Stage2Reward:
    """``await score(samples)`` / ``reward(samples)``: one ``PLANNING_KEYS`` dict per sample, in order.

    A sample is ``{"image", "instruction", "referring_expression", "response"}`` (image: PIL, path, bytes or
    ``{"bytes"}``), optionally ``"planner_size"`` (W, H), the frame the policy saw the image in (default:
    ``processor_frame`` of the image with ``planner_min_pixels``/``planner_max_pixels``); ``box_frame`` says how the
    edit server reads the boxes (see the module docstring). At most ``concurrency`` edits and ``judge_concurrency``
    judge calls run at once, across every ``score`` call in one event loop (verl scores each sample in its own
    call). Plans that fail ``should_execute`` are not sent (planning 0, editing part kept); a sample without image,
    instruction or referring expression scores its editing part only and is logged. ``last_details`` holds, per
    sample of the last batch, the gate reason, any edit or judge errors (text, for logs) and what the edit server
    executed (``executed``: its ``boxes``, ``plan``, ``box_frame`` and ``planner_size``).
    """

    def __init__(self, edit: EditClient, judge: JudgeClient, concurrency: int = 8, *,
                 judge_concurrency: int | None = None, sharp: int = 4, format_weight: float = 0.2,
                 ready_timeout: float | None = 1800.0, ready_interval: float = 2.0, box_frame: str = "processor",
                 planner_min_pixels: int = 4 * 28 * 28, planner_max_pixels: int = 16384 * 28 * 28,
                 parse: str = "official"):
        if int(concurrency) < 1 or (judge_concurrency is not None and int(judge_concurrency) < 1):
            raise ValueError("concurrency and judge_concurrency must be >= 1")
        if box_frame not in BOX_FRAMES:
            raise ValueError(f"box_frame must be one of {', '.join(BOX_FRAMES)}, got {box_frame!r}")
        if parse not in PARSE_MODES:
            raise ValueError(f"parse must be one of {', '.join(PARSE_MODES)}, got {parse!r}")
        self.box_frame, self.planner_pixels = box_frame, (int(planner_min_pixels), int(planner_max_pixels))
        self.parse = parse
        self.edit, self.judge, self.concurrency = edit, judge, int(concurrency)
        self.judge_concurrency = int(judge_concurrency or 3 * self.concurrency)
        self.sharp, self.format_weight = sharp, format_weight
        self.ready_timeout, self.ready_interval, self._ready = ready_timeout, ready_interval, False
        self.last_details: list[dict] = []
        self._limits = PerLoop(lambda: (asyncio.Semaphore(self.concurrency), asyncio.Semaphore(self.judge_concurrency)))

    @classmethod
    def from_config(cls, config: RewardConfig | dict) -> Stage2Reward:
        """Clients and reward from a ``RewardConfig`` (or its dict form)."""
        return (config if isinstance(config, RewardConfig) else RewardConfig.from_dict(config)).build()

    async def wait_ready(self, timeout: float | None = None) -> None:
        timeout = timeout if timeout is not None else (self.ready_timeout or 1800.0)
        await asyncio.gather(self.edit.wait_ready(timeout, self.ready_interval),
                             self.judge.wait_ready(timeout, self.ready_interval))
        self._ready = True

    async def score(self, samples: list[dict]) -> list[dict]:
        if not self._ready and self.ready_timeout is not None:
            await self.wait_ready()
        start = time.perf_counter()
        edit_sem, judge_sem = self._limits.get()  # shared by every score() call running in this event loop
        pairs = await asyncio.gather(*(self._one(i, s, edit_sem, judge_sem) for i, s in enumerate(samples)))
        results, self.last_details = [p[0] for p in pairs], [p[1] for p in pairs]
        logger.info("stage-2 reward: %d samples, %d executed, %d edit and %d judge failures, %.1f s", len(results),
                    sum(r["executed"] for r in results), sum(r["edit_failed"] for r in results),
                    sum(r["judge_failed"] for r in results), time.perf_counter() - start)
        return results

    def __call__(self, samples: list[dict]) -> list[dict]:
        """Synchronous ``score``, for trainers; works with or without an event loop running in this thread (the batch
        runs in an event loop of its own, whose connections are closed when it ends)."""
        async def run() -> list[dict]:
            try:
                return await self.score(samples)
            finally:
                await self.aclose()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run())
        with ThreadPoolExecutor(1, thread_name_prefix="replan-reward") as pool:
            return pool.submit(asyncio.run, run()).result()

    async def aclose(self) -> None:
        """Close the connections this event loop opened (the clients open new ones if used again)."""
        await asyncio.gather(self.edit.aclose(), self.judge.aclose())

    def close(self) -> None:
        self.edit.close()
        self.judge.close()

    def planner_size(self, image_size, given=None) -> tuple[int, int] | None:
        """The frame the edit server reads the reply's boxes in: None for ``box_frame="original"``, else ``given``
        (the trainer's, from ``image_grid_thw``) or ``smart_resize`` of the image."""
        if self.box_frame == "original":
            return None
        if given is not None:
            w, h = (int(v) for v in given)
            if w > 0 and h > 0:
                return (w, h)
        return processor_frame(image_size, *self.planner_pixels)

    async def _one(self, i, sample, edit_sem, judge_sem) -> tuple[dict, dict]:
        details = {"index": i, "reason": "", "edit_error": None, "judge_errors": {}, "executed": None}
        editing = editing_score(None)

        def result(scores=(None, None, None), **flags) -> tuple[dict, dict]:
            return planning_score(*scores, editing, self.sharp, format_weight=self.format_weight, **flags), details

        try:
            return await self._score_one(i, sample if isinstance(sample, dict) else {}, edit_sem, judge_sem,
                                         details, result, editing)
        except (JudgeConfigError, RewardServerError):
            raise  # every later call would fail the same way: stop the run
        except Exception as e:  # noqa: BLE001 - one odd sample must not end a training run
            logger.exception("stage-2 reward, sample %d: unexpected error; planning score 0", i)
            details["reason"] = f"unexpected error: {type(e).__name__}: {one_line(str(e), 200)}"
            return result(executed=False, judge_failed=True)

    async def _score_one(self, i, sample, edit_sem, judge_sem, details, result, editing) -> tuple[dict, dict]:
        response = sample.get("response")
        try:
            image = _as_image(sample.get("image"))
        except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            image, details["reason"] = None, f"image unreadable: {one_line(str(e), 200)}"
        editing.update(editing_score(response))
        instruction, referring = _text(sample.get("instruction")), _text(sample.get("referring_expression"))
        missing = [name for name, v in (("image", image), ("instruction", instruction),
                                        ("referring_expression", referring)) if not v]
        if missing:
            details["reason"] = details["reason"] or f"sample lacks {', '.join(missing)}"
            logger.warning("stage-2 reward, sample %d: %s; planning score 0", i, details["reason"])
            return result(executed=False, missing_input=True)
        ok, details["reason"] = should_execute(response)
        if not ok:
            return result(executed=False)
        text = response if isinstance(response, str) else bytes(response).decode("utf-8", errors="replace")
        planner_size = self.planner_size(image.size, sample.get("planner_size"))
        try:
            async with edit_sem:
                edited, executed = await self.edit.execute_reply(image, text.strip(), instruction, self.box_frame,
                                                                 planner_size, self.parse)
            details["executed"] = {k: executed.get(k) for k in ("boxes", "plan", "box_frame", "planner_size")}
        except EditError as e:
            details["edit_error"] = str(e)
            logger.warning("stage-2 reward, sample %d: %s", i, e)
            return result(executed=True, edit_failed=True)
        judged = await self.judge.score_all(image, edited, instruction, referring, judge_sem)
        details["judge_errors"] = {d: r.error for d, r in judged.items() if r.score is None}
        if details["judge_errors"]:
            logger.warning("stage-2 reward, sample %d: judge failed on %s", i, details["judge_errors"])
        scores = tuple(judged[d].score for d in JUDGE_DIMENSIONS)
        return result(scores, executed=True, judge_failed=bool(details["judge_errors"]))


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class RewardConfig:
    """The stage-2 reward's settings, e.g. a ``reward:`` section of a training YAML. ``judge_model`` is required;
    the judge API key is read from the environment variable named ``judge_api_key_env`` (absent: ``EMPTY``)."""

    edit_url: str = "http://localhost:8001"
    judge_url: str = "http://localhost:8000/v1"
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    judge_concurrency: int = 24
    edit_timeout: float = 600.0
    judge_timeout: float = 300.0
    edit_retries: int = 3
    judge_retries: int = 3
    backoff: float = 5.0
    max_backoff: float = 60.0
    ready_timeout: float = 1800.0
    ready_interval: float = 2.0
    judge_max_tokens: int = 1024
    judge_temperature: float = 0.0
    judge_max_pixels: int | None = None
    prompts_dir: str | None = None  # judge rubrics (None: replan's wording; the official files work as they are)
    score_parse: str = "official"  # official: a numeric judge score counts as given | strict: off-scale fails
    box_frame: str = "processor"  # processor: boxes read in the frame the policy saw | original: as official
    parse: str = "official"  # how the edit server reads a reply: official (as the official server) | lenient | strict
    planner_min_pixels: int = 4 * 28 * 28  # smart_resize bounds for samples without a planner_size (qwen_vl_utils)
    planner_max_pixels: int = 16384 * 28 * 28
    sharp: int = 4
    format_weight: float = 0.2

    @classmethod
    def from_dict(cls, data: dict | None) -> RewardConfig:
        cfg = cls(**check_keys(dict(data or {}), cls, "reward config", "reward setting"))
        if cfg.box_frame not in BOX_FRAMES:
            raise ValueError(f"reward box_frame must be one of {', '.join(BOX_FRAMES)}, got {cfg.box_frame!r}")
        if cfg.parse not in PARSE_MODES:
            raise ValueError(f"reward parse must be one of {', '.join(PARSE_MODES)}, got {cfg.parse!r}")
        if cfg.score_parse not in SCORE_PARSE:
            raise ValueError(f"reward score_parse must be one of {', '.join(SCORE_PARSE)}, got {cfg.score_parse!r}")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = "reward") -> RewardConfig:
        data = read_yaml(path)
        if section:
            if not isinstance(data, dict) or not isinstance(data.get(section), dict):
                raise ValueError(f"{path} has no {section!r} section")
            data = data[section]
        return cls.from_dict(data)

    def build(self) -> Stage2Reward:
        edit = EditClient(self.edit_url, self.edit_timeout, self.edit_retries, self.backoff, self.max_backoff,
                          max_workers=max(self.concurrency, 1))
        judge = JudgeClient(self.judge_url, self.judge_model, os.environ.get(self.judge_api_key_env) or "EMPTY",
                            timeout=self.judge_timeout, max_retries=self.judge_retries, backoff=self.backoff,
                            max_backoff=self.max_backoff, max_tokens=self.judge_max_tokens,
                            temperature=self.judge_temperature, max_pixels=self.judge_max_pixels,
                            prompts_dir=self.prompts_dir, max_workers=max(self.judge_concurrency, 1),
                            score_parse=self.score_parse)
        logger.info("stage-2 judge rubrics: %s; score_parse %s; box_frame %s",
                    ", ".join(f"{d} {t['name']} ({t['sha256'][:12]})" for d, t in judge.rubrics.items()),
                    self.score_parse, self.box_frame)
        return Stage2Reward(edit, judge, self.concurrency, judge_concurrency=self.judge_concurrency, sharp=self.sharp,
                            format_weight=self.format_weight, ready_timeout=self.ready_timeout,
                            ready_interval=self.ready_interval, box_frame=self.box_frame, parse=self.parse,
                            planner_min_pixels=self.planner_min_pixels, planner_max_pixels=self.planner_max_pixels)
