"""Losses of arXiv 2505.19352 (§6 of ``learnable-regions-spec.md``) as pure functions on tensors, and the gradient
path from the CLIP terms to the mask head (§6.4), which the paper does not state.

* ``semantic_alignment`` — L_sa = D(g(F_refined), T_e) + D(g(F_img), T_o) (Eqs. 4–6), D = 1 − cos.
* ``clip_guidance`` (Eq. 7), ``clip_directional`` (Eq. 8), ``structural`` (Eq. 9), ``clip_supervision`` (Eq. 10).
* Gradient path (deviation, spec §6.4 proposal): the CLIP terms are computed on a proxy edit
  ``composite(up(M), I_gen, X) = up(M) ⊙ I_gen + (1 − up(M)) ⊙ X`` where ``I_gen`` is a frozen generator output treated
  as a constant; ``M`` is either ``straight_through(P, θ)`` (forward 1[P > θ], backward identity to P) or a
  Bernoulli(P) sample whose log-probability is weighted by the (detached) CLIP cost (``reinforce``, score function,
  unbiased: leave-one-out baseline for B ≥ 2, ``RunningBaseline`` over earlier steps for B = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cos_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D(a, b) = 1 − cos(a, b) along the last dim, per row."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)


def semantic_alignment(g_fused, g_source, t_e, t_o) -> dict:
    """Eqs. 4–6 per sample: ``{"sa": L_sa^e + L_sa^o, "sa_e": ..., "sa_o": ...}`` (each (B,))."""
    sa_e, sa_o = cos_distance(g_fused, t_e), cos_distance(g_source, t_o)
    return {"sa": sa_e + sa_o, "sa_e": sa_e, "sa_o": sa_o}


def clip_guidance(i_e, t_e):
    """Eq. 7: D(I_e, T_e)."""
    return cos_distance(i_e, t_e)


def clip_directional(i_e, i_ori, t_e, t_o, normalize: bool = True):
    """Eq. 8: D(I_e − I_ori, T_e − T_o); ``normalize`` L2-normalises each embedding before the differences
    (deviation: as the common CLIP-direction metric; LearnRegion's code does not)."""
    if normalize:
        i_e, i_ori, t_e, t_o = (F.normalize(v, dim=-1) for v in (i_e, i_ori, t_e, t_o))
    return cos_distance(i_e - i_ori, t_e - t_o)


def self_similarity(tokens):
    """S_ij = cos(f_i, f_j) for (B, N, C) tokens → (B, N, N)."""
    t = F.normalize(tokens, dim=-1)
    return t @ t.transpose(-1, -2)


def structural(tokens_edit, tokens_source, reduction: str = "mean"):
    """Eq. 9 per sample: squared distance of the two self-similarity matrices; ``mean`` (MSE, LearnRegion),
    ``sum`` (Σ_ij) or ``fro`` (Frobenius norm) — the normalisation is a gap (deviation: default ``mean``)."""
    diff2 = (self_similarity(tokens_edit) - self_similarity(tokens_source)) ** 2
    if reduction == "mean":
        return diff2.mean(dim=(-1, -2))
    if reduction == "sum":
        return diff2.sum(dim=(-1, -2))
    if reduction == "fro":
        return diff2.sum(dim=(-1, -2)).sqrt()
    raise ValueError(f"structural reduction must be mean, sum or fro, not {reduction!r}")


def clip_supervision(i_e, i_ori, t_e, t_o, tokens_edit, tokens_source, lambdas=(1.0, 1.0, 1.0),
                     dir_normalize: bool = True, struct_reduction: str = "mean") -> dict:
    """Eq. 10 per sample: ``{"clip_total": λ1 L_clip + λ2 L_dir + λ3 L_struct, "clip", "dir", "struct"}``."""
    lc = clip_guidance(i_e, t_e)
    ld = clip_directional(i_e, i_ori, t_e, t_o, dir_normalize)
    ls = structural(tokens_edit, tokens_source, struct_reduction)
    return {"clip_total": lambdas[0] * lc + lambdas[1] * ld + lambdas[2] * ls, "clip": lc, "dir": ld, "struct": ls}


def total_loss(sa, clip_total, alpha: float = 1.0, beta: float = 1.0):
    """Eq. 11: α L_sa + β L_CLIP (batch means)."""
    return alpha * sa.mean() + beta * clip_total.mean()


# ------------------------------------------------------------------------------------------ mask gradient path
def straight_through(probs, theta: float = 0.5):
    """Forward: 1[P > θ]; backward: ∂/∂P = identity (M_st = M + P − sg(P))."""
    hard = (probs > theta).to(probs.dtype)
    return hard + probs - probs.detach()


def bernoulli_mask(probs, generator: torch.Generator | None = None):
    """A Bernoulli(P) sample (no gradient) and its log-probability Σ_i log p(m_i) (B,), differentiable in P."""
    with torch.no_grad():
        u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
        sample = (u < probs).to(probs.dtype)
    p = probs.clamp(1e-6, 1 - 1e-6)
    log_prob = (sample * p.log() + (1 - sample) * (1 - p).log()).flatten(1).sum(1)
    return sample, log_prob


def reinforce(log_prob, cost, baseline="loo"):
    """Score-function surrogate: its gradient is mean_i (c_i − b_i) ∇ log p(m_i), an unbiased estimate of ∇ E[c].

    ``log_prob`` and ``cost`` are (..., B): samples along the last dim (leading dims are independent groups). The
    baseline b_i must not depend on sample i's own draw, or the estimate is biased: the batch mean *including* c_i
    shrinks it by (1 − 1/B), to exactly zero at B = 1. So ``baseline`` is

    * ``"loo"`` — leave-one-out, b_i = mean of the other B − 1 costs (needs B ≥ 2);
    * a number or tensor (broadcast to (..., 1)) computed from *earlier* steps only, e.g. ``RunningBaseline.value``,
      for B = 1 (a batch of one, or a batch cut to one by skipped samples);
    * ``None`` — no baseline (unbiased, highest variance).
    """
    cost = cost.detach()
    if isinstance(baseline, str):
        if baseline != "loo":
            raise ValueError(f"baseline must be 'loo', a number, a tensor or None, not {baseline!r}")
        n = cost.shape[-1]
        if n < 2:
            raise ValueError("a leave-one-out baseline needs at least 2 samples per batch; pass a running baseline "
                             "(RunningBaseline.value) for a batch of one")
        b = (cost.sum(-1, keepdim=True) - cost) / (n - 1)
    elif baseline is None:
        b = torch.zeros((), dtype=cost.dtype, device=cost.device)
    else:
        b = torch.as_tensor(baseline, dtype=cost.dtype, device=cost.device).detach()
        if b.ndim:
            b = b.unsqueeze(-1)
    return ((cost - b) * log_prob).mean()


class RunningBaseline:
    """An exponential moving average of the batch-mean cost over *earlier* steps, for B = 1.

    Read ``value`` before ``update`` with the current costs: the baseline then never depends on the current draw and
    ``reinforce`` stays unbiased. ``value`` is None before the first update (no baseline: still unbiased).
    ``cost`` may have leading dims (independent chains, as ``reinforce``); the mean is over the last dim.
    """

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"baseline momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.value: torch.Tensor | None = None

    def update(self, cost) -> None:
        mean = cost.detach().float().mean(-1)
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "value": None if self.value is None else self.value.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.value = float(state["momentum"]), state["value"]


def composite(mask_up, generated, source):
    """Proxy edit: up(M) ⊙ I_gen + (1 − up(M)) ⊙ X (any pixel space in which both are given, e.g. CLIP-normalised)."""
    return mask_up * generated + (1 - mask_up) * source
