"""Learnable-regions losses: every term against a hand computation, and the score-function estimator against the
exact gradient of a toy cost (Monte-Carlo, fixed seed, tolerance from the sample count)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from replan.regions import losses as L

A = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
B = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_semantic_alignment_by_hand():
    assert torch.allclose(L.cos_distance(A, B), torch.tensor([1.0, 0.0]), atol=1e-6)
    c = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    sa = L.semantic_alignment(A, B, c, c)
    e = torch.tensor([1 - 1 / math.sqrt(2), 1 + 1 / math.sqrt(2)])   # D(A, c)
    o = torch.tensor([1 - 1 / math.sqrt(2), 1 + 1 / math.sqrt(2)])   # D(B, c)
    assert torch.allclose(sa["sa_e"], e, atol=1e-6) and torch.allclose(sa["sa_o"], o, atol=1e-6)
    assert torch.allclose(sa["sa"], e + o, atol=1e-6)


def test_clip_terms_by_hand():
    i_e, i_o = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    t_e, t_o = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(L.clip_guidance(i_e, t_e), torch.tensor([1 - 2 / math.sqrt(5)]))
    # unnormalised: (1, 0) vs (1, -1) → 1 − 1/√2
    assert torch.allclose(L.clip_directional(i_e, i_o, t_e, t_o, normalize=False), torch.tensor([1 - 2 ** -0.5]))
    de = F.normalize(i_e, dim=-1) - F.normalize(i_o, dim=-1)
    dt = F.normalize(t_e, dim=-1) - F.normalize(t_o, dim=-1)
    want = 1 - (de * dt).sum() / (de.norm() * dt.norm())
    assert torch.allclose(L.clip_directional(i_e, i_o, t_e, t_o), want.view(1))
    tok_a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    tok_b = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert torch.allclose(L.self_similarity(tok_b), torch.tensor([[[1.0, 2 ** -0.5], [2 ** -0.5, 1.0]]]))
    sq = 2 * 0.5  # two off-diagonal entries, each (0 − 1/√2)² = 0.5
    assert torch.allclose(L.structural(tok_a, tok_b, "sum"), torch.tensor([sq]))
    assert torch.allclose(L.structural(tok_a, tok_b, "mean"), torch.tensor([sq / 4]))
    assert torch.allclose(L.structural(tok_a, tok_b, "fro"), torch.tensor([math.sqrt(sq)]))
    with pytest.raises(ValueError):
        L.structural(tok_a, tok_b, "max")
    cl = L.clip_supervision(i_e, i_o, t_e, t_o, tok_a, tok_b, lambdas=(1.0, 2.0, 3.0), dir_normalize=False)
    assert torch.allclose(cl["clip_total"], cl["clip"] + 2 * cl["dir"] + 3 * cl["struct"])
    assert torch.allclose(L.total_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0]), 0.5, 2.0), torch.tensor(5.0))


def test_straight_through_and_composite():
    p = torch.tensor([[0.2, 0.7, 0.5]], requires_grad=True)
    m = L.straight_through(p, 0.5)
    assert m.tolist() == [[0.0, 1.0, 0.0]]
    (m * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert p.grad.tolist() == [[1.0, 2.0, 3.0]]
    up = torch.tensor([[[[1.0, 0.0]]]])
    gen, src = torch.full((1, 3, 1, 2), 5.0), torch.full((1, 3, 1, 2), -1.0)
    assert L.composite(up, gen, src)[0, :, 0].tolist() == [[5.0, -1.0]] * 3


def test_bernoulli_and_reinforce_by_hand():
    p = torch.tensor([[0.9, 0.2], [0.5, 0.5]], requires_grad=True)
    sample, logp = L.bernoulli_mask(p, torch.Generator().manual_seed(0))
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    want = (sample * p.log() + (1 - sample) * (1 - p).log()).sum(1)
    assert torch.allclose(logp, want)
    cost = torch.tensor([3.0, 1.0])
    L.reinforce(logp, cost).backward()
    # leave-one-out: b_0 = c_1, b_1 = c_0; d/dp of mean((c − b) log p(m)) = (c − b)/B · (m/p − (1 − m)/(1 − p))
    adv = torch.tensor([[3.0 - 1.0], [1.0 - 3.0]]) / 2
    grad = adv * (sample / p.detach() - (1 - sample) / (1 - p.detach()))
    assert torch.allclose(p.grad, grad)




# ------------------------------------------------------------------------------------- score-function estimator
THETA = torch.tensor([0.4, -0.8, 1.1], dtype=torch.float64)   # logits of P for a 3-patch mask
W = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)


def toy_cost(m):
    """A cost of a (..., 3) binary mask with interactions, so E[c] is not linear in P."""
    return 2.0 + (m * W).sum(-1) + 3.0 * m[..., 0] * m[..., 2] - 1.5 * m[..., 1] * m[..., 2]


def exact_gradient():
    """∇_θ E_{m ~ Bernoulli(σ(θ))}[c(m)], summing over all 8 masks."""
    theta = THETA.clone().requires_grad_(True)
    p = torch.sigmoid(theta)
    masks = [torch.tensor(bits, dtype=torch.float64) for bits in itertools.product([0, 1], repeat=3)]
    expectation = sum((p ** m * (1 - p) ** (1 - m)).prod() * toy_cost(m) for m in masks)
    expectation.backward()
    return theta.grad


def estimate(k: int, b: int, baseline, gen):
    """k independent batches of b samples: (per-batch gradient estimates (k, 3), costs (k, b))."""
    theta = THETA.repeat(k, 1).requires_grad_(True)   # one copy of θ per batch: its grad is that batch's estimate
    probs = torch.sigmoid(theta)[:, None, :].expand(k, b, 3).reshape(k * b, 3)
    mask, log_prob = L.bernoulli_mask(probs, gen)
    cost = toy_cost(mask).view(k, b)
    L.reinforce(log_prob.view(k, b), cost, baseline(cost) if callable(baseline) else baseline).backward()
    return theta.grad * k, cost   # reinforce averages over all k·b samples


def tolerance(estimates, exact):
    """4.5 standard errors of the mean; it must be tight enough to tell the old batch-mean baseline (a (1 − 1/B)
    shrink: 1/8 of the gradient at B = 8) and a flipped sign from the right answer."""
    tol = 4.5 * estimates.std(0) / math.sqrt(estimates.shape[0])
    assert (tol < exact.abs() / 10).all(), f"too few samples to test anything: tolerance {tol}, gradient {exact}"
    return tol


def check_unbiased(estimates, exact):
    assert ((estimates.mean(0) - exact).abs() < tolerance(estimates, exact)).all(), (estimates.mean(0), exact)


@pytest.mark.parametrize("b", [2, 8])
def test_reinforce_is_unbiased_with_leave_one_out(b):
    exact = exact_gradient()
    estimates, _ = estimate(20000, b, "loo", torch.Generator().manual_seed(b))
    check_unbiased(estimates, exact)
    # the old default, the batch mean *including* the sample's own cost, gives (1 − 1/B) × the gradient: rejected
    biased, _ = estimate(20000, b, lambda cost: cost.mean(-1), torch.Generator().manual_seed(b))
    assert ((biased.mean(0) - exact).abs() > tolerance(estimates, exact)).all()
    assert torch.allclose(biased.mean(0), (1 - 1 / b) * exact, rtol=0.1)


def test_reinforce_is_unbiased_at_batch_one_with_a_running_baseline():
    exact = exact_gradient()
    gen, k = torch.Generator().manual_seed(1), 20000
    running = L.RunningBaseline(momentum=0.5)   # k independent chains of 4 steps, one sample per step
    steps = []
    for _ in range(4):
        grads, cost = estimate(k, 1, running.value, gen)   # the value from earlier steps only …
        running.update(cost)                                # … then this step's cost joins it
        steps.append(grads)
    assert running.value.shape == (k,)
    check_unbiased(torch.stack(steps).mean(0), exact)
    with pytest.raises(ValueError, match="at least 2 samples"):
        estimate(4, 1, "loo", gen)


def test_batch_mean_baseline_at_batch_one_is_exactly_zero():
    """What the running baseline replaces: at B = 1 the batch mean is the sample's own cost, so no gradient at all."""
    grads, _ = estimate(1000, 1, lambda cost: cost.mean(-1), torch.Generator().manual_seed(3))
    assert torch.equal(grads, torch.zeros_like(grads)) and exact_gradient().abs().min() > 0.1


def test_running_baseline_state_round_trip():
    a = L.RunningBaseline(0.9)
    assert a.value is None
    a.update(torch.tensor([1.0, 3.0]))
    a.update(torch.tensor([4.0]))
    assert torch.allclose(a.value, torch.tensor(0.9 * 2.0 + 0.1 * 4.0))
    b = L.RunningBaseline()
    b.load_state_dict(a.state_dict())
    assert b.momentum == 0.9 and torch.equal(b.value, a.value)
    with pytest.raises(ValueError, match="momentum"):
        L.RunningBaseline(1.0)
