"""accel= through the editors' stock pipelines on tiny random components (FLUX.1 Kontext, Qwen-Image-Edit / 2511,
FLUX.2 klein): none is today's pipeline, every token edited is the baseline, unedited tokens are frozen between
jumps or pinned to the reference trajectory, errors come before any model work, cache-dit is undone afterwards."""

import numpy as np
import pytest
import torch
from PIL import Image

from replan.backbones import load_editor
from replan.plan import Region, RegionPlan
from replan.testing.klein import TINY_KLEIN_EDITOR_KWARGS, save_tiny_klein
from replan.testing.qwen_image import save_tiny_qwen_edit, small_qwen_sizes

GLOBAL = RegionPlan("make it warmer")
FAST = {"max_sequence_length": 16}
STEPS = 8  # scaled default phases: warmup 2, post 1, refresh 5 → pattern F P C C R C C F (velocity cache off)


def make_image(size=(200, 150), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def kontext(tiny_kontext_dir):
    ed = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs={"max_area": 128 * 128})
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


class Recorder:
    """A user step callback that keeps the latents after every step, and a pre-hook that keeps x_0 and z_ref."""

    def __init__(self, transformer, tokens):
        self.latents, self.first = [], None
        self.tokens = tokens
        self.handle = transformer.register_forward_pre_hook(self.pre, with_kwargs=True)

    def pre(self, module, args, kwargs):
        if self.first is None:
            self.first = kwargs["hidden_states"].clone()

    def __call__(self, pipe, step, timestep, kwargs):
        self.latents.append(kwargs["latents"].clone())
        return kwargs

    def close(self):
        self.handle.remove()


def edit(ed, accel=None, plan=GLOBAL, **kw):
    return ed.edit(make_image(), plan, steps=STEPS, seed=3, accel=accel, **{**FAST, **kw})


def tokens(ed):
    w, h = ed.generation_size(make_image().size)
    return (w // 16) * (h // 16)


def same(a, b):
    return np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_none_is_todays_pipeline(kontext):
    base = edit(kontext)
    assert same(edit(kontext, "none"), base) and "accel" not in edit(kontext, "none").extras
    two = RegionPlan("warm", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))
    assert same(edit(kontext, "none", plan=two), edit(kontext, plan=two))


def test_every_token_edited_equals_the_baseline(kontext):
    base = edit(kontext)
    fast = edit(kontext, {"mode": "regione", "threshold": 1.0, "cache_threshold": 0})
    summary = fast.extras["accel"]
    assert summary["edited_tokens"] == summary["tokens"] == tokens(kontext) == 54  # the 144x96 grid of 16-px patches
    assert summary["pattern"] == "FPCCRCCF" and summary["edited_passes"] == 0  # all full: nothing to cache against
    assert same(fast, base)
    assert same(edit(kontext, {"mode": "plan", "cache_threshold": 0}), base)  # no regions: everything is edited


def test_plan_and_regione_without_regions_is_regione_with_a_pinned_background(kontext):
    """A plan without regions says nothing of where the edit is: plan+regione takes RegionE's partition alone
    (not the whole image, which would accelerate nothing); unpinned it is plain RegionE."""
    options = {"threshold": 0.0, "erosion_dilation": False, "cache_threshold": 0}
    regione = edit(kontext, {"mode": "regione", **options})
    both = edit(kontext, {"mode": "plan+regione", **options, "pin_background": False})
    assert 0 < both.extras["accel"]["edited_tokens"] == regione.extras["accel"]["edited_tokens"] < tokens(kontext)
    assert both.extras["accel"]["edited_passes"] == regione.extras["accel"]["edited_passes"] > 0
    assert same(both, regione)
    pinned = edit(kontext, {"mode": "plan+regione", **options})
    assert pinned.extras["accel"]["edited_tokens"] == regione.extras["accel"]["edited_tokens"]


def test_partial_partition_freezes_and_jumps_unedited_tokens(kontext):
    n = tokens(kontext)
    rec = Recorder(kontext.pipe.transformer, n)
    try:
        fast = edit(kontext, {"mode": "regione", "threshold": 0.0, "erosion_dilation": False,
                              "cache_threshold": 0}, callback=rec)
    finally:
        rec.close()
    summary = fast.extras["accel"]
    assert 0 < summary["edited_tokens"] < n
    assert summary["edited_passes"] == 4 and summary["full_passes"] == 4  # C C . C C and F P R F
    assert summary["kv_cache_bytes"] > 0
    # steps F P C C R C C F: the unedited tokens jump to their σ4 target during step 2 and to σ7 during step 5;
    # steps 3 and 6 move the edited tokens only
    x = rec.latents  # x[i] = latents after step i
    for i in (3, 6):
        frozen = (x[i] - x[i - 1]).abs().sum(-1)[0] == 0
        assert int(frozen.sum()) == n - summary["edited_tokens"]
    for i in (2, 5):
        assert bool(((x[i] - x[i - 1]).abs().sum(-1)[0] > 0).all())


