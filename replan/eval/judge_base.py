"""The judge call every backend shares (``replan.eval.judges`` has the backends): the attempt loop, the result, and
the reading of a reply with ``score_parse``.

A call makes at most ``1 + max_retries`` requests, counted by a ``RetryBudget`` that a backend's own client charges
(``current_budget()``) when it retries inside one request; the loop asks again (``backoff`` doubling) after a
``Transient`` failure or a reply without a numeric score, returns a failed ``JudgeResult`` after a ``Refused`` one or
when the budget is spent, and lets ``JudgeConfigError`` through. ``judge()`` blocks; ``await ajudge()`` is the same
call for asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass

from replan.clients import Refused, RetryBudget, Transient
from replan.eval.judge_prompts import (
    SCALES,
    SCORE_PARSE,
    JudgeOffScale,
    JudgeParseError,
    Part,
    is_off_scale,
    parse_judgement,
)
from replan.eval.scoring import DIMENSIONS

logger = logging.getLogger("replan.eval.judges")

DEFAULT_MAX_TOKENS = 8192  # Gemini 2.5 Pro spends output tokens on thinking; 4096 (official) truncates replies


class JudgeConfigError(ValueError):
    """The judge cannot work at all (no key, wrong URL or model, missing package): stop and tell the user."""


@dataclass
class JudgeResult:
    score: int | float | None
    reasoning: str = ""
    raw: str = ""
    error: str | None = None
    model: str = ""
    attempts: int = 0
    seconds: float = 0.0
    off_scale: bool = False  # the judge gave a number off the dimension's scale (used as given, or failed if strict)

    def to_dict(self) -> dict:
        return asdict(self)


_BUDGET: ContextVar[RetryBudget] = ContextVar("replan_judge_budget")


def current_budget() -> RetryBudget:
    """The attempt budget of the judge call running in this thread or task (a fresh one-request budget outside)."""
    return _BUDGET.get(None) or RetryBudget(0)


# ---------------------------------------------------------------------------------------------------- judges
class Judge:
    """``judge(dimension, parts) -> JudgeResult``; subclasses implement ``_generate(dimension, parts) -> str``."""

    name = "judge"

    def __init__(self, model: str, *, max_retries: int = 3, backoff: float = 2.0, max_backoff: float = 60.0,
                 timeout: float = 300.0, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float | None = None,
                 score_parse: str = "official"):
        if score_parse not in SCORE_PARSE:
            raise JudgeConfigError(f"score_parse must be one of {', '.join(SCORE_PARSE)}, got {score_parse!r}")
        if not isinstance(model, str) or not model.strip():
            raise JudgeConfigError("no judge model: pass --judge_model, e.g. gemini-2.5-pro")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise JudgeConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not backoff >= 0 or not max_backoff >= 0 or not timeout > 0:
            raise JudgeConfigError("backoff and max_backoff must be >= 0 and timeout > 0")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise JudgeConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.model, self.max_retries, self.backoff, self.max_backoff = model.strip(), max_retries, backoff, max_backoff
        self.timeout, self.max_tokens, self.temperature = float(timeout), max_tokens, temperature
        self.score_parse = score_parse

    def read(self, dimension: str, raw: str) -> JudgeResult:
        """A reply read with this judge's ``score_parse`` (also used on cached replies); ``JudgeParseError`` when it
        holds no numeric score. A strict off-scale reply is a failed result, not an error."""
        try:
            score, reasoning = parse_judgement(raw, dimension, self.score_parse)
        except JudgeOffScale as e:
            return JudgeResult(None, e.reasoning, raw, f"off-scale: {e}", self.model, off_scale=True)
        return JudgeResult(score, reasoning, raw, None, self.model, off_scale=is_off_scale(score, dimension))

    def _generate(self, dimension: str, parts: list[Part]) -> str:
        """One request: the reply text. ``Transient`` / ``Refused`` on failure, ``JudgeConfigError`` when no later call
        can work either. A client that retries inside charges each request to ``current_budget()``; one that does not
        charge is counted as one request."""
        raise NotImplementedError

    async def _agenerate(self, dimension: str, parts: list[Part]) -> str:
        """``_generate`` for asyncio; by default the blocking call in a worker thread."""
        return await asyncio.to_thread(self._generate, dimension, parts)

    def judge(self, dimension: str, parts: list[Part]) -> JudgeResult:
        """One judgement; a failed call is a result with ``score=None`` and ``error``, never an exception (but
        ``JudgeConfigError``)."""
        budget, start, raw = self._begin(dimension), time.perf_counter(), ""
        while True:
            token, before = _BUDGET.set(budget), budget.used
            try:
                raw = self._generate(dimension, parts)
                outcome = self.read(dimension, raw)
            except (Refused, Transient, JudgeParseError) as e:
                outcome = e
            finally:
                _BUDGET.reset(token)
                if budget.used == before:
                    budget.spend(1)
            result = self._settle(dimension, budget, start, raw, outcome)
            if isinstance(result, JudgeResult):
                return result
            time.sleep(result)

    async def ajudge(self, dimension: str, parts: list[Part]) -> JudgeResult:
        """``judge`` for asyncio."""
        budget, start, raw = self._begin(dimension), time.perf_counter(), ""
        while True:
            token, before = _BUDGET.set(budget), budget.used
            try:
                raw = await self._agenerate(dimension, parts)
                outcome = self.read(dimension, raw)
            except (Refused, Transient, JudgeParseError) as e:
                outcome = e
            finally:
                _BUDGET.reset(token)
                if budget.used == before:
                    budget.spend(1)
            result = self._settle(dimension, budget, start, raw, outcome)
            if isinstance(result, JudgeResult):
                return result
            await asyncio.sleep(result)

    def _begin(self, dimension: str) -> RetryBudget:
        if dimension not in SCALES:
            raise ValueError(f"unknown dimension {dimension!r}; expected one of {', '.join(DIMENSIONS)}")
        return RetryBudget(self.max_retries, self.backoff, self.max_backoff)

    def _settle(self, dimension: str, budget: RetryBudget, start: float, raw: str,
                outcome: JudgeResult | Exception) -> JudgeResult | float:
        """After one attempt: the final result, or the seconds to wait before asking again."""
        seconds = time.perf_counter() - start
        if isinstance(outcome, JudgeResult):
            outcome.attempts, outcome.seconds = budget.used, seconds
            return outcome
        if isinstance(outcome, Refused):
            return JudgeResult(None, "", raw, f"refused: {outcome}", self.model, budget.used, seconds)
        if budget.left <= 0:
            error = f"failed after {budget.used} attempt(s): {outcome}"
            return JudgeResult(None, "", raw, error, self.model, budget.used, seconds)
        delay = budget.delay(getattr(outcome, "retry_after", None))
        logger.warning("%s judge (%s, %s): %s; asking again (%d of %d requests left) in %.3g s", self.name,
                       self.model, dimension, outcome, budget.left, budget.total, delay)
        return delay


