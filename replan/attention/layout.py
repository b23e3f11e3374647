"""Where every token of the joint MMDiT sequence sits, and which named groups it belongs to.

The joint sequence of every supported editor is ``[text | noise patches | reference patches…]`` (replan-spec §2.2)::

    [ MAIN PROMPT (with Qwen's image-prompt span inside) | HINT 1 | … | HINT N | NOISE grid | IMAGE grid(s) ]

A backbone reports its text span lengths and patch grids; ``TokenLayout`` turns that plus one patch mask per region
and grid into a token → group membership matrix over the **split** group names of replan-spec §2.4. Logical names
(``BBox i``, ``Background``) are unions of split names and are resolved by the rules (``replan.attention.rules``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from replan.coords import Size, box_to_patch_mask

MAIN, IMAGE_PROMPT = "Main Prompt", "Image Prompt"
NOISE_BG, IMAGE_BG = "Noise Background", "Image Background"


def hint_name(i: int) -> str:
    return f"Hint {i}"


def noise_box_name(i: int) -> str:
    return f"Noise BBox {i}"


def image_box_name(i: int) -> str:
    return f"Image BBox {i}"


@dataclass(frozen=True)
class PatchGrid:
    """A patch grid inside the joint sequence: ``kind`` is ``"noise"`` or ``"image"`` (a reference copy)."""

    kind: str
    start: int
    height: int
    width: int
    patch: int = 16

    @property
    def size(self) -> int:
        return self.height * self.width

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def pixel_size(self) -> Size:
        """(W, H) in generation pixels covered by this grid."""
        return (self.width * self.patch, self.height * self.patch)


@dataclass(frozen=True)
class TokenLayout:
    """Token positions of one joint sequence.

    Build it with ``TokenLayout.build``; attach regions with ``with_box_regions`` or ``with_mask_regions``.
    """

    main: tuple[int, int] | None  # [start, end) of the main prompt tokens, None when the main prompt is deleted
    image_prompt: tuple[int, int] | None  # Qwen's vision-token span, inside ``main``
    hints: tuple[tuple[int, int], ...]
    grids: tuple[PatchGrid, ...]
    # region_masks[g][i]: (h, w) bool patch mask of region i on grid g
    region_masks: tuple[tuple[torch.Tensor, ...], ...] = field(default=(), compare=False)

    @classmethod
    def build(
        cls,
        main_len: int | None,
        hint_lens: Sequence[int],
        noise_grid: tuple[int, int],
        reference_grids: Sequence[tuple[int, int]] = (),
        image_prompt: tuple[int, int] | None = None,
        patch: int = 16,
    ) -> TokenLayout:
        """Lay out ``[main | hints | noise | references]``. Grids are (height, width) in patches."""
        pos = 0
        main = None
        if main_len:
            main, pos = (0, main_len), main_len
        if image_prompt is not None:
            if main is None or not (main[0] <= image_prompt[0] < image_prompt[1] <= main[1]):
                raise ValueError(f"image-prompt span {image_prompt} must lie inside the main prompt span {main}")
        hints = []
        for n in hint_lens:
            if n <= 0:
                raise ValueError(f"every hint needs at least one token, got lengths {list(hint_lens)}")
            hints.append((pos, pos + n))
            pos += n
        grids = []
        for kind, (h, w) in [("noise", noise_grid)] + [("image", g) for g in reference_grids]:
            if h <= 0 or w <= 0:
                raise ValueError(f"patch grids must be non-empty, got {h}x{w}")
            grids.append(PatchGrid(kind, pos, h, w, patch))
            pos += h * w
        return cls(main=main, image_prompt=image_prompt, hints=tuple(hints), grids=tuple(grids))

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def text_len(self) -> int:
        return self.grids[0].start

    @property
    def total_len(self) -> int:
        return self.grids[-1].end

    @property
    def num_regions(self) -> int:
        return len(self.hints)

    @property
    def noise_grid(self) -> PatchGrid:
        return self.grids[0]

    # ------------------------------------------------------------------------------------------------ regions
    def with_box_regions(
        self, boxes: Sequence[Sequence[float]], original_size: Size, grids: Sequence[int] | None = None
    ) -> TokenLayout:
        """Attach regions given as boxes in original-image pixels (already expanded), one per hint.

        ``grids`` selects the grid indices the boxes apply to (default: every grid, i.e. the noise grid and every
        reference copy of the input image); other grids count as background.
        """
        selected = range(len(self.grids)) if grids is None else grids
        masks = []
        for g, grid in enumerate(self.grids):
            shape = (grid.height, grid.width)
            if g in selected:
                masks.append([box_to_patch_mask(b, original_size, shape, grid.patch) for b in boxes])
            else:
                masks.append([torch.zeros(shape, dtype=torch.bool) for _ in boxes])
        return self.with_mask_regions(masks)

    def with_mask_regions(self, masks: Sequence[Sequence[torch.Tensor]]) -> TokenLayout:
        """Attach regions as boolean patch masks: ``masks[g][i]`` is region i on grid g (any shape, not just boxes)."""
        if len(masks) != len(self.grids):
            raise ValueError(f"need region masks for {len(self.grids)} grid(s), got {len(masks)}")
        out = []
        for grid, per_grid in zip(self.grids, masks):
            if len(per_grid) != self.num_regions:
                raise ValueError(f"need {self.num_regions} region mask(s) per grid (one per hint), got {len(per_grid)}")
            checked = []
            for m in per_grid:
                m = torch.as_tensor(m, dtype=torch.bool).cpu()
                if tuple(m.shape) != (grid.height, grid.width):
                    raise ValueError(f"region mask shape {tuple(m.shape)} != grid {(grid.height, grid.width)}")
                checked.append(m)
            out.append(tuple(checked))
        return TokenLayout(self.main, self.image_prompt, self.hints, self.grids, tuple(out))

    def region_token_mask(self, i: int, kinds: Sequence[str] = ("noise", "image")) -> torch.Tensor:
        """Boolean (L,) mask of the patch tokens of region ``i`` (1-based) on grids of the given kinds."""
        out = torch.zeros(self.total_len, dtype=torch.bool)
        for grid, per_grid in zip(self.grids, self._masks()):
            if grid.kind in kinds:
                out[grid.start : grid.end] = per_grid[i - 1].flatten()
        return out

    def _masks(self):
        if self.num_regions and not self.region_masks:
            raise ValueError("this layout has hints but no region masks: call with_box_regions or with_mask_regions")
        return self.region_masks or tuple(() for _ in self.grids)

    # ------------------------------------------------------------------------------------------------ groups
    def group_names(self) -> list[str]:
        """Split group names present in this layout, in the canonical order."""
        n = self.num_regions
        names = [MAIN] if self.main is not None else []
        if self.image_prompt is not None:
            names.append(IMAGE_PROMPT)
        names += [hint_name(i) for i in range(1, n + 1)]
        names += [noise_box_name(i) for i in range(1, n + 1)]
        names += [image_box_name(i) for i in range(1, n + 1)]
        return names + [NOISE_BG, IMAGE_BG]

    def membership(self) -> tuple[list[str], torch.Tensor]:
        """Return ``(group_names, member)`` with ``member[t, g]`` True iff token t belongs to group g.

        Overlapping regions give tokens several groups (union semantics, replan-spec §2.10); background is the
        complement of the union of regions on each grid.
        """
        names = self.group_names()
        col = {name: j for j, name in enumerate(names)}
        member = torch.zeros(self.total_len, len(names), dtype=torch.bool)
        if self.main is not None:
            member[self.main[0] : self.main[1], col[MAIN]] = True
        if self.image_prompt is not None:
            a, b = self.image_prompt
            member[a:b, col[MAIN]] = False  # Qwen's Main Prompt excludes the vision span
            member[a:b, col[IMAGE_PROMPT]] = True
        for i, (a, b) in enumerate(self.hints, 1):
            member[a:b, col[hint_name(i)]] = True
        for grid, per_grid in zip(self.grids, self._masks()):
            box_name = noise_box_name if grid.kind == "noise" else image_box_name
            covered = torch.zeros(grid.size, dtype=torch.bool)
            for i, m in enumerate(per_grid, 1):
                flat = m.flatten()
                member[grid.start : grid.end, col[box_name(i)]] = flat
                covered |= flat
            bg = NOISE_BG if grid.kind == "noise" else IMAGE_BG
            member[grid.start : grid.end, col[bg]] = ~covered
        return names, member
