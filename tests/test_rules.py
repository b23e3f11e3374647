"""Rule tables of replan-spec §2.5, options, names, and the step schedule of §2.6."""

import pytest

from replan.attention.rules import (
    RuleSchedule,
    RuleSet,
    canonical_name,
    custom_schedule,
    default_rules,
    default_schedule,
    switch_step,
)

Y, N = True, False


def table(rules: RuleSet, names: list[str]) -> list[list[bool]]:
    return rules.matrix(names).tolist()


def logical_table(rules: RuleSet, names: list[str]) -> list[list[bool]]:
    return [[rules.allows(q, k) for k in names] for q in names]


def test_non_split_defaults_two_regions_flux():
    rules = default_rules(2)
    names = ["Main Prompt", "Hint 1", "Hint 2", "BBox 1", "BBox 2", "Background"]
    assert logical_table(rules, names) == [
        [Y, N, N, Y, Y, Y],
        [N, Y, N, Y, Y, Y],
        [N, N, Y, Y, Y, Y],
        [Y, Y, N, Y, Y, Y],
        [Y, N, Y, Y, Y, Y],
        [Y, N, N, Y, Y, Y],
    ]


def test_split_noise_isolation_one_region_flux():
    rules = default_rules(1, split=True, noise_bg_attend_noise_bbox=False)
    names = ["Main Prompt", "Hint 1", "Noise BBox 1", "Image BBox 1", "Noise Background", "Image Background"]
    assert table(rules, names) == [
        [Y, N, Y, Y, Y, Y],
        [N, Y, Y, Y, Y, Y],
        [Y, Y, Y, Y, Y, Y],
        [Y, Y, Y, Y, Y, Y],
        [Y, N, N, Y, Y, Y],
        [Y, N, Y, Y, Y, Y],
    ]
    assert rules.label == "noise-isolation"


def test_split_defaults_equal_expanded_non_split():
    names = ["Main Prompt", "Hint 1", "Hint 2", "Noise BBox 1", "Noise BBox 2", "Image BBox 1", "Image BBox 2",
             "Noise Background", "Image Background"]
    assert table(default_rules(2, split=True), names) == table(default_rules(2), names)


def test_qwen_image_prompt_row_and_column_all_allowed():
    rules = default_rules(2, has_image_prompt=True)
    names = ["Main Prompt", "Image Prompt", "Hint 1", "Hint 2", "BBox 1", "BBox 2", "Background"]
    t = logical_table(rules, names)
    assert t[1] == [Y] * 7 and [row[1] for row in t] == [Y] * 7
    without = logical_table(default_rules(2), ["Main Prompt", "Hint 1", "Hint 2", "BBox 1", "BBox 2", "Background"])
    assert [row[:1] + row[2:] for row in t[:1] + t[2:]] == without


def test_options_delete_main_symmetric_and_isolated_boxes():
    r = default_rules(2, delete_main_prompt=True)
    assert not any("Main Prompt" in pair for pair in r.allowed)
    s = default_rules(2, symmetric_masking=True)
    assert s.allows("Hint 1", "BBox 1") and not s.allows("Hint 1", "BBox 2") and not s.allows("Hint 1", "Background")
    assert default_rules(2).allows("Hint 1", "BBox 2")  # non-symmetric: a hint sees every image patch
    iso = default_rules(2, bboxes_attend_to_each_other=False)
    assert not iso.allows("BBox 1", "BBox 2")
    assert iso.allows("BBox 1", "Background") and iso.allows("Background", "BBox 2")
    assert iso.allows("BBox 1", "BBox 1")


def test_never_allowed_pairs():
    r = default_rules(3)
    for i in range(1, 4):
        assert not r.allows("Main Prompt", f"Hint {i}") and not r.allows(f"Hint {i}", "Main Prompt")
        assert not r.allows("Background", f"Hint {i}")
        for j in range(1, 4):
            if i != j:
                assert not r.allows(f"Hint {i}", f"Hint {j}") and not r.allows(f"BBox {i}", f"Hint {j}")


