"""Attention rules between token groups: defaults, custom matrices and the step schedule (replan-spec §2.4–2.6).

A ``RuleSet`` is the set of allowed ``(query group, key group)`` pairs; anything not listed is blocked. Names are
logical (``Main Prompt``, ``Image Prompt``, ``Hint i``, ``BBox i``, ``Background``) or split (``Noise BBox i``,
``Image BBox i``, ``Noise Background``, ``Image Background``); a logical image name stands for both of its split
names, so a token inherits every permission of every group it belongs to (union semantics, as official).
The demo's short labels (``Main``, ``ImgP``, ``H1``, ``N.B1``, ``I.B1``, ``B1``, ``N.BG``, ``I.BG``, ``BG``) are
accepted wherever a name is. ``*`` in place of an index (``Hint *``, ``BBox *``, ``N.B*``) names every region's group
of that kind, so the default rules stay O(regions) pairs — a 1000-region plan's rules build in milliseconds, not in
a minute and gigabytes of pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from replan.attention.layout import IMAGE_BG, IMAGE_PROMPT, MAIN, NOISE_BG

_FIXED = {
    "main": MAIN, "main prompt": MAIN, "imgp": IMAGE_PROMPT, "image prompt": IMAGE_PROMPT,
    "bg": "Background", "background": "Background",
    "n.bg": NOISE_BG, "noise background": NOISE_BG, "i.bg": IMAGE_BG, "image background": IMAGE_BG,
}
_INDEXED = [  # (lower-case pattern, canonical template)
    (re.compile(r"^(?:h|hint ?)(\d+|\*)$"), "Hint {}"),
    (re.compile(r"^(?:n\.b|noise bbox ?)(\d+|\*)$"), "Noise BBox {}"),
    (re.compile(r"^(?:i\.b|image bbox ?)(\d+|\*)$"), "Image BBox {}"),
    (re.compile(r"^(?:b|bbox ?)(\d+|\*)$"), "BBox {}"),
]
ANY = "*"


def canonical_name(name: str) -> str:
    """Normalise a group name (long or short label, any case/spacing) or raise ``ValueError``."""
    low = " ".join(str(name).split()).lower()
    if low in _FIXED:
        return _FIXED[low]
    for pattern, template in _INDEXED:
        m = pattern.match(low)
        if m and m.group(1) == ANY:
            return template.format(ANY)
        if m and int(m.group(1)) >= 1:
            return template.format(int(m.group(1)))
    raise ValueError(
        f"unknown attention group {name!r}: use Main Prompt, Image Prompt, Hint i, BBox i, Noise BBox i, "
        "Image BBox i, Background, Noise Background or Image Background (or Main, ImgP, Hi, Bi, N.Bi, I.Bi, BG, "
        "N.BG, I.BG; * for every i)"
    )


def wildcard(name: str) -> str:
    """``Hint 3`` → ``Hint *`` (any indexed name → its every-region form); other names unchanged."""
    head, _, tail = name.rpartition(" ")
    return f"{head} {ANY}" if head and (tail.isdigit() or tail == ANY) else name


def expand_to_split(name: str) -> list[str]:
    """``BBox i`` → ``[Noise BBox i, Image BBox i]``; ``Background`` → both backgrounds; others unchanged."""
    if name == "Background":
        return [NOISE_BG, IMAGE_BG]
    if name.startswith("BBox "):
        i = name.split()[1]
        return [f"Noise BBox {i}", f"Image BBox {i}"]
    return [name]


@dataclass(frozen=True)
class RuleSet:
    """Allowed (query, key) group pairs. Hashable, so masks can be cached per rule set."""

    allowed: frozenset[tuple[str, str]]
    label: str = "custom"

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], label: str = "custom") -> RuleSet:
        return cls(frozenset((canonical_name(q), canonical_name(k)) for q, k in pairs), label)

    @classmethod
    def from_dict(cls, rules: Mapping, label: str = "custom") -> RuleSet:
        """From ``{"Query, Key": bool}`` (also ``"Query|Key"``, ``"Query->Key"`` or ``(query, key)`` keys)."""
        pairs = []
        for key, value in rules.items():
            if isinstance(key, str):
                parts = re.split(r"\s*(?:\||->|→|,)\s*", key.strip())
                if len(parts) != 2:
                    raise ValueError(f"rule key {key!r} must name a query and a key group, e.g. 'Hint 1, BBox 1'")
                q, k = parts
            else:
                q, k = key
            if not isinstance(value, bool):
                raise ValueError(f"rule {key!r} must be true or false, got {value!r}")
            if value:
                pairs.append((q, k))
        return cls.from_pairs(pairs, label)

    def to_dict(self, groups: Sequence[str] | None = None) -> dict[str, bool]:
        """``{"Query, Key": bool}``; over the given split groups (full matrix) or just the allowed pairs."""
        if groups is None:
            return {f"{q}, {k}": True for q, k in sorted(self.allowed)}
        m = self.matrix(groups)
        return {f"{q}, {k}": bool(m[a, b]) for a, q in enumerate(groups) for b, k in enumerate(groups)}

    def matrix(self, groups: Sequence[str]) -> torch.Tensor:
        """Boolean ``(G, G)`` matrix over split group names; pairs naming absent groups are ignored."""
        by_name: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_name.setdefault(g, []).append(i)
            if wildcard(g) != g:
                by_name.setdefault(wildcard(g), []).append(i)
        split: dict[str, torch.Tensor] = {}
        for name in {n for pair in self.allowed for n in pair}:
            split[name] = torch.tensor([i for s in expand_to_split(name) for i in by_name.get(s, ())],
                                       dtype=torch.long)
        m = torch.zeros(len(groups), len(groups), dtype=torch.bool)
        for q, k in self.allowed:
            rows, cols = split[q], split[k]
            if rows.numel() and cols.numel():
                m[rows[:, None], cols[None, :]] = True
        return m

    def allows(self, query: str, key: str) -> bool:
        q, k = canonical_name(query), canonical_name(key)
        return any(pair in self.allowed for pair in ((q, k), (wildcard(q), k), (q, wildcard(k)),
                                                      (wildcard(q), wildcard(k))))

    def table(self, groups: Sequence[str]) -> str:
        """A ✓/✗ markdown table (query rows → key columns) over split groups, for logs and reports."""
        m = self.matrix(groups)
        head = "| q \\ k | " + " | ".join(short_label(g) for g in groups) + " |"
        rows = [head, "|" + "---|" * (len(groups) + 1)]
        for a, g in enumerate(groups):
            rows.append(f"| {short_label(g)} | " + " | ".join("✓" if v else "✗" for v in m[a].tolist()) + " |")
        return "\n".join(rows)


def short_label(name: str) -> str:
    """The demo's short label of a group name."""
    for long, short in ((MAIN, "Main"), (IMAGE_PROMPT, "ImgP"), (NOISE_BG, "N.BG"), (IMAGE_BG, "I.BG"),
                        ("Background", "BG")):
        if name == long:
            return short
    kind, i = name.rsplit(" ", 1)
    return {"Hint": "H", "Noise BBox": "N.B", "Image BBox": "I.B", "BBox": "B"}[kind] + i


