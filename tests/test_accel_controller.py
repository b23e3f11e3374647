"""RegionController in the loop a stock pipeline runs (transformer call(s), CFG combination, float32 Euler step,
step callback), with a toy per-token velocity model: jumps, partition, velocity cache, pinning by hand."""

import pytest
import torch

from replan.accel import AccelConfig, RegionController, StepPlan
from replan.accel.phases import Phases

H = W = 8
L = H * W
SIGMAS = [1 - k / 10 for k in range(10)] + [0.0]  # 10 uniform steps


def config(mode="regione", **params):
    params = {"warmup": 2, "post": 1, "refresh": "", "threshold": 0.5, "cache_threshold": 0.0, **params}
    return AccelConfig.from_options(mode, **params).resolved("toy", "flux_kontext", len(SIGMAS) - 1)


def scene(edited_block=(2, 6), channels=4, seed=0):
    """Reference latent, initial noise and the clean target per token: the reference outside ``edited_block``
    (rows and cols [a, b)), a vector orthogonal to it inside."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.zeros(1, L, channels)
    ref[..., 0] = 1 + torch.rand(1, L, generator=g)
    target = ref.clone()
    a, b = edited_block
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[a:b, a:b] = True
    target[0, inside.reshape(-1)] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    noise = torch.randn(1, L, channels, generator=g)
    return ref, noise, target, inside.reshape(-1)


def straight(target):
    """The exact flow-matching velocity towards ``target``: v = (x - target) / σ, constant along the path."""
    def model(h, sigma, branch, positions):
        clean = torch.zeros_like(h)
        noisy = positions < L
        clean[:, noisy] = target[:, positions[noisy]]
        return (h - clean) / sigma
    return model


def run_loop(x0, ref, model, controller=None, branches=1, combine=None, sigmas=SIGMAS):
    """What the stock pipelines do per step; returns the latents after every step and the transformer calls."""
    x, trace, calls = x0, [x0], []
    for i in range(len(sigmas) - 1):
        hidden = torch.cat([x, ref], dim=1)
        outs = []
        for b in range(branches):
            def run(ids, kv, b=b, i=i, hidden=hidden):
                positions = torch.arange(hidden.shape[1]) if ids is None else ids
                out = model(hidden[:, positions], sigmas[i], b, positions)
                calls.append({"step": i, "branch": b, "ids": None if ids is None else ids.tolist(), "kv": kv,
                              "out": out})
                return out
            out = controller.forward(x, ref, run) if controller else run(None, "normal")
            outs.append(out[:, : x.shape[1]])
        v = outs[0] if branches == 1 else combine(outs)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
        if controller is not None:
            x = controller.end_step(i, x)
        trace.append(x)
    return trace, calls


def test_regione_on_straight_trajectories_equals_the_baseline():
    ref, noise, target, inside = scene()
    model = straight(target)
    base, _ = run_loop(noise, ref, model)
    ctl = RegionController(config(), 10, (H, W))
    ctl.start(SIGMAS)
    fast, calls = run_loop(noise, ref, model, ctl)
    # partition: the estimate equals the target, so the edited set is the block (morphology: 4x4 → 2x2 → 6x6)
    grown = torch.zeros(H, W, dtype=torch.bool)
    grown[1:7, 1:7] = True
    assert torch.equal(ctl.edited, grown.reshape(-1))
    # straight paths make RegionE's jump exact: same result as the baseline, with far fewer token passes
    assert torch.allclose(fast[-1], base[-1], atol=1e-5)
    assert torch.allclose(fast[-1], target, atol=1e-5)
    assert ctl.plan.pattern == "FPCCCCCCCF"
    edited_calls = [c for c in calls if c["ids"] is not None]
    assert [c["step"] for c in edited_calls] == list(range(2, 9))
    assert all(c["kv"] == "cached" and c["ids"] == ctl.edited_ids.tolist() for c in edited_calls)
    assert [c["kv"] for c in calls if c["ids"] is None] == ["normal", "store", "normal"]
    assert ctl.summary()["query_tokens"] == 3 * 2 * L + 7 * 36


def curved(target):
    """A velocity field with curved paths (depends on σ), so a jump is not exact."""
    def model(h, sigma, branch, positions):
        return straight(target)(h, sigma, branch, positions) + torch.sin(3 * h) * (1 - sigma)
    return model


def test_jump_arithmetic_by_hand():
    ref, noise, target, _ = scene()
    ctl = RegionController(config(refresh="5"), 10, (H, W))
    plan = ctl.start(SIGMAS)
    trace, calls = run_loop(noise, ref, curved(target), ctl)
    u = ctl.unedited_ids
    assert len(u) and len(ctl.edited_ids)
    for j, t in ((1, 4), (4, 9)):  # partition at index 1 jumps to σ4; refresh at index 4 jumps to σ[N-P] = σ9
        v = next(c["out"] for c in calls if c["step"] == j)[:, :L]
        x = trace[j]
        # after the scheduler's steps j and j+1 the unedited tokens sit at x_j + (σ_t - σ_j) · v_j …
        jumped = x[:, u] + (SIGMAS[t] - SIGMAS[j]) * v[:, u]
        assert torch.allclose(trace[j + 2][:, u], jumped, atol=1e-6)
        assert plan.jump_scale[j + 1] == pytest.approx((SIGMAS[t] - SIGMAS[j + 1]) / (SIGMAS[j + 2] - SIGMAS[j + 1]))
        # … and stay frozen until the full pass at σ_t
        for k in range(j + 2, t + 1):
            assert torch.equal(trace[k][:, u], trace[j + 2][:, u])
    # the edited tokens took normal Euler steps with the edited-only outputs
    e = ctl.edited_ids
    for c in calls:
        if c["ids"] is not None:
            i = c["step"]
            euler = trace[i][:, e] + (SIGMAS[i + 1] - SIGMAS[i]) * c["out"]
            assert torch.allclose(trace[i + 1][:, e], euler, atol=1e-6)


def test_velocity_cache_reuses_the_last_velocity_times_the_ratio():
    ref, noise, target, _ = scene()
    ctl = RegionController(config(cache_threshold=0.2, gamma=[1.0] * 9), 10, (H, W))
    plan = ctl.start(SIGMAS)
    assert plan.pattern == "FPCssCssCF"  # ratio 0.9 per step, as computed by hand in test_accel_phases
    trace, calls = run_loop(noise, ref, curved(target), ctl)
    computed = {c["step"]: c["out"] for c in calls if c["ids"] is not None}
    assert sorted(computed) == [2, 5, 8]
    e = ctl.edited_ids
    for i, last in ((3, 2), (4, 2), (6, 5), (7, 5)):
        step = trace[i + 1][:, e] - trace[i][:, e]
        assert torch.allclose(step, -0.1 * 0.9 * computed[last], atol=1e-6)  # Δσ · ratio_i · v_last (not Π ratio)
    assert ctl.summary()["skipped_passes"] == 4


@pytest.mark.parametrize("rescale", [False, True])
def test_cfg_branches_keep_their_own_caches(rescale):
    """Two transformer calls per step (true CFG); skipped steps give ratio × the last combined velocity, for a linear
    and for Qwen's per-token norm-rescaled combination."""
    ref, noise, target, _ = scene()

    def model(h, sigma, branch, positions):
        return curved(target)(h, sigma, branch, positions) * (1.0 if branch == 0 else 0.3) + 0.2 * branch

    def combine(outs):
        cond, neg = outs
        comb = neg + 4.0 * (cond - neg)
        if rescale:
            comb = comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
        return comb

    ctl = RegionController(config(cache_threshold=0.2, gamma=[1.0] * 9), 10, (H, W))
    ctl.start(SIGMAS)
    trace, calls = run_loop(noise, ref, model, ctl, branches=2, combine=combine)
    e = ctl.edited_ids
    by_step = {}
    for c in calls:
        if c["ids"] is not None:
            by_step.setdefault(c["step"], [None, None])[c["branch"]] = c["out"]
    for i, last in ((3, 2), (7, 5)):
        v_last = combine(by_step[last])
        assert torch.allclose(trace[i + 1][:, e] - trace[i][:, e], -0.1 * 0.9 * v_last, atol=1e-5)
    # frozen tokens never get a zero velocity in any branch (the norm rescaling would make it 0/0)
    assert all(bool(torch.isfinite(x).all()) for x in trace)
    u = ctl.unedited_ids
    assert torch.equal(trace[3][:, u], trace[8][:, u])  # held where the jump left them until σ[N-P]
    assert ctl.summary()["edited_passes"] == 6  # 3 computed region steps × 2 branches