def test_names_and_short_labels():
    assert canonical_name("N.B3") == "Noise BBox 3"
    assert canonical_name("imgp") == "Image Prompt"
    assert canonical_name("  hint   12 ") == "Hint 12"
    assert canonical_name("BG") == "Background"
    assert canonical_name("noise bbox 2") == "Noise BBox 2"
    for bad in ["Hint", "Hint 0", "Bbox x", "Foreground", ""]:
        with pytest.raises(ValueError, match="unknown attention group"):
            canonical_name(bad)


def test_custom_rules_from_dict_and_back():
    r = RuleSet.from_dict({"Main, N.B1": True, "H1|I.B1": True, "N.BG -> N.B1": False, ("Hint 1", "Hint 1"): True})
    assert r.allows("Main Prompt", "Noise BBox 1") and r.allows("Hint 1", "Image BBox 1")
    assert not r.allows("Noise Background", "Noise BBox 1")
    names = ["Main Prompt", "Hint 1", "Noise BBox 1", "Image BBox 1", "Noise Background", "Image Background"]
    assert RuleSet.from_dict(r.to_dict(names)).matrix(names).equal(r.matrix(names))
    with pytest.raises(ValueError, match="query and a key"):
        RuleSet.from_dict({"Main": True})
    with pytest.raises(ValueError, match="true or false"):
        RuleSet.from_dict({"Main, Main": "yes"})
    with pytest.raises(ValueError, match="unknown attention group"):
        RuleSet.from_dict({"Main, Hint one": True})


def test_table_rendering():
    names = ["Main Prompt", "Hint 1", "Noise BBox 1", "Image BBox 1", "Noise Background", "Image Background"]
    text = default_rules(1).table(names)
    assert "| q \\ k | Main | H1 | N.B1 | I.B1 | N.BG | I.BG |" in text
    assert "| H1 | ✗ | ✓ | ✓ | ✓ | ✓ | ✓ |" in text


@pytest.mark.parametrize(
    "value, steps, expected",
    [(0.05, 28, 1), (0.0, 28, 0), (0.5, 50, 25), (0.7, 50, 35), (1.0, 50, 50), (3, 28, 3), (99, 28, 28), (1.5, 28, 1)],
)
def test_switch_step_official_clamping(value, steps, expected):
    assert switch_step(value, steps) == expected


def test_switch_step_rejects_negative():
    with pytest.raises(ValueError):
        switch_step(-0.1, 10)


def test_default_schedule():
    s = default_schedule(2, 50, 0.7)
    assert [s.at(i).label for i in (0, 34, 35, 49)] == ["noise-isolation", "noise-isolation", "default", "default"]
    only_after = default_schedule(2, 28, 0.0)
    assert len(only_after.phases) == 1 and only_after.at(0).label == "default"
    assert default_schedule(1, 28, 0.05).phases[1][0] == 1  # CLI flux: isolation on step 0 only


def test_custom_schedule_modes():
    custom = RuleSet.from_dict({"Main, Main": True}, label="mine")
    assert custom_schedule(custom, 1, 10).phases == ((0, custom),)
    s = custom_schedule(custom, 1, 10, switch=0.3)
    assert s.at(2).label == "mine" and s.at(3) == default_rules(1, split=True)


def test_schedule_validation():
    with pytest.raises(ValueError):
        RuleSchedule(((1, default_rules(1)),))


