"""Box → patches (§2.3), token layout and group membership, and dense mask == BlockMask for random layouts."""

import random

import pytest
import torch
import torch.nn.functional as F

from replan.attention import (
    GroupMembership,
    RuleSet,
    TokenLayout,
    additive_mask,
    block_mask,
    default_rules,
    dense_mask,
    materialize_block_mask,
)
from replan.backbones.flux_kontext import kontext_resolution
from replan.coords import box_to_patch_range, expand_box


def test_official_worked_example_625_patches():
    size = (800, 600)
    expanded = expand_box([100, 50, 300, 250], size, 0.15, "ratio")
    assert expanded == (70, 20, 330, 280)
    gen = kontext_resolution(size)
    assert gen == (1184, 880)
    grid = (gen[1] // 16, gen[0] // 16)
    assert grid == (55, 74)
    r0, r1, c0, c1 = box_to_patch_range(expanded, size, grid)
    assert (r0, r1, c0, c1) == (1, 26, 6, 31)
    layout = TokenLayout.build(512, [512], grid, [grid]).with_box_regions([expanded], size)
    assert int(layout.region_token_mask(1, ("noise",)).sum()) == 625
    assert int(layout.region_token_mask(1).sum()) == 1250  # noise and reference copies


def test_expand_pixels_mode_and_clamping():
    assert expand_box([10, 10, 50, 40], (60, 45), 20, "pixels") == (0, 0, 60, 45)
    assert expand_box([10.9, 10.2, 50.7, 40.1], (100, 100), 0.0) == (10, 10, 50, 40)  # int() truncation
    with pytest.raises(ValueError, match="zero area"):
        expand_box([10, 10, 10, 40], (60, 45), 0.1)
    with pytest.raises(ValueError, match="expand mode"):
        expand_box([0, 0, 5, 5], (60, 45), 0.1, "percent")


def test_layout_positions_and_membership():
    layout = TokenLayout.build(10, [3, 4], (2, 3), [(2, 3)], image_prompt=(2, 6)).with_box_regions(
        [(0, 0, 16, 16), (8, 8, 48, 32)], (48, 32)
    )
    assert layout.text_len == 17 and layout.total_len == 17 + 12
    names, member = layout.membership()
    col = {n: i for i, n in enumerate(names)}
    assert member[:2, col["Main Prompt"]].all() and not member[2:6, col["Main Prompt"]].any()
    assert member[2:6, col["Image Prompt"]].all() and member[6:10, col["Main Prompt"]].all()
    assert member[10:13, col["Hint 1"]].all() and member[13:17, col["Hint 2"]].all()
    noise = slice(17, 23)
    assert member[noise, col["Noise BBox 1"]].tolist() == [True, False, False, False, False, False]
    assert member[noise, col["Noise BBox 2"]].tolist() == [True, True, True, True, True, True]
    assert not member[noise, col["Noise Background"]].any()
    assert member[23:29, col["Image BBox 2"]].all()
    assert member.sum(1).min() >= 1  # every token belongs somewhere


def test_box_on_selected_grids_only():
    layout = TokenLayout.build(4, [2], (2, 2), [(2, 2), (3, 3)])
    layout = layout.with_box_regions([(0, 0, 32, 32)], (32, 32), grids=[0, 1])
    names, member = layout.membership()
    second_ref = slice(4 + 2 + 4 + 4, layout.total_len)
    assert member[second_ref, names.index("Image Background")].all()


def test_layout_errors():
    with pytest.raises(ValueError, match="at least one token"):
        TokenLayout.build(4, [0], (2, 2))
    with pytest.raises(ValueError, match="inside the main prompt"):
        TokenLayout.build(4, [2], (2, 2), image_prompt=(3, 9))
    layout = TokenLayout.build(4, [2], (2, 2))
    with pytest.raises(ValueError, match="region masks"):
        layout.membership()
    with pytest.raises(ValueError, match="shape"):
        layout.with_mask_regions([[torch.ones(3, 3, dtype=torch.bool)]])


def test_overlap_union_semantics_in_dense_mask():
    layout = TokenLayout.build(2, [1, 1], (1, 3), []).with_box_regions([(0, 0, 32, 16), (16, 0, 48, 16)], (48, 16))
    m = dense_mask(GroupMembership.from_layout(layout), default_rules(2))[0, 0]
    hint1, hint2, left, mid, right = 2, 3, 4, 5, 6
    assert m[mid, hint1] and m[mid, hint2]  # overlap sees both hints
    assert m[left, hint1] and not m[left, hint2] and m[right, hint2] and not m[right, hint1]
    assert not m[0, hint1]  # main never sees hints


def test_stranded_group_is_a_clear_error():
    layout = TokenLayout.build(2, [1], (1, 2), []).with_box_regions([(0, 0, 16, 16)], (32, 16))
    rules = RuleSet.from_dict({"Main, Main": True, "BBox 1, BBox 1": True, "BG, BG": True})
    with pytest.raises(ValueError, match="Hint 1"):
        dense_mask(GroupMembership.from_layout(layout), rules)


def random_layout(rng: random.Random, max_regions: int = 40):
    n = rng.randint(0, max_regions)
    main = rng.choice([0, rng.randint(1, 120)])
    image_prompt = None
    if main > 6 and rng.random() < 0.5:
        a = rng.randint(0, main - 3)
        image_prompt = (a, rng.randint(a + 1, main))
    hints = [rng.randint(1, 12) for _ in range(n)]
    h, w = rng.randint(2, 16), rng.randint(2, 16)
    refs = [(h, w)] if rng.random() < 0.7 else [(rng.randint(2, 10), rng.randint(2, 10))]
    size = (w * 16 + rng.randint(-15, 40), h * 16 + rng.randint(-15, 40))
    boxes = []
    for _ in range(n):
        if rng.random() < 0.3:  # tiny box
            x, y = rng.uniform(0, size[0] - 2), rng.uniform(0, size[1] - 2)
            boxes.append((x, y, x + rng.uniform(0.5, 2), y + rng.uniform(0.5, 2)))
        else:
            x1, x2 = sorted(rng.uniform(0, size[0]) for _ in range(2))
            y1, y2 = sorted(rng.uniform(0, size[1]) for _ in range(2))
            boxes.append((x1, y1, x2 + 1, y2 + 1))
    layout = TokenLayout.build(main or None, hints, (h, w), refs, image_prompt).with_box_regions(boxes, size)
    return n, layout


def random_rules(rng: random.Random, names: list[str]) -> RuleSet:
    pairs = {(g, g) for g in names}
    pairs |= {(q, k) for q in names for k in names if rng.random() < 0.3}
    return RuleSet.from_pairs(pairs, "random")


@pytest.mark.parametrize("seed", range(12))
def test_dense_mask_equals_materialised_block_mask(seed):
    rng = random.Random(seed)
    n, layout = random_layout(rng)
    membership = GroupMembership.from_layout(layout)
    rule_sets = [
        default_rules(n, has_image_prompt=layout.image_prompt is not None, delete_main_prompt=layout.main is None),
        default_rules(n, split=True, noise_bg_attend_noise_bbox=False, delete_main_prompt=layout.main is None,
                      has_image_prompt=layout.image_prompt is not None),
        random_rules(rng, list(membership.names)),
    ]
    for rules in rule_sets:
        dense = dense_mask(membership, rules)[0, 0]
        for bs in (16, 128):
            bm = block_mask(membership, rules, block_size=bs)
            assert torch.equal(materialize_block_mask(bm), dense), (seed, rules.label, bs)


@pytest.mark.parametrize("seed", range(6))
def test_additive_mask_is_the_dense_mask_with_aligned_rows(seed):
    """0 / -inf exactly where the boolean mask says attend / not, in the compute dtype, rows 8-element aligned in
    memory whatever L is (memory-efficient SDPA would copy a misaligned bias on every call), same attention."""
    rng = random.Random(200 + seed)
    n, layout = random_layout(rng, max_regions=12)
    membership = GroupMembership.from_layout(layout)
    rules = default_rules(n, delete_main_prompt=layout.main is None, has_image_prompt=layout.image_prompt is not None)
    L, dense = layout.total_len, dense_mask(membership, rules)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mask = additive_mask(membership, rules, dtype)
        assert mask.dtype == dtype and mask.shape == (1, 1, L, L)
        assert mask.stride(-1) == 1 and all(s % 8 == 0 for s in mask.stride()[:-1]), mask.stride()
        assert mask.untyped_storage().nbytes() == L * (-(-L // 8) * 8) * mask.element_size()
        assert torch.equal(mask == 0, dense) and bool((mask[~dense] == float("-inf")).all())
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(membership, rules))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense))


@pytest.mark.parametrize("seed", range(3))
def test_flex_attention_with_block_mask_equals_sdpa_with_dense_mask(seed):
    from torch.nn.attention.flex_attention import flex_attention

    rng = random.Random(100 + seed)
    n, layout = random_layout(rng, max_regions=12)
    membership = GroupMembership.from_layout(layout)
    rules = default_rules(n, delete_main_prompt=layout.main is None, has_image_prompt=layout.image_prompt is not None)
    L = layout.total_len
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(membership, rules))
    out = flex_attention(q, k, v, block_mask=block_mask(membership, rules, block_size=32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_block_mask_scales_past_the_official_31_group_limit():
    rng = random.Random(7)
    boxes = [(rng.uniform(0, 500), rng.uniform(0, 500)) for _ in range(64)]
    boxes = [(x, y, x + 100, y + 100) for x, y in boxes]
    layout = TokenLayout.build(512, [512] * 64, (40, 40), [(40, 40)]).with_box_regions(boxes, (640, 640))
    membership = GroupMembership.from_layout(layout)
    assert len(membership.names) == 1 + 64 * 3 + 2
    bm = block_mask(membership, default_rules(64))
    assert bm.seq_lengths == (layout.total_len, layout.total_len)
