"""The per-edit state machine of region acceleration, driven from outside the stock denoising loop.

A stock diffusers pipeline calls the transformer one or more times per step (true CFG: the conditional pass, then
the negative one), combines the outputs, makes one Euler step with its scheduler and then calls
``callback_on_step_end``. ``RegionController`` plugs into those two places and nowhere else:

* ``forward(noise, reference, run)`` replaces one transformer call. ``noise``/``reference`` are the packed noisy
  and reference latents the pipeline feeds, ``run(ids, kv)`` executes the real transformer on the noisy tokens
  ``ids`` (None: the whole input) with K/V mode ``kv`` (``"normal"``, ``"store"``: fill the region-instruction K/V
  cache, ``"cached"``: edited-only pass against it) and returns its output. The result is the velocity of every
  noisy token: real on full passes; on region steps the edited rows come from the edited-only pass or, on a
  skipped step, from the velocity decay cache. On the step after a partition/refresh pass the unedited rows carry
  ``jump_scale · v`` so that the scheduler's own Euler steps make RegionE's one-step jump; on later region steps
  they carry the full pass's rows again and ``end_step`` puts the tokens back where the jump left them (frozen).
  Outputs are kept per call index in the step (the CFG branch), so the pipeline's own CFG combination turns them
  into the combined velocity: every supported combination is linear or per-token norm-rescaled, and both commute
  with scaling a token's rows in every branch.
* ``end_step(i, latents)`` is the step callback: after the partition step it computes the edited set from the
  step's velocity (the transformer's output, or the true-CFG combination of the step's outputs); it holds the
  unedited tokens frozen between jumps, or with ``pin_background`` writes the reference image's noising trajectory
  ``(1 - σ) · z_ref + σ · ε`` into them.

Everything here is plain tensors; nothing knows a backbone. Batch size 1 (one image per call), as RegionE.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch

from replan.accel.config import AccelConfig
from replan.accel.gamma import GammaTable, load_gamma
from replan.accel.partition import adaptive_partition, one_step_estimate, token_ids
from replan.accel.phases import FULL, PARTITION, REFRESH, REGION, SKIP, SMOOTH, Phases, StepPlan

logger = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor | None, str], torch.Tensor]
Combine = Callable[[list], torch.Tensor]


def linear_cfg(scale: float) -> Combine:
    """True CFG as FLUX.1 Kontext and FLUX.2 klein combine their two passes: ``neg + s · (cond - neg)``."""
    def combine(outs):
        cond, neg = outs
        return neg + scale * (cond - neg)
    return combine


def norm_rescaled_cfg(scale: float) -> Combine:
    """True CFG as the Qwen-Image edit pipelines combine it: linear, then rescaled per token to the conditional
    velocity's norm."""
    def combine(outs):
        cond, neg = outs
        comb = neg + scale * (cond - neg)
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    return combine


