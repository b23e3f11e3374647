"""The wiring of the learnable-regions objective, pinned: every term ``compute_losses`` reports is recomputed here
from the frozen encoders by hand, in the paper's order (Eq. 1 → 2 → 3, g on F_refined vs g on F_img, I_e of the
proxy edit vs I_ori of the source, T_e vs T_o), and each test also checks that the tempting miswiring gives a value
it would reject — so swapping T_e/T_o, feeding g the fused tokens twice, swapping I_e/I_ori, feeding the structural
loss the source twice, maximising L_CLIP or flipping the REINFORCE sign each fails a test here."""

import copy

import pytest
import torch
import torch.nn.functional as F

from replan.regions.config import TrainConfig
from replan.regions.model import RegionGenerator
from replan.regions.objective import compute_losses
from replan.testing.regions import save_tiny_regions_backbones, shape_image
from tests.test_regions_model import TINY

TEXTS = [{"t_o": "a red square on a white background", "t_ins": "make the square blue",
          "t_e": "a blue square on a white background", "key": "0"},
         {"t_o": "a green circle", "t_ins": "add a small hat", "t_e": "a green circle with a small hat", "key": "1"}]
MARGIN = 1e-3   # how far a miswired value must be from the right one for the test to have teeth
TOL = 1e-5


def dist(a, b):
    """1 − cos, written out."""
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    bb = save_tiny_regions_backbones(tmp_path_factory.mktemp("wiring"))
    torch.manual_seed(0)
    model = RegionGenerator.from_pretrained(str(bb / "clip"), str(bb / "t5"), **TINY)
    pixels = model.preprocess([shape_image("red", "square"), shape_image("green", "circle", offset=3)])
    ref = by_hand(model, pixels)
    with torch.no_grad():  # centre the mask head's logits: about half of the patches in, half out, in each image
        model.head.mlp[-1].bias -= ref["logits"].median()
    return model, pixels


