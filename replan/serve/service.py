"""One model replica: configuration, loading in the background, the single-worker edit queue, and errors."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from replan.parse import PARSE_MODES

logger = logging.getLogger("replan.serve")



PLANNERS = ("local", "openai", "none")
MB = 1024 * 1024
FIELD_SLACK = MB  # bytes allowed for the text fields beside the image
LOADING_RETRY_AFTER = 5  # seconds
MAX_STEPS = 1000
MAX_PROMPT = 32000
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass
class ServeConfig:
    backbone: str = "flux_kontext"
    model: str | None = None
    planner: str = "local"  # local | openai | none
    vlm_ckpt_path: str | None = None
    lora_path: str | None = None  # editor LoRA (diffusers format), as the official --lora_path
    vlm_lora_path: str | None = None  # planner LoRA (PEFT adapter)
    parse: str = "lenient"  # how planner replies are read: lenient | strict | official
    base_url: str | None = None  # openai planner endpoint
    api_key: str | None = None
    prompt_template: str | None = None  # planner prompt template file (None: replan's wording of the official one)
    box_frame: str = "processor"  # how planner boxes are read (its planner, and /v1/plans/execute by default)
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None
    stage_offload: str = "none"
    offload: str = "none"
    attention: str = "dense"
    compile: bool = False  # compile the editor's transformer blocks once at load
    attention_budget: str | None = None  # e.g. "8GB"; None: half the device's free memory; larger plans get 413
    accel: str | dict | None = None  # default acceleration for every edit (--accel …); a request may override it
    queue: int = 8  # edits that may wait behind the running one
    max_image_mb: float = 20.0
    ulysses: int = 1  # GPUs per replica computing each edit together (Ulysses context parallelism)
    ulysses_anything: bool = False  # diffusers' unequal Ulysses chunks (image sizes / head counts that do not divide)

    def __post_init__(self):
        if self.planner not in PLANNERS:
            raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {self.planner!r}")
        if not isinstance(self.ulysses, int) or self.ulysses < 1:
            raise ValueError(f"ulysses must be a positive integer, got {self.ulysses!r}")
        from replan.backbones.parallel import check_accel_parallel

        check_accel_parallel(self.accel, self.ulysses)
        if self.ulysses > 1 and (self.offload != "none" or self.stage_offload != "none"):
            raise ValueError("--ulysses keeps the editor on each rank's GPU: drop --offload and --stage_offload")
        if self.parse not in PARSE_MODES:
            raise ValueError(f"parse must be one of {', '.join(PARSE_MODES)}, got {self.parse!r}")
        from replan.coords import BOX_FRAMES

        if self.box_frame not in BOX_FRAMES:
            raise ValueError(f"box_frame must be one of {', '.join(BOX_FRAMES)}, got {self.box_frame!r}")
        if self.prompt_template is not None:
            from replan.planner import load_template

            load_template(self.prompt_template)  # a missing file is an error now, before any model loads
        if self.lora_path:
            from replan.backbones.lora import lora_source

            lora_source(self.lora_path)  # likewise a missing editor LoRA
        if self.queue < 0:
            raise ValueError(f"queue must be >= 0, got {self.queue}")
        if not self.max_image_mb > 0:
            raise ValueError(f"max_image_mb must be > 0, got {self.max_image_mb}")
        from replan.attention.budget import parse_bytes

        parse_bytes(self.attention_budget)
        if self.accel is not None:
            from replan.accel import AccelConfig
            from replan.backbones.registry import resolve

            spec = resolve(self.backbone)
            config = AccelConfig.from_options(self.accel).resolved(spec.name, spec.family, spec.steps)
            config.check_editor_options(compile=self.compile, attention=self.attention)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MB)


def load_pipeline(config: ServeConfig):
    """Load the ``RePlanPipeline`` a config describes (the default loader). With ``ulysses > 1`` the calling
    process becomes rank 0 of the replica and starts the other ranks (``replan.serve.followers``)."""
    parallel = None
    if config.ulysses > 1:
        from diffusers import ContextParallelConfig

        from replan.distributed import is_initialized

        parallel = ContextParallelConfig(ulysses_degree=config.ulysses, ulysses_anything=config.ulysses_anything)
        if not is_initialized():  # the leader: start the followers, then load alongside them
            from replan.serve.followers import load_leader

            return load_leader(config, lambda: _load(config, parallel))
    return _load(config, parallel)


def _load(config: ServeConfig, parallel):
    import torch

    from replan.pipeline import RePlanPipeline
    from replan.planner import load_template

    planner_kwargs = {"parse": config.parse, "box_frame": config.box_frame}
    if config.planner == "openai":
        planner_kwargs.update({k: v for k, v in (("base_url", config.base_url), ("api_key", config.api_key)) if v})
    if config.prompt_template:
        planner_kwargs.update(template=load_template(config.prompt_template), template_name=config.prompt_template)
    pipe = RePlanPipeline.from_pretrained(
        backbone=config.backbone, planner=None if config.planner == "none" else config.planner, model=config.model,
        vlm_ckpt_path=config.vlm_ckpt_path, lora_path=config.lora_path, vlm_lora_path=config.vlm_lora_path,
        device=config.device or (None if parallel else "cuda" if torch.cuda.is_available() else "cpu"),
        torch_dtype=config.dtype, stage_offload=config.stage_offload, offload=config.offload,
        planner_kwargs=planner_kwargs, compile=config.compile, attention_budget=config.attention_budget,
        parallel=parallel,
    )
    progress = getattr(pipe.editor.pipe, "set_progress_bar_config", None)
    if progress is not None:  # one line per edit (with timings) in the server log, not a progress bar
        progress(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------- errors
class ServeError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and ``Retry-After`` when given)."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ServeError:
    return ServeError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------- the replica
class EditService:
    """Owns one pipeline: background loading, a one-thread edit worker, a bounded queue, health."""

    def __init__(self, config: ServeConfig, loader: Callable[[], object] | None = None):
        self.config = config
        self._loader = loader or (lambda: load_pipeline(config))
        self.status, self.error, self.pipe = "idle", None, None
        self.load_seconds: float | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="replan-edit")
        self._counts = threading.Lock()
        self._load_lock = threading.Lock()
        self.waiting, self.running = 0, False
        self._recent = deque(maxlen=16)  # seconds per edit, for Retry-After

    # ------------------------------------------------------------------------------------------ loading
    def start(self) -> None:
        """Load in a background thread (no-op once loading has begun)."""
        if self.status == "idle":
            self.status = "loading"
            threading.Thread(target=self.load, name="replan-load", daemon=True).start()

    def load(self, raise_errors: bool = False) -> None:
        """Load now, in the calling thread (Ray replicas do this so they take traffic only once ready)."""
        with self._load_lock:
            if self.status in ("ready", "failed"):
                return
            self.status = "loading"
            start = time.perf_counter()
            logger.info("loading backbone=%s planner=%s", self.config.backbone, self.config.planner)
            try:
                pipe = self._loader()
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                self.status = "failed"
                logger.exception("loading failed after %.1fs", time.perf_counter() - start)
                if raise_errors:
                    raise
                return
            self.pipe, self.load_seconds = pipe, time.perf_counter() - start
            self.status = "ready"
            logger.info("ready: %s loaded in %.1fs", self.backbone, self.load_seconds)

    @property
    def backbone(self) -> str:
        spec = getattr(getattr(self.pipe, "editor", None), "spec", None)
        return spec.name if spec is not None else self.config.backbone

    @property
    def has_planner(self) -> bool:
        return getattr(self.pipe, "planner", None) is not None

    def health(self) -> dict:
        out = {"status": "loading" if self.status == "idle" else self.status, "backbone": self.backbone,
               "queue": self.waiting, "busy": self.running, "max_queue": self.config.queue,
               "planner": self.config.planner if self.has_planner or self.status != "ready" else "none"}
        if self.load_seconds is not None:
            out["load_seconds"] = round(self.load_seconds, 3)
        if self.error:
            out["error"] = self.error
        return out

    def check_ready(self) -> None:
        if self.status == "failed":
            raise ServeError(500, f"the model failed to load: {self.error}", code="model_load_failed")
        if self.status != "ready":
            raise ServeError(503, "the model is still loading; retry shortly", code="model_loading",
                             retry_after=LOADING_RETRY_AFTER)

    # ------------------------------------------------------------------------------------------ edits
    def retry_after(self) -> int:
        per_edit = sum(self._recent) / len(self._recent) if self._recent else 5.0
        return max(1, math.ceil(per_edit * (self.waiting + self.running)))

    async def submit(self, fn: Callable, *args) -> tuple[object, float, float]:
        """Run ``fn(*args)`` on the edit worker; returns (result, seconds queued, seconds run).

        429 when ``queue`` edits already wait behind a running one. A request cancelled while queued leaves the queue.
        """
        self.check_ready()
        with self._counts:
            if self.waiting + self.running >= self.config.queue + 1:
                raise ServeError(429, f"the edit queue is full ({self.config.queue} waiting behind the running edit); "
                                 "retry later", code="queue_full", retry_after=self.retry_after())
            self.waiting += 1
        submitted = time.perf_counter()

        def job():
            with self._counts:
                self.waiting -= 1
                self.running = True
            started = time.perf_counter()
            try:
                return fn(*args), started - submitted, time.perf_counter() - started
            finally:
                self._recent.append(time.perf_counter() - started)
                with self._counts:
                    self.running = False

        future = self._executor.submit(job)

        def left_queue(f):
            if f.cancelled():
                with self._counts:
                    self.waiting -= 1

        future.add_done_callback(left_queue)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        parallel = bool(getattr(self.pipe, "drives_followers", False))
        self._executor.shutdown(wait=parallel, cancel_futures=True)  # a replica of several ranks: finish the edit
        if parallel:
            self.pipe.close()  # then release the follower ranks