def default_rules(
    num_regions: int,
    *,
    delete_main_prompt: bool = False,
    bboxes_attend_to_each_other: bool = True,
    has_image_prompt: bool = False,
    symmetric_masking: bool = False,
    noise_bg_attend_noise_bbox: bool = True,
    split: bool = False,
) -> RuleSet:
    """The official default rules (``generate_default_attention_rules``, replan-spec §2.5).

    Pairs that hold for every region at once are written with ``*`` (``(BBox *, BBox *)``: every box sees every
    box), so the set has O(regions) pairs; ``matrix`` expands them over the groups present."""
    n = num_regions
    hints = [f"Hint {i}" for i in range(1, n + 1)]
    boxes = [f"BBox {i}" for i in range(1, n + 1)]
    image = ([f"BBox {ANY}"] if n else []) + ["Background"]  # the image group, every box as one name
    fixed = ([] if delete_main_prompt else [MAIN]) + ([IMAGE_PROMPT] if has_image_prompt else [])
    comps = fixed + hints + boxes + ["Background"]
    allowed = {(c, c) for c in comps}  # (A) self
    if has_image_prompt:  # (B) the image prompt sees and is seen by everything
        every = fixed + ([f"Hint {ANY}"] if n else []) + image
        allowed |= {(IMAGE_PROMPT, c) for c in every} | {(c, IMAGE_PROMPT) for c in every}
    if bboxes_attend_to_each_other:  # (C) image group
        allowed |= {(q, k) for q in image for k in image}
    else:
        allowed |= {(q, "Background") for q in image} | {("Background", k) for k in image}
    if not delete_main_prompt:
        allowed |= {(q, MAIN) for q in image} | {(MAIN, q) for q in image}
    for hint, box in zip(hints, boxes):  # (D) hint ↔ box
        allowed.add((box, hint))
        if symmetric_masking:
            allowed.add((hint, box))
        else:
            allowed |= {(hint, k) for k in image}
    label = "default"
    if split:
        allowed = {(qs, ks) for q, k in allowed for qs in expand_to_split(q) for ks in expand_to_split(k)}
        if not noise_bg_attend_noise_bbox:
            allowed -= {(NOISE_BG, f"Noise BBox {i}") for i in [*range(1, n + 1), ANY]}
            label = "noise-isolation"
        split_names = {s for c in comps for s in expand_to_split(c)}
        allowed |= {(s, s) for s in split_names}
    return RuleSet(frozenset(allowed), label)