def by_hand(model, pixels, mask=None):
    """Every quantity of one step from the frozen towers, in the paper's order (no call to compute_losses/forward)."""
    h = model.head
    with torch.no_grad():
        vis = model.clip_vision(pixel_values=pixels, output_hidden_states=True)
        f_img = model.clip_vision.visual_projection(model.clip_vision.vision_model.post_layernorm(
            vis.last_hidden_state[:, 1:]))                                          # F_img: projected patches
        tok = model.t5_tokenizer([t["t_ins"] for t in TEXTS], padding=True, return_tensors="pt")
        f_ins = model.t5(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        text = lambda key: model.clip_text(**model.clip_tokenizer(  # noqa: E731
            [t[key] for t in TEXTS], padding=True, return_tensors="pt")).text_embeds
        t_e, t_o = text("t_e"), text("t_o")
    x = h.patch_in(f_img)
    for layer in h.cross:                       # Eq. 1: queries = patches, keys/values = instruction tokens
        x = layer(x, h.ins_in(f_ins), tok.attention_mask == 0)
    for layer in h.self_attn:                   # Eq. 2
        x = layer(x)
    logits = h.mlp(x).squeeze(-1)               # Eq. 3
    probs = torch.sigmoid(logits)
    out = {"f_img": f_img, "refined": x, "logits": logits, "probs": probs, "t_e": t_e, "t_o": t_o,
           "i_ori": vis.image_embeds, "h_src": vis.hidden_states[-2],
           "g_fused": h.g(x), "g_source": h.g(h.patch_in(f_img))}
    if mask is not None:                        # the proxy edit on a (B, N) mask, nearest-upsampled by hand
        side, s = model.grid, model.cfg.image_size // model.grid
        up = mask.view(-1, 1, side, side).repeat_interleave(s, 2).repeat_interleave(s, 3)
        gen = (model.to_unit(pixels).roll(1, dims=1) - model.mean) / model.std   # the offline generator
        proxy = up * gen + (1 - up) * pixels
        edit = model.clip_vision(pixel_values=proxy, output_hidden_states=True)
        out.update(i_e=edit.image_embeds, h_edit=edit.hidden_states[-2])
    return out


def cfg(model, **loss) -> TrainConfig:
    c = TrainConfig(model=copy.deepcopy(model.cfg))
    for k, v in loss.items():
        setattr(c.loss, k, v)
    return c


def offline_gen(model, pixels):
    return ((model.to_unit(pixels).roll(1, dims=1) - model.mean) / model.std).detach()


def test_semantic_alignment_pairs_fused_with_target_and_source_with_source(setup):
    model, pixels = setup
    terms = compute_losses(model, model.head, cfg(model, beta=0.0), pixels, TEXTS, None)
    ref = by_hand(model, pixels)
    want_e, want_o = dist(ref["g_fused"], ref["t_e"]), dist(ref["g_source"], ref["t_o"])   # Eqs. 4 and 5
    assert torch.allclose(terms["sa_e"], want_e.mean(), atol=TOL)
    assert torch.allclose(terms["sa_o"], want_o.mean(), atol=TOL)
    assert torch.allclose(terms["loss"], (want_e + want_o).mean(), atol=TOL)
    # what the miswirings would report instead: T_e/T_o swapped, and g(F_refined) used for both terms
    assert abs(dist(ref["g_fused"], ref["t_o"]).mean() - want_e.mean()) > MARGIN
    assert abs(dist(ref["g_source"], ref["t_e"]).mean() - want_o.mean()) > MARGIN
    assert abs(dist(ref["g_fused"], ref["t_o"]).mean() - want_o.mean()) > MARGIN


def test_clip_terms_use_the_edit_against_the_source(setup):
    model, pixels = setup
    terms = compute_losses(model, model.head, cfg(model), pixels, TEXTS, offline_gen(model, pixels))
    hard = (by_hand(model, pixels)["probs"] > model.cfg.theta).float()
    assert 0 < hard.mean() < 1, "the test needs a mask that is neither empty nor full"
    ref = by_hand(model, pixels, hard)
    clip = dist(ref["i_e"], ref["t_e"])                                                  # Eq. 7
    n = lambda v: F.normalize(v, dim=-1)  # noqa: E731
    direction = dist(n(ref["i_e"]) - n(ref["i_ori"]), n(ref["t_e"]) - n(ref["t_o"]))      # Eq. 8
    sim = lambda t: n(t) @ n(t).transpose(-1, -2)  # noqa: E731
    struct = ((sim(ref["h_edit"]) - sim(ref["h_src"])) ** 2).mean((-1, -2))               # Eq. 9 (mean)
    for key, want in (("clip", clip), ("dir", direction), ("struct", struct)):
        assert torch.allclose(terms[key], want.mean(), atol=TOL), key
    assert torch.allclose(terms["clip_total"], (clip + direction + struct).mean(), atol=TOL)
    # the miswirings: I_ori in place of I_e, I_e and I_ori swapped (reverses the image direction), T_o for T_e,
    # the source's tokens on both sides of Eq. 9 (always 0)
    assert abs(dist(ref["i_ori"], ref["t_e"]).mean() - clip.mean()) > MARGIN
    assert abs(dist(ref["i_e"], ref["t_o"]).mean() - clip.mean()) > MARGIN
    assert (direction - 1).abs().mean() > MARGIN   # swapping I_e/I_ori gives 2 − direction
    assert struct.mean() > MARGIN


def test_clip_loss_is_minimised_through_the_straight_through_mask(setup):
    """∂L/∂(mask-head bias) = β Σ ∂L_CLIP/∂M · P(1 − P): L_sa does not reach the bias, so the sign of this gradient
    is the sign of the CLIP term; a maximised L_CLIP flips it (and the value)."""
    model, pixels = setup
    head = copy.deepcopy(model.head)
    beta = 0.7
    terms = compute_losses(model, head, cfg(model, beta=beta), pixels, TEXTS, offline_gen(model, pixels))
    terms["loss"].backward()
    got = head.mlp[-1].bias.grad.clone()
    probs = by_hand(model, pixels)["probs"].detach()
    mask = (probs > model.cfg.theta).float().requires_grad_(True)
    ref = by_hand(model, pixels, mask)
    n = lambda v: F.normalize(v, dim=-1)  # noqa: E731
    sim = lambda t: n(t) @ n(t).transpose(-1, -2)  # noqa: E731
    clip_total = (dist(ref["i_e"], ref["t_e"]) + dist(n(ref["i_e"]) - n(ref["i_ori"]), n(ref["t_e"]) - n(ref["t_o"]))
                  + ((sim(ref["h_edit"]) - sim(ref["h_src"])) ** 2).mean((-1, -2))).mean()
    (d_mask,) = torch.autograd.grad(clip_total, mask)
    want = beta * (d_mask * probs * (1 - probs)).sum()
    assert want.abs() > MARGIN and torch.allclose(got, want.view(1), rtol=1e-3, atol=1e-6)
    sa = terms["sa"]
    assert torch.allclose(terms["loss"], sa + beta * clip_total.detach(), atol=TOL)   # + β L_CLIP, not −


@pytest.mark.parametrize("baseline", ["auto", "running"])
def test_reinforce_gradient_has_the_descent_sign(setup, baseline):
    """∂/∂(bias) of the surrogate = β/B Σ_b (c_b − b_b) Σ_i (m_bi − P_bi) with the leave-one-out baseline (auto,
    B = 2) or the running one (no history yet: 0); a flipped sign gives the negative."""
    from replan.regions.losses import RunningBaseline

    model, pixels = setup
    head = copy.deepcopy(model.head)
    terms = compute_losses(model, head, cfg(model, mask_grad="reinforce", baseline=baseline), pixels, TEXTS,
                           offline_gen(model, pixels), rng=torch.Generator().manual_seed(5), running=RunningBaseline())
    terms["loss"].backward()
    probs = by_hand(model, pixels)["probs"].detach()
    sample = (torch.rand(probs.shape, generator=torch.Generator().manual_seed(5)) < probs).float()  # Bernoulli(P)
    ref = by_hand(model, pixels, sample)
    n = lambda v: F.normalize(v, dim=-1)  # noqa: E731
    sim = lambda t: n(t) @ n(t).transpose(-1, -2)  # noqa: E731
    cost = (dist(ref["i_e"], ref["t_e"]) + dist(n(ref["i_e"]) - n(ref["i_ori"]), n(ref["t_e"]) - n(ref["t_o"]))
            + ((sim(ref["h_edit"]) - sim(ref["h_src"])) ** 2).mean((-1, -2))).detach()
    b = cost.flip(0) if baseline == "auto" else torch.zeros(2)
    want = ((cost - b) * (sample - probs).sum(1)).mean()
    assert want.abs() > MARGIN and torch.allclose(head.mlp[-1].bias.grad, want.view(1), rtol=1e-3, atol=1e-6)