def reference_rules(n, delete_main_prompt=False, bboxes_attend_to_each_other=True, has_image_prompt=False,
                    symmetric_masking=False, split=False, noise_bg_attend_noise_bbox=True) -> set:
    """replan-spec §2.5 spelled out pair by pair, over split names (the official enumeration)."""
    hints = [f"Hint {i}" for i in range(1, n + 1)]
    boxes = [f"BBox {i}" for i in range(1, n + 1)]
    image = boxes + ["Background"]
    comps = (["Main Prompt"] if not delete_main_prompt else []) + (["Image Prompt"] if has_image_prompt else [])
    comps += hints + image
    pairs = {(c, c) for c in comps}
    if has_image_prompt:
        pairs |= {("Image Prompt", c) for c in comps} | {(c, "Image Prompt") for c in comps}
    if bboxes_attend_to_each_other:
        pairs |= {(q, k) for q in image for k in image}
    else:
        pairs |= {(q, "Background") for q in image} | {("Background", k) for k in image}
    if not delete_main_prompt:
        pairs |= {(q, "Main Prompt") for q in image} | {("Main Prompt", q) for q in image}
    for h, b in zip(hints, boxes):
        pairs |= {(b, h)} | ({(h, b)} if symmetric_masking else {(h, k) for k in image})

    def split_of(name):
        if name == "Background":
            return ["Noise Background", "Image Background"]
        if name.startswith("BBox "):
            return [f"Noise {name}", f"Image {name}"]
        return [name]

    out = {(qs, ks) for q, k in pairs for qs in split_of(q) for ks in split_of(k)}
    if split and not noise_bg_attend_noise_bbox:
        out -= {("Noise Background", f"Noise BBox {i}") for i in range(1, n + 1)}
    return out


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("options", [
    {}, {"split": True, "noise_bg_attend_noise_bbox": False}, {"has_image_prompt": True},
    {"delete_main_prompt": True, "symmetric_masking": True}, {"bboxes_attend_to_each_other": False, "split": True},
    {"has_image_prompt": True, "split": True, "noise_bg_attend_noise_bbox": False, "symmetric_masking": True},
])
def test_wildcard_defaults_equal_the_pair_by_pair_rules(n, options):
    rules = default_rules(n, **options)
    names = (["Main Prompt"] if not options.get("delete_main_prompt") else []) + (
        ["Image Prompt"] if options.get("has_image_prompt") else [])
    names += [f"Hint {i}" for i in range(1, n + 1)] + [f"Noise BBox {i}" for i in range(1, n + 1)]
    names += [f"Image BBox {i}" for i in range(1, n + 1)] + ["Noise Background", "Image Background"]
    expected = reference_rules(n, **options)
    want = [[(q, k) in expected for k in names] for q in names]
    assert table(rules, names) == want


def test_default_rules_stay_linear_in_the_region_count():
    """A 1000-region plan's rules are O(regions) pairs (official: O(regions²), a minute and gigabytes)."""
    schedule = default_schedule(1000, 28, 0.05)
    assert all(len(r.allowed) < 12 * 1000 for r in schedule.rule_sets)
    names = ["Hint 7", "Noise BBox 7", "Noise BBox 900", "Image BBox 3", "Noise Background", "Image Background"]
    after, before = schedule.at(27), schedule.at(0)
    assert table(after, names) == [
        [Y, Y, Y, Y, Y, Y],
        [Y, Y, Y, Y, Y, Y],
        [N, Y, Y, Y, Y, Y],  # box 900 does not see hint 7
        [N, Y, Y, Y, Y, Y],
        [N, Y, Y, Y, Y, Y],
        [N, Y, Y, Y, Y, Y],
    ]
    assert table(before, names)[4] == [N, N, N, Y, Y, Y]  # noise isolation: N.BG sees no noise box


def test_wildcard_names_in_custom_rules():
    assert canonical_name("N.B*") == "Noise BBox *" and canonical_name("hint *") == "Hint *"
    r = RuleSet.from_dict({"BBox *, BBox *": True, "H*, H*": True, "Main, Main": True, "B2, H2": True})
    assert r.allows("BBox 3", "BBox 1") and r.allows("Hint 4", "Hint 1") and r.allows("BBox 2", "Hint 2")
    assert not r.allows("BBox 1", "Hint 2")
    names = ["Main Prompt", "Hint 1", "Hint 2", "Noise BBox 1", "Image BBox 2", "Noise Background"]
    assert table(r, names) == [
        [Y, N, N, N, N, N],
        [N, Y, Y, N, N, N],
        [N, Y, Y, N, N, N],
        [N, N, N, Y, Y, N],
        [N, N, Y, Y, Y, N],
        [N, N, N, N, N, N],
    ]