def test_pinned_background_follows_the_reference_trajectory(kontext):
    n = tokens(kontext)
    rec = Recorder(kontext.pipe.transformer, n)
    try:
        fast = edit(kontext, {"mode": "regione", "threshold": 0.0, "erosion_dilation": False, "cache_threshold": 0,
                              "pin_background": True}, callback=rec)
    finally:
        rec.close()
    assert 0 < fast.extras["accel"]["edited_tokens"] < n
    noise, ref = rec.first[:, :n], rec.first[:, n: 2 * n]
    sigmas = kontext.pipe.scheduler.sigmas.tolist()
    final = rec.latents[-1]
    pinned = (final - ref).abs().sum(-1)[0] == 0
    assert int(pinned.sum()) == n - fast.extras["accel"]["edited_tokens"]  # exactly the reference latent at σ = 0 …
    for i in range(1, STEPS):  # … and on its noising trajectory after every step from the partition on
        s = sigmas[i + 1]
        expected = ((1 - s) * ref.float() + s * noise.float()).to(final.dtype)
        assert torch.equal(rec.latents[i][:, pinned], expected[:, pinned])


TWO = RegionPlan("warm", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))


def test_region_plan_every_token_edited_equals_region_attention(kontext):
    base = edit(kontext, plan=TWO)
    fast = edit(kontext, {"mode": "regione", "threshold": 1.0, "cache_threshold": 0}, plan=TWO)
    assert fast.extras["accel"]["edited_tokens"] == tokens(kontext) and same(fast, base)
    assert fast.attention.masked_passes == base.attention.masked_passes == STEPS  # every pass got its mask


def test_region_plan_edited_only_passes_with_pinned_background(kontext):
    """plan mode on a two-region plan: edited-only passes run with the region mask restricted to their rows (the
    edit runs, and the mask is restricted once per rule set, not per layer), the rest stays on the reference
    trajectory."""
    n = tokens(kontext)
    rec = Recorder(kontext.pipe.transformer, n)
    runtime = kontext.accel_runtime()
    built = []
    restrict = runtime._restricted

    def spy(region, ids, text_len):
        out = restrict(region, ids, text_len)
        if not built or built[-1] is not out:
            built.append(out)
        return out

    runtime._restricted = spy
    try:
        fast = edit(kontext, {"mode": "plan", "cache_threshold": 0}, plan=TWO, callback=rec)
    finally:
        rec.close()
        del runtime._restricted
    summary = fast.extras["accel"]
    assert 0 < summary["edited_tokens"] < n and summary["edited_passes"] == 4
    assert fast.attention.masked_passes == STEPS
    switches = len(set(fast.attention.steps.values()))  # rule sets used; each gets its restricted mask once
    assert 1 <= len(built) <= switches
    assert built[0].mask.shape[-2] == fast.layout.text_len + summary["edited_tokens"]  # text + edited rows …
    assert built[0].mask.shape[-1] == fast.layout.total_len  # … against every key
    noise, ref = rec.first[:, :n], rec.first[:, n: 2 * n]
    sigmas = kontext.pipe.scheduler.sigmas.tolist()
    final = rec.latents[-1]
    pinned = (final - ref).abs().sum(-1)[0] == 0
    assert int(pinned.sum()) == n - summary["edited_tokens"]
    for i in range(1, STEPS):
        s = sigmas[i + 1]
        expected = ((1 - s) * ref.float() + s * noise.float()).to(final.dtype)
        assert torch.equal(rec.latents[i][:, pinned], expected[:, pinned])


def test_bad_parameters_fail_before_any_model_work(kontext, monkeypatch):
    calls = []
    monkeypatch.setattr(kontext, "encode", lambda *a, **k: calls.append(1))
    for accel, message in [({"mode": "regione", "threshold": 2}, r"threshold .* must be in \[-1, 1\], got 2"),
                           ({"mode": "regione", "refresh": "3"}, r"refresh step 3 is not inside the region phase"),
                           ({"mode": "regione", "refresh": "5,6"}, "adjacent"),
                           ("turbo", "accel must be one of")]:
        with pytest.raises(ValueError, match=message):
            edit(kontext, accel)
    with pytest.raises(ValueError, match="do not fit in 4 steps"):
        kontext.edit(make_image(), GLOBAL, steps=4, accel="regione")
    with pytest.raises(ValueError, match="use attention dense"):
        edit(kontext, "regione", attention="flex")
    assert calls == []


def test_cache_dit_runs_and_is_undone(kontext):
    pytest.importorskip("cache_dit")
    base = edit(kontext)
    calls = []
    hook = kontext.pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:  # random weights change a lot between steps: a loose residual threshold lets DBCache cache them
        cached = edit(kontext, {"mode": "cache-dit", "cache_dit": {"Fn_compute_blocks": 1, "max_warmup_steps": 2,
                                                                   "residual_diff_threshold": 1.0}})
    finally:
        hook.remove()
    assert cached.extras["accel"]["mode"] == "cache-dit"
    assert len(calls) < STEPS and not same(cached, base)  # later blocks skipped on cached steps
    assert same(edit(kontext), base)  # disabled again afterwards
    two = RegionPlan("warm", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))
    masked = edit(kontext, {"mode": "cache-dit", "cache_dit": {"Fn_compute_blocks": 1, "max_warmup_steps": 2}},
                  plan=two)  # a step cache composes with region attention (full passes only)
    assert masked.attention.steps  # the masked passes ran


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel_qwen")
    return {"qwen": save_tiny_qwen_edit(root / "edit"),
            "qwen2511": save_tiny_qwen_edit(root / "2511", plus=True, zero_cond_t=True)}


