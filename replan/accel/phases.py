"""RegionE's phase controller: what every denoising step runs, decided before the first step.

Steps are 0-based indices ``i = 0 … N-1`` into the scheduler's sigmas ``σ_0 > … > σ_{N-1} > σ_N = 0``; refresh steps
are given 1-based, as RegionE counts them (refresh step ``r`` runs at index ``r - 1``). With warmup ``W``, post
``P`` and refresh steps ``R`` (regione-spec §3):

========================  =============  ======================================================================
index                     kind           what runs
========================  =============  ======================================================================
``0 … W-2``               ``full``       full pass, normal Euler step (stabilisation)
``W-1``                   ``partition``  full pass, K/V stored; edited set fixed; unedited tokens jump to ``σ[r_1-1]``
``W … N-P-1`` but refresh ``region``     edited tokens only, against the K/V cache
                          ``skip``       (region steps the velocity decay cache skips: no transformer call)
``r_k - 1``               ``refresh``    full pass, K/V stored again; unedited tokens jump to the next target
``N-P … N-1``             ``smooth``     full pass, normal Euler step
========================  =============  ======================================================================

Jump targets: ``[r - 1 for r in R] + [N - P]``; the unedited tokens sit exactly at ``σ[target]`` when the full pass
at that index runs. The velocity decay cache (regione-spec §8) never skips the first region step, refresh steps or
full steps; on other region steps ``ratio_i = γ[i-1] · (1 - (σ_{i-1} - σ_i))`` and the step is skipped while the
accumulated error ``1 - Π ratio`` (since the last computed step) stays ``<= δ``; a skipped step reuses the last
computed velocity times ``ratio_i``. The pattern depends only on γ and the sigmas, never on the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FULL, PARTITION, REFRESH, REGION, SKIP, SMOOTH = "full", "partition", "refresh", "region", "skip", "smooth"
LETTERS = {FULL: "F", PARTITION: "P", REFRESH: "R", REGION: "C", SKIP: "s", SMOOTH: "F"}
FULL_PASSES = (FULL, PARTITION, REFRESH, SMOOTH)


@dataclass(frozen=True)
class Phases:
    """The phase layout of ``steps`` denoising steps (no sigmas needed). Validate the numbers with
    ``AccelConfig.check`` first; the constructor only asserts consistency."""

    steps: int
    warmup: int
    post: int
    refresh: tuple[int, ...] = ()

    def __post_init__(self):
        n, w, p = self.steps, self.warmup, self.post
        if not (1 <= w <= n - p - 1 and p >= 0) or any(not w + 2 <= r <= n - p - 1 for r in self.refresh):
            raise ValueError(f"inconsistent phases: steps {n}, warmup {w}, post {p}, refresh {self.refresh}")

    @classmethod
    def from_config(cls, config, steps: int) -> Phases:
        """From a resolved ``AccelConfig``."""
        return cls(int(steps), int(config.warmup), int(config.post), tuple(config.refresh))

    @property
    def partition_step(self) -> int:
        return self.warmup - 1

    @property
    def refresh_steps(self) -> tuple[int, ...]:
        """0-based indices of the forced-refresh steps."""
        return tuple(r - 1 for r in self.refresh)

    @property
    def smooth_start(self) -> int:
        return self.steps - self.post

    @property
    def targets(self) -> tuple[int, ...]:
        """The sigma indices the unedited tokens jump to, in order: each refresh step, then the smooth stage."""
        return self.refresh_steps + (self.smooth_start,)

    def kind(self, i: int) -> str:
        """``full``, ``partition``, ``refresh``, ``region`` or ``smooth`` (before velocity-cache skipping)."""
        if not 0 <= i < self.steps:
            raise IndexError(f"step {i} outside 0..{self.steps - 1}")
        if i < self.partition_step:
            return FULL
        if i == self.partition_step:
            return PARTITION
        if i >= self.smooth_start:
            return SMOOTH
        if i in self.refresh_steps:
            return REFRESH
        return REGION

    def jump_target(self, i: int) -> int:
        """For a partition or refresh step ``i``: the sigma index its unedited tokens jump to."""
        if self.kind(i) not in (PARTITION, REFRESH):
            raise ValueError(f"step {i} is a {self.kind(i)} step: only partition and refresh steps jump")
        return next(t for t in self.targets if t > i)


@dataclass(frozen=True)
class StepPlan:
    """Everything the runtime needs per step, fixed before step 0: the kind (``skip`` where the velocity cache
    skips a region step), the decay ratio of skipped steps, and where the unedited tokens' jump is applied.

    ``jump_scale[i]`` (non-zero only on the step right after a partition/refresh step ``j = i - 1``) is the factor
    ``(σ[target] - σ_i) / (σ_{i+1} - σ_i)``: the runtime feeds ``jump_scale[i] · v_j`` as the unedited tokens'
    velocity at step ``i``, so the scheduler's own Euler steps ``j`` and ``i`` together move them
    ``(σ[target] - σ_j) · v_j`` — RegionE's one-step jump, with the velocity of the full pass at ``j``.
    """

    phases: Phases
    kinds: tuple[str, ...]
    ratios: tuple[float, ...]
    jump_scale: tuple[float, ...]

    @classmethod
    def build(cls, phases: Phases, sigmas: Sequence[float], gamma: Sequence[float] | None = None,
              delta: float = 0.0) -> StepPlan:
        """``sigmas``: the scheduler's ``N + 1`` values (terminal 0 included). ``gamma``: ``N - 1`` decay factors
        (``gamma[i-1]`` for step ``i``), needed when ``delta > 0``."""
        n = phases.steps
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) != n + 1:
            raise ValueError(f"need {n + 1} sigmas (terminal 0 included) for {n} steps, got {len(sigmas)}")
        if delta > 0 and (gamma is None or len(gamma) != n - 1):
            raise ValueError(f"the velocity cache needs {n - 1} gamma values for {n} steps, got "
                             f"{None if gamma is None else len(gamma)}")
        kinds, ratios = [], []
        acc = 1.0
        for i in range(n):
            kind, ratio = phases.kind(i), 1.0
            if kind == REGION and i > phases.warmup and delta > 0:
                r = float(gamma[i - 1]) * (1.0 - (sigmas[i - 1] - sigmas[i]))
                if r < 1.0:
                    acc *= r
                    if 1.0 - acc <= delta:
                        kind, ratio = SKIP, r
            if kind != SKIP:
                acc = 1.0
            kinds.append(kind)
            ratios.append(ratio)
        jump = [0.0] * n
        for j in range(n):
            if phases.kind(j) in (PARTITION, REFRESH):
                t, i = phases.jump_target(j), j + 1  # i < t always: refresh steps are never adjacent
                jump[i] = (sigmas[t] - sigmas[i]) / (sigmas[i + 1] - sigmas[i])
        return cls(phases, tuple(kinds), tuple(ratios), tuple(jump))

    @property
    def pattern(self) -> str:
        """One letter per step (F full, P partition, R refresh, C computed region step, s skipped), as §8."""
        return "".join(LETTERS[k] for k in self.kinds)

    def counts(self) -> dict:
        """Full passes, edited-only passes and skipped steps."""
        return {
            "full": sum(k in FULL_PASSES for k in self.kinds),
            "edited": sum(k == REGION for k in self.kinds),
            "skipped": sum(k == SKIP for k in self.kinds),
        }
