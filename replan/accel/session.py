"""One accelerated edit on a stock pipeline: what an editor wraps around its pipeline call.

    with accelerate(config, pipe, steps=28, grid=(64, 64), plan_mask=mask, runtime=get_runtime) as session:
        pipe(..., callback_on_step_end=chain(session.callback, ...))
    session.summary   # pattern, passes, tokens, K/V cache bytes …

``none`` changes nothing (``session.callback`` is None). ``cache-dit`` enables cache-dit's DBCache on the pipeline
for the call (full passes only) and disables it afterwards. The region modes run a ``RegionController`` through the
pipeline's ``AccelRuntime`` (``runtime``: a zero-argument function returning the pipeline's runtime, created once
on the pipeline's transformer — so two pipelines never share one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from replan.accel.config import AccelConfig
from replan.accel.controller import RegionController

logger = logging.getLogger(__name__)

# cache-dit defaults for a 28-step edit: DBCache F8B0, residual threshold 0.08 (cache-dit's own defaults), and
# warm-up steps that cover RegionE's stabilisation phase.
CACHE_DIT_DEFAULTS = {"Fn_compute_blocks": 8, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                      "max_warmup_steps": 6}


@dataclass
class AccelSession:
    callback: Callable | None = None  # a callback_on_step_end to chain, or None
    summary: dict = field(default_factory=dict)


@contextmanager
def accelerate(config: AccelConfig, pipe, *, steps: int, grid: tuple[int, int],
               plan_mask: torch.Tensor | None = None, runtime: Callable | None = None, combine: Callable | None = None):
    """Run the pipeline call inside the ``with`` block accelerated as ``config`` (a resolved ``AccelConfig``)."""
    session = AccelSession(summary={"mode": config.mode})
    if config.mode == "none":
        yield session
        return
    if config.mode == "cache-dit":
        with cache_dit_enabled(pipe, config, steps):
            yield session
        return
    controller = RegionController(config, steps, grid, plan_mask, combine=combine)
    active = runtime()
    with active.activate(controller, pipe.scheduler):
        session.callback = active.callback
        try:
            yield session
        finally:
            session.summary.update(controller.summary())
            session.summary["kv_cache_bytes"] = active.store.peak


@contextmanager
def cache_dit_enabled(pipe, config: AccelConfig, steps: int):
    """cache-dit's DBCache on ``pipe`` for the duration of the block (its public ``enable_cache`` /
    ``disable_cache``). Never combined with edited-only passes: its residual buffers are shaped by token count."""
    try:
        import cache_dit
    except ImportError:
        raise ValueError("accel cache-dit needs the optional package: pip install 'replan[accel]' "
                         "(or pip install cache-dit)") from None
    params = {**CACHE_DIT_DEFAULTS, "num_inference_steps": steps, **dict(config.cache_dit or {})}
    try:
        cache_config = cache_dit.DBCacheConfig(**params)
    except TypeError as e:
        raise ValueError(f"accel cache_dit parameters {sorted(params)} are not DBCacheConfig's: {e}") from None
    cache_dit.enable_cache(pipe, cache_config=cache_config)
    try:
        yield
    finally:
        cache_dit.disable_cache(pipe)