def test_every_token_edited_is_the_baseline_bit_for_bit():
    ref, noise, _, _ = scene()
    target = torch.zeros_like(ref)
    target[..., 1] = 1.0  # orthogonal to the reference everywhere: every token edited
    model = curved(target)
    base, _ = run_loop(noise, ref, model)
    ctl = RegionController(config(refresh="5"), 10, (H, W))
    ctl.start(SIGMAS)
    fast, calls = run_loop(noise, ref, model, ctl)
    assert ctl.all_edited
    assert all(torch.equal(a, b) for a, b in zip(base, fast))
    assert all(c["ids"] is None for c in calls)


def test_no_token_edited_runs_no_region_pass():
    ref, noise, _, _ = scene()
    model = straight(ref)  # the edit changes nothing
    ctl = RegionController(config(refresh="5"), 10, (H, W))
    ctl.start(SIGMAS)
    fast, calls = run_loop(noise, ref, model, ctl)
    assert len(ctl.edited_ids) == 0
    assert sorted({c["step"] for c in calls}) == [0, 1, 4, 9]  # full passes only
    assert torch.allclose(fast[-1], ref, atol=1e-5)


def test_plan_mode_pins_the_background_to_the_reference_trajectory():
    ref, noise, target, inside = scene()
    plan_mask = inside.clone()
    ctl = RegionController(config("plan"), 10, (H, W), plan_mask=plan_mask)
    assert ctl.config.pin_background and torch.equal(ctl.edited, plan_mask)  # known before step 0
    ctl.start(SIGMAS)
    trace, calls = run_loop(noise, ref, curved(target), ctl)
    u = ctl.unedited_ids
    for i, x in enumerate(trace[1:], start=1):
        s = SIGMAS[i]
        assert torch.equal(x[:, u], ((1 - s) * ref.float() + s * noise.float())[:, u])
    assert torch.equal(trace[-1][:, u], ref[:, u])  # exact background at σ = 0
    assert all(c["ids"] == ctl.edited_ids.tolist() for c in calls if c["ids"] is not None)