def switch_step(value: float, num_steps: int) -> int:
    """Official rule-switch step: ``int(value * steps)`` for a ratio ``value <= 1``, else ``int(value)`` as an
    absolute step; clamped to ``[0, num_steps]`` (replan-spec §2.6.1)."""
    if value < 0:
        raise ValueError(f"rule switch must be >= 0 (a ratio <= 1 or an absolute step), got {value}")
    at = int(value * num_steps) if value <= 1.0 else int(value)
    return max(0, min(at, num_steps))


@dataclass(frozen=True)
class RuleSchedule:
    """Rules per denoising step: ``phases`` are ``(first_step, rules)`` sorted by step, the first at step 0."""

    phases: tuple[tuple[int, RuleSet], ...]

    def __post_init__(self):
        steps = [s for s, _ in self.phases]
        if not steps or steps[0] != 0 or steps != sorted(steps):
            raise ValueError(f"a rule schedule needs phases sorted by step starting at 0, got steps {steps}")

    @classmethod
    def constant(cls, rules: RuleSet) -> RuleSchedule:
        return cls(((0, rules),))

    @classmethod
    def switched(cls, before: RuleSet, after: RuleSet, at: int) -> RuleSchedule:
        """``before`` for steps < ``at``, ``after`` from ``at`` on (only ``after`` when ``at == 0``)."""
        return cls(((0, after),)) if at <= 0 else cls(((0, before), (at, after)))

    def at(self, step: int) -> RuleSet:
        current = self.phases[0][1]
        for start, rules in self.phases:
            if step >= start:
                current = rules
        return current

    @property
    def rule_sets(self) -> list[RuleSet]:
        return [r for _, r in self.phases]


def default_schedule(num_regions: int, num_steps: int, switch: float = 0.0, **options) -> RuleSchedule:
    """The official schedule: split noise-isolation rules before the switch step, non-split defaults after.

    ``options`` are ``default_rules`` keywords (``delete_main_prompt``, ``bboxes_attend_to_each_other``,
    ``has_image_prompt``, ``symmetric_masking``).
    """
    at = switch_step(switch, num_steps)
    after = default_rules(num_regions, **options)
    before = default_rules(num_regions, split=True, noise_bg_attend_noise_bbox=False, **options)
    return RuleSchedule.switched(before, after, at)


def custom_schedule(
    custom: RuleSet, num_regions: int, num_steps: int, switch: float | None = None, **options
) -> RuleSchedule:
    """A user rule set: for every step (``switch=None``, like the edit server), or for steps before the switch and
    the split defaults after it (like the demo's attention matrix)."""
    if switch is None:
        return RuleSchedule.constant(custom)
    after = default_rules(num_regions, split=True, **options)
    return RuleSchedule.switched(custom, after, switch_step(switch, num_steps))
