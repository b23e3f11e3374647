"""Adaptive region partition on hand-built latents, morphology by hand, and the plan's token set."""

import pytest
import torch

from replan.accel import (
    adaptive_partition,
    dilate_square,
    erode_cross,
    one_step_estimate,
    plan_token_mask,
    token_cosine,
    token_ids,
)

BG, FG = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]


def grid_latent(h, w, cells):
    """(1, h·w, 4): every token BG except ``cells[(r, c)] = vector``."""
    x = torch.tensor(BG).repeat(h * w, 1)
    for (r, c), vec in cells.items():
        x[r * w + c] = torch.tensor(vec)
    return x[None]


def as_grid(mask, h, w):
    return mask.reshape(h, w).int().tolist()


def test_partition_of_a_hand_built_latent():
    h = w = 6
    block = {(r, c): FG for r in range(1, 4) for c in range(1, 4)}  # a 3x3 edited block …
    cells = {**block, (5, 5): FG, (0, 5): [1.0, 1.0, 0.0, 0.0]}  # … an isolated speck, a token at cos 1/√2
    estimate, reference = grid_latent(h, w, cells), grid_latent(h, w, {})
    raw = adaptive_partition(estimate, reference, (h, w), 0.5, erosion_dilation=False)
    expected_raw = [[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0],
                    [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]
    assert as_grid(raw, h, w) == expected_raw
    # cos 1/√2 ≈ 0.707 is edited at τ 0.8, not at 0.7 (cos <= τ is edited)
    assert bool(adaptive_partition(estimate, reference, (h, w), 0.8, False)[5])
    assert not bool(adaptive_partition(estimate, reference, (h, w), 0.7, False)[5])
    # erosion by the cross keeps only the block's centre (2, 2); the speck goes; the 5x5 dilation grows it back to
    # rows 0..4 x cols 0..4
    cleaned = adaptive_partition(estimate, reference, (h, w), 0.8, erosion_dilation=True)
    expected = [[1, 1, 1, 1, 1, 0]] * 5 + [[0, 0, 0, 0, 0, 0]]
    assert as_grid(cleaned, h, w) == expected
    assert token_ids(cleaned).tolist() == [r * 6 + c for r in range(5) for c in range(5)]


def test_morphology_by_hand():
    full4 = torch.ones(4, 4, dtype=torch.bool)
    interior = torch.zeros(4, 4, dtype=torch.bool)
    interior[1:3, 1:3] = True
    assert torch.equal(erode_cross(full4), interior)  # zero padding erodes the border
    assert torch.equal(dilate_square(interior, 2), full4)
    assert not erode_cross(torch.ones(2, 2, dtype=torch.bool)).any()  # nothing survives on a 2x2 grid
    band = torch.zeros(6, 6, dtype=torch.bool)
    band[2:4] = True  # a two-token-thin band vanishes
    assert not erode_cross(band).any()
    plus = torch.zeros(5, 5, dtype=torch.bool)
    plus[2, 1:4] = True
    plus[1:4, 2] = True
    assert erode_cross(plus).nonzero().tolist() == [[2, 2]]
    one = torch.zeros(7, 7, dtype=torch.bool)
    one[0, 6] = True
    grown = dilate_square(one, 2)
    assert grown.nonzero().tolist() == [[r, c] for r in range(3) for c in range(4, 7)]
    assert torch.equal(dilate_square(one, 0), one)


def test_one_step_estimate_and_cosine():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    v = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    assert one_step_estimate(x, v, 0.4).flatten().tolist() == pytest.approx([0.8, 2.4, 2.2, 4.0])
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[2.0, 0.0], [-1.0, -1.0]]])
    assert token_cosine(a, b).tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match="generated at the reference image's size"):
        token_cosine(a, b[:, :1])
    with pytest.raises(ValueError, match="do not form the 3x3 grid"):
        adaptive_partition(a, b, (3, 3), 0.5)


def test_plan_token_mask():
    # 200x150 image on a 3x4 grid (a 64x48 generation frame): scale 0.32 in both axes
    grid = (3, 4)
    box = (100, 75, 150, 100)  # → cols floor(2.0)..ceil(3.0) = 2, rows floor(1.5)..ceil(2.0) = 1
    mask = plan_token_mask([box], None, (200, 150), grid)
    assert as_grid(mask, 3, 4) == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    grown = plan_token_mask([box], None, (200, 150), grid, margin=1)
    assert as_grid(grown, 3, 4) == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    pixel = torch.zeros(150, 200, dtype=torch.bool)
    pixel[149, 199] = True  # the last pixel: a region mask is used instead of its box
    both = plan_token_mask([box, (0, 0, 200, 150)], [None, pixel.numpy()], (200, 150), grid)
    assert as_grid(both, 3, 4) == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert not plan_token_mask([], None, (200, 150), grid).any()