@pytest.mark.parametrize("name", ["qwen", "qwen2511"])
def test_qwen_true_cfg_keeps_one_cache_per_branch(qwen_dirs, name, monkeypatch):
    small_qwen_sizes(monkeypatch)
    ed = load_editor(name, str(qwen_dirs[name]), device="cpu")
    ed.pipe.set_progress_bar_config(disable=True)
    if name == "qwen":  # (2511 differs in the edited-only passes: its per-token modulation index is gathered)
        base = ed.edit(make_image(), GLOBAL, steps=STEPS, seed=1)
        everything = ed.edit(make_image(), GLOBAL, steps=STEPS, seed=1,
                             accel={"mode": "regione", "threshold": 1.0, "cache_threshold": 0})
        assert same(everything, base)
    rec = Recorder(ed.pipe.transformer, 0)
    try:
        fast = ed.edit(make_image(), GLOBAL, steps=STEPS, seed=1, callback=rec,
                       accel={"mode": "regione", "threshold": 0.0, "erosion_dilation": False, "cache_threshold": 0})
    finally:
        rec.close()
    assert all(bool(torch.isfinite(x).all()) for x in rec.latents)  # frozen tokens survive the norm-rescaled CFG
    summary = fast.extras["accel"]
    assert 0 < summary["edited_tokens"] < summary["tokens"]
    assert summary["edited_passes"] == 2 * 4 and summary["full_passes"] == 2 * 4  # cond + uncond per step
    assert fast.image.size == make_image().size
    if name == "qwen":  # with region attention: the masked cond pass and the unmasked negative pass, each cached
        base = ed.edit(make_image(), TWO, steps=STEPS, seed=1)
        same_plan = ed.edit(make_image(), TWO, steps=STEPS, seed=1,
                            accel={"mode": "regione", "threshold": 1.0, "cache_threshold": 0})
        assert same(same_plan, base)
        planned = ed.edit(make_image(), TWO, steps=STEPS, seed=1, accel={"mode": "plan", "cache_threshold": 0})
        assert planned.extras["accel"]["edited_passes"] == 2 * 4
        assert planned.attention.masked_passes == STEPS and planned.attention.unmasked_passes == STEPS


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    ed = load_editor("flux_klein_base", str(save_tiny_klein(tmp_path_factory.mktemp("accel_klein"))), device="cpu",
                     editor_kwargs=TINY_KLEIN_EDITOR_KWARGS)
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


def test_klein_regione(klein):
    base = edit(klein)
    assert same(edit(klein, {"mode": "regione", "threshold": 1.0}), base)  # no klein gamma: velocity cache off
    fast = edit(klein, {"mode": "regione", "threshold": 0.0, "erosion_dilation": False})
    assert 0 < fast.extras["accel"]["edited_tokens"] < fast.extras["accel"]["tokens"]
    assert fast.extras["accel"]["edited_passes"] == 2 * 4


def test_cfg_combine_is_the_pipelines_own(kontext, klein, qwen_dirs, monkeypatch):
    """The partition uses the step's exact velocity: each editor's CFG combination equals, bit for bit, what its
    pipeline hands the scheduler."""
    small_qwen_sizes(monkeypatch)
    qwen = load_editor("qwen", str(qwen_dirs["qwen"]), device="cpu")
    qwen.pipe.set_progress_bar_config(disable=True)
    cases = [(kontext, {"true_cfg": 2.0, "negative_prompt": "blurry", **FAST}), (qwen, {}), (klein, FAST)]
    for editor, options in cases:
        outputs, velocities = [], []
        hook = editor.pipe.transformer.register_forward_hook(lambda m, a, out, seen=outputs: seen.append(out[0]))
        step = editor.pipe.scheduler.step
        def spy(v, *a, step=step, seen=velocities, **k):
            seen.append(v.clone())
            return step(v, *a, **k)

        monkeypatch.setattr(editor.pipe.scheduler, "step", spy)
        try:
            editor.edit(make_image(), GLOBAL, steps=2, seed=0, **options)
        finally:
            hook.remove()
            monkeypatch.undo()
            small_qwen_sizes(monkeypatch)
        combine = editor.cfg_combine(options)
        assert combine is not None and len(outputs) == 4
        n = velocities[0].shape[1]
        for i in range(2):
            assert torch.equal(combine([outputs[2 * i][:, :n], outputs[2 * i + 1][:, :n]]), velocities[i])
    assert kontext.cfg_combine({}) is None  # guidance-distilled: one call per step