class RegionController:
    """One accelerated edit.

    Args:
        config: a resolved ``AccelConfig`` with a region mode.
        steps: number of denoising steps.
        grid: ``(h, w)`` patch grid of the noisy latent (``h · w`` tokens).
        plan_mask: ``(L,)`` bool tokens of the plan's regions (plan modes); None otherwise.
        gamma: the velocity decay table (needed when ``config.cache_threshold > 0``); default from ``config.gamma``.
        combine: how the pipeline combines the outputs of one step's transformer calls (true CFG), so that the
            partition sees the exact velocity of the step, as RegionE does. Without it a multi-call step's velocity
            is recovered from the step, ``(x_{i+1} - x_i) / (σ_{i+1} - σ_i)`` (exact in float32, rounded in bf16).
    """

    def __init__(self, config: AccelConfig, steps: int, grid: tuple[int, int], plan_mask: torch.Tensor | None = None,
                 gamma: GammaTable | None = None, combine: Combine | None = None):
        if not config.regional:
            raise ValueError(f"RegionController needs a region mode, got accel {config.mode!r}")
        config.check(steps)
        self.config = config
        self.phases = Phases.from_config(config, steps)
        self.grid = (int(grid[0]), int(grid[1]))
        self.tokens = self.grid[0] * self.grid[1]
        if config.uses_plan:
            if plan_mask is None:
                raise ValueError(f"accel {config.mode} needs the plan's token mask")
            plan_mask = plan_mask.reshape(-1).bool()
            if plan_mask.numel() != self.tokens:
                raise ValueError(f"plan mask has {plan_mask.numel()} tokens, the {grid[0]}x{grid[1]} grid "
                                 f"{self.tokens}")
        self.plan_mask = plan_mask
        self.combine = combine
        self.gamma = gamma if gamma is not None or config.cache_threshold == 0 else load_gamma(config.gamma)
        self.plan: StepPlan | None = None
        self.sigmas: list[float] | None = None
        self.step = 0
        self.call = 0  # transformer calls made in the current step
        self.branch = 0  # index of the call in flight within its step (the CFG branch)
        self.edited: torch.Tensor | None = None  # (L,) bool once known
        self.edited_ids = self.unedited_ids = None
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}  # ids copied to a device, per edited set
        self.x0 = self.noise = self.reference = self.x_before = None
        self.frozen: torch.Tensor | None = None  # the unedited tokens since their last jump
        self.full_out: dict[int, torch.Tensor] = {}  # call index → noisy-token output of the last full store pass
        self.cache: dict[int, torch.Tensor] = {}  # call index → last computed velocity rows (velocity decay cache)
        self.stats: Counter = Counter()  # transformer passes by kind; image-stream query tokens they processed
        if config.mode == "plan":
            self._set_edited(plan_mask)

    # ------------------------------------------------------------------------------------------------ setup
    def start(self, sigmas) -> StepPlan:
        """Fix the step plan from the scheduler's ``N + 1`` sigmas (called on the first transformer call)."""
        self.sigmas = [float(s) for s in sigmas]
        gamma = None
        if self.config.cache_threshold > 0:
            gamma = self.gamma.for_schedule(self.sigmas)
        self.plan = StepPlan.build(self.phases, self.sigmas, gamma, self.config.cache_threshold)
        logger.info("accel %s: steps %s (F full, P partition, R refresh, C edited-only, s skipped)",
                    self.config.mode, self.plan.pattern)
        return self.plan

    def _set_edited(self, mask: torch.Tensor) -> None:
        self.edited = mask.reshape(-1).bool().cpu()
        self.edited_ids = token_ids(self.edited)
        self.unedited_ids = token_ids(~self.edited)
        self._on_device = {}

    def ids_on(self, which: str, device) -> torch.Tensor:
        """``edited_ids`` / ``unedited_ids`` on ``device``, copied once per edited set: the same tensor on every pass,
        so the runtime's restricted region mask is built once per set, and no index copy runs per step."""
        key = (which, str(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, which).to(device)
        return self._on_device[key]

    @property
    def all_edited(self) -> bool:
        return self.edited is not None and bool(self.edited.all())

    # ------------------------------------------------------------------------------------------------ per call
    def kind(self, i: int | None = None) -> str:
        """The step's kind from the plan (``skip`` included); ``start`` must have run."""
        return self.plan.kinds[self.step if i is None else i]

    def forward(self, noise: torch.Tensor, reference: torch.Tensor | None, run: Runner) -> torch.Tensor:
        """One transformer call of the current step (see the module docstring). Returns either ``run``'s own
        output (full passes) or the ``(1, L, C)`` velocity of the noisy tokens."""
        if self.plan is None:
            raise RuntimeError("RegionController.start(sigmas) must run before the first transformer call")
        if noise.shape[0] != 1:
            raise ValueError(f"region acceleration edits one image per call (batch 1), got batch {noise.shape[0]}")
        if noise.shape[1] != self.tokens:
            raise ValueError(f"the pipeline fed {noise.shape[1]} noisy tokens; the {self.grid[0]}x{self.grid[1]} "
                             f"grid has {self.tokens}")
        branch = self.branch = self.call
        self.call += 1
        if branch == 0:
            self.x_before = noise
            if self.step == 0:
                self.x0 = noise
            if self.reference is None and reference is not None:
                self.reference = reference.clone()
        kind = self.kind()
        if kind in (FULL, SMOOTH, PARTITION, REFRESH):
            store = kind in (PARTITION, REFRESH) and not self.all_edited
            out = run(None, "store" if store else "normal")
            self._count("full", self.tokens + (0 if reference is None else reference.shape[1]))
            if kind in (PARTITION, REFRESH):
                self.full_out[branch] = out[:, : self.tokens]
                self.cache[branch] = self.full_out[branch]
            elif self.all_edited:
                self.cache[branch] = out[:, : self.tokens]
            return out
        return self._region_velocity(branch, kind, noise, run)

    def _region_velocity(self, branch: int, kind: str, noise: torch.Tensor, run: Runner) -> torch.Tensor:
        ids = self.ids_on("edited_ids", noise.device)
        if kind == REGION and len(ids):
            if self.all_edited:  # nothing to cache against: a full pass is the exact thing
                out = run(None, "normal")
                self._count("full", out.shape[1])
                self.cache[branch] = out[:, : self.tokens]
                return out
            rows = run(ids, "cached")
            self._count("edited", len(ids))
            self.cache[branch] = rows
        elif kind == SKIP and len(ids):
            self._count("skipped", 0)
            cached = self.cache[branch]
            if cached.shape[1] == self.tokens and len(ids) < self.tokens:
                cached = cached[:, ids]
            rows = cached * self.plan.ratios[self.step]
        else:
            rows = None  # no edited token: nothing to run
            self._count("empty", 0)
        velocity = noise.new_zeros(noise.shape)
        if rows is not None:
            if rows.shape[1] == self.tokens:
                velocity = rows.to(noise.dtype)
            else:
                velocity[:, ids] = rows.to(noise.dtype)
        if len(self.unedited_ids):
            # the jump on the step after a full pass; otherwise the full pass's rows, which end_step undoes (a zero
            # velocity would be exact but turns Qwen's per-token norm-rescaled CFG into 0/0)
            scale = self.plan.jump_scale[self.step]
            if not scale or self.config.pin_background:
                scale = 1.0
            u = self.ids_on("unedited_ids", noise.device)
            velocity[:, u] = (self.full_out[branch][:, u] * scale).to(noise.dtype)
        return velocity

    # ------------------------------------------------------------------------------------------------ per step
    def end_step(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The step callback: partition after the partition step, pinning, then advance to step ``i + 1``."""
        if i != self.step:
            raise RuntimeError(f"step callback for step {i} while the controller is at step {self.step}")
        kind = self.plan.kinds[i]
        if kind == PARTITION and self.config.uses_partition:
            self._partition(i, latents)
        if self.edited is not None and len(self.unedited_ids):
            if self.config.pin_background:
                latents = self.pin(latents, self.sigmas[i + 1])
            elif kind in (REGION, SKIP):
                u = self.ids_on("unedited_ids", latents.device)
                if self.plan.jump_scale[i]:  # they have just jumped: hold them there until the next full pass
                    self.frozen = latents[:, u].clone()
                else:
                    latents = latents.clone()
                    latents[:, u] = self.frozen
        self.step += 1
        self.call = 0
        return latents

    def _partition(self, i: int, latents: torch.Tensor) -> None:
        if self.reference is None or self.reference.shape != latents.shape:
            got = None if self.reference is None else tuple(self.reference.shape)
            raise RuntimeError(f"RegionE needs the reference latent at the output's shape {tuple(latents.shape)}, "
                               f"got {got}: generate at the reference image's size")
        sigma, nxt = self.sigmas[i], self.sigmas[i + 1]
        outs = [self.full_out[b] for b in range(self.call)]
        if len(outs) == 1:  # one transformer call: its output is the step's velocity
            velocity = outs[0]
        elif self.combine is not None and len(outs) == 2:
            velocity = self.combine(outs)
        else:
            velocity = (latents.float() - self.x_before.float()) / (nxt - sigma)
        estimate = one_step_estimate(self.x_before, velocity, sigma)
        mask = adaptive_partition(estimate, self.reference, self.grid, self.config.threshold,
                                  self.config.erosion_dilation).cpu()
        if self.config.mode == "plan+regione":
            mask = mask | self.plan_mask
        self._set_edited(mask)
        logger.info("accel partition at step %d: %d of %d tokens edited", i, int(mask.sum()), mask.numel())

    def _count(self, what: str, query_tokens: int) -> None:
        self.stats[what] += 1
        self.stats["query_tokens"] += query_tokens

    def reference_trajectory(self, sigma: float) -> torch.Tensor:
        """``(1 - σ) · z_ref + σ · ε`` in float32: where a token of the reference image sits at noise level σ.

        ε is the initial noise: ``x_0`` itself when ``σ_0 = 1`` (every stock editor), else recovered from
        ``x_0 = (1 - σ_0) z_ref + σ_0 ε``."""
        if self.reference is None or self.x0 is None:
            raise RuntimeError("pinning the background needs the reference latent, which the pipeline did not feed")
        ref = self.reference.float()
        if self.noise is None:
            s0 = self.sigmas[0]
            self.noise = self.x0.float() if s0 == 1.0 else (self.x0.float() - (1 - s0) * ref) / s0
        return (1 - sigma) * ref + sigma * self.noise

    def pin(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """``latents`` with every unedited token set to the reference trajectory at ``sigma``."""
        target = self.reference_trajectory(sigma).to(latents.dtype)
        u = self.ids_on("unedited_ids", latents.device)
        latents = latents.clone()
        latents[:, u] = target[:, u]
        return latents

    def summary(self) -> dict:
        """Counts for reports: the step pattern, passes run, tokens processed and the edited share."""
        return {
            "mode": self.config.mode,
            "pattern": None if self.plan is None else self.plan.pattern,
            "full_passes": self.stats["full"],
            "edited_passes": self.stats["edited"],
            "skipped_passes": self.stats["skipped"],
            "query_tokens": self.stats["query_tokens"],
            "edited_tokens": None if self.edited is None else int(self.edited.sum()),
            "tokens": self.tokens,
        }