def test_plan_plus_regione_unites_both_sets():
    ref, noise, target, _ = scene(edited_block=(5, 8))
    plan_mask = torch.zeros(H, W, dtype=torch.bool)
    plan_mask[0, 0] = True  # the plan names a token the partition would leave alone
    ctl = RegionController(config("plan+regione"), 10, (H, W), plan_mask=plan_mask.reshape(-1))
    assert ctl.edited is None  # decided at the partition step
    ctl.start(SIGMAS)
    run_loop(noise, ref, straight(target), ctl)
    arp = torch.zeros(H, W, dtype=torch.bool)
    arp[4:8, 4:8] = True  # the 3x3 corner block 5..7 erodes to (6, 6), which dilates to 4..7 (clipped at the grid)
    assert torch.equal(ctl.edited.reshape(H, W), arp | plan_mask)


def test_controller_checks():
    with pytest.raises(ValueError, match="needs a region mode"):
        RegionController(AccelConfig(), 10, (H, W))
    with pytest.raises(ValueError, match="needs the plan's token mask"):
        RegionController(config("plan"), 10, (H, W))
    ctl = RegionController(config(), 10, (H, W))
    x = torch.zeros(1, L, 4)
    with pytest.raises(RuntimeError, match="start\\(sigmas\\) must run"):
        ctl.forward(x, x, lambda ids, kv: x)
    ctl.start(SIGMAS)
    with pytest.raises(ValueError, match="batch 1"):
        ctl.forward(torch.zeros(2, L, 4), None, lambda ids, kv: x)
    with pytest.raises(ValueError, match="fed 10 noisy tokens; the 8x8 grid has 64"):
        ctl.forward(torch.zeros(1, 10, 4), None, lambda ids, kv: x)
    assert StepPlan.build(Phases(10, 2, 1, ()), SIGMAS).pattern == "FPCCCCCCCF"


def test_edited_ids_reach_a_device_once_per_edited_set():
    """The ids an edited-only pass uses are the same tensor on every pass (the runtime builds the restricted region
    mask once per tensor; a fresh copy per pass rebuilt it every pass on a GPU), and new ones after a new partition.
    ``meta`` stands in for an accelerator: ``.to("meta")`` copies every time, as ``.to("cuda")`` does from CPU."""
    ref, noise, target, inside = scene()
    ctl = RegionController(config(), 10, (H, W))
    ctl.start(SIGMAS)
    run_loop(noise, ref, straight(target), ctl)
    first = ctl.ids_on("edited_ids", "meta")
    assert first.device.type == "meta" and first.shape == ctl.edited_ids.shape
    assert ctl.ids_on("edited_ids", "meta") is first
    assert ctl.ids_on("unedited_ids", "meta") is ctl.ids_on("unedited_ids", "meta")
    ctl._set_edited(~ctl.edited)  # a refresh that finds another edited set
    again = ctl.ids_on("edited_ids", "meta")
    assert again is not first and again.shape == ctl.edited_ids.shape
