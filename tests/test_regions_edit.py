"""Mask → inpaint editing with per-step latent blending (Appendix A), on tiny SD-inpaint and FLUX Fill pipelines."""

import numpy as np
import pytest
import torch
from PIL import Image

from replan.regions.edit import MaskEditor, latent_mask, to_pixel_mask
from replan.testing.inpaint import save_tiny_flux_fill, save_tiny_sd_inpaint

SIZE = (256, 192)  # (W, H)


def make_image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


def rect():
    m = np.zeros((SIZE[1], SIZE[0]), bool)
    m[10:60, 10:70] = True
    return m


def disk():
    yy, xx = np.mgrid[: SIZE[1], : SIZE[0]]
    return (xx - 60) ** 2 + (yy - 50) ** 2 <= 35**2


def l_shape():
    m = np.zeros((SIZE[1], SIZE[0]), bool)
    m[5:90, 5:30] = True
    m[70:90, 5:120] = True
    return m


def patch_grid():  # a region generator's 16x16 patch grid (probabilities), resized to the image by the editor
    g = np.zeros((16, 16), np.float32)
    g[1:5, 1:6] = 0.9
    return g


@pytest.fixture(scope="module", params=["sd", "flux_fill"])
def editor(request, tmp_path_factory):
    save = save_tiny_sd_inpaint if request.param == "sd" else save_tiny_flux_fill
    ed = MaskEditor.from_pretrained(str(save(tmp_path_factory.mktemp(request.param))), device="cpu")
    ed.kw = {"max_sequence_length": 16} if ed.flow else {}
    return ed


def test_loaded_pipeline_class(editor):
    assert type(editor.pipe).__name__ == ("FluxFillPipeline" if editor.flow else "StableDiffusionInpaintPipeline")


@pytest.mark.parametrize("mask_fn", [rect, disk, l_shape, patch_grid])
def test_blending_keeps_outside_latents_exactly(editor, mask_fn):
    image = make_image()
    res = editor.edit(image, mask_fn(), "a dog", steps=3, seed=0, **editor.kw)
    lat, z0, lm = res.extras["latents"], res.extras["source_latents"], res.latent_mask
    assert res.image.size == image.size and res.mask.shape == (SIZE[1], SIZE[0])
    assert lm.any() and (~lm).any()
    outside = ~lm
    assert torch.equal(lat[0][:, outside], z0[0][:, outside]), "outside the mask the result is exactly z_0"
    assert (lat[0][:, lm] - z0[0][:, lm]).abs().amax() > 1e-3, "inside the mask is regenerated"
    # pixel mask → latent mask rounds outward: every masked pixel lies in a masked latent cell
    f = editor.pipe.vae_scale_factor
    up = lm.repeat_interleave(f, 0).repeat_interleave(f, 1).numpy()
    assert not (to_pixel_mask(mask_fn(), SIZE) & ~up).any()


def test_without_blending_outside_changes(editor):
    image = make_image()
    res = editor.edit(image, rect(), "a dog", steps=3, seed=0, blend=False, **editor.kw)
    z0 = editor.encode(image, res.generation_size)
    outside = ~res.latent_mask
    assert (res.extras["latents"][0][:, outside] - z0[0][:, outside]).abs().amax() > 1e-2


def test_blended_pixels_follow_the_vae_round_trip_better(editor):
    """Far from the mask the blended output is the input's VAE round-trip up to the decoder's GroupNorm statistics
    (global in a VAE decoder, so not exact with random weights); without blending it is unrelated."""
    image = make_image()
    rt = np.asarray(editor.round_trip(image), np.float32)
    far = np.zeros((SIZE[1], SIZE[0]), bool)
    far[130:, 170:] = True
    blended = np.asarray(editor.edit(image, rect(), "a dog", steps=3, **editor.kw).image, np.float32)
    free = np.asarray(editor.edit(image, rect(), "a dog", steps=3, blend=False, **editor.kw).image, np.float32)
    assert np.abs(blended - rt)[far].mean() < np.abs(free - rt)[far].mean()


def test_mask_from_a_callable_and_errors(editor):
    seen = []

    def generator(image, prompt):
        seen.append((image.size, prompt))
        return torch.from_numpy(disk())

    res = editor.edit(make_image(), generator, "a cat", steps=1, **editor.kw)
    assert seen == [(SIZE, "a cat")] and np.array_equal(res.mask, disk())
    with pytest.raises(ValueError, match="empty"):
        editor.edit(make_image(), np.zeros((4, 4), bool), "x", steps=1)
    with pytest.raises(ValueError, match="2-D"):
        editor.edit(make_image(), np.zeros((2, 3, 4), bool), "x", steps=1)


def test_seeded_runs_are_deterministic(editor):
    a = editor.edit(make_image(), disk(), "a dog", steps=2, seed=3, **editor.kw).image
    b = editor.edit(make_image(), disk(), "a dog", steps=2, seed=3, **editor.kw).image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_latent_mask_is_outward():
    m = np.zeros((64, 64), bool)
    m[9, 9] = True
    lm = latent_mask(m, (8, 8))
    assert lm.sum() == 1 and lm[1, 1]


def test_unsupported_pipeline_is_refused():
    with pytest.raises(ValueError, match="StableDiffusionInpaintPipeline"):
        MaskEditor(object())
