"""Which latent tokens are edited: RegionE's adaptive region partition, and the plan's own regions.

Tokens are the packed latent sequence of one image, ``(1, L, C)`` with ``L = h · w`` row-major on the patch grid
(one token = 16×16 generation pixels). Masks here are boolean ``(L,)`` vectors, True = edited.

* ``adaptive_partition`` (regione-spec §4): the one-step estimate ``x̂0 = x_i - σ_i · v_i`` is compared with the
  reference latent token by token (cosine over channels); ``cos <= τ`` is edited. Optional morphology on the grid,
  with zero padding: erosion by the 3×3 cross (a token stays if it and its four neighbours are edited), then
  dilation by the 5×5 square (a token becomes edited if any token within Chebyshev distance 2 survived).
* ``plan_token_mask``: the tokens the plan's expanded boxes or region masks touch (rounded outwards), grown by
  ``margin`` rings (Chebyshev distance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from replan.coords import Size, box_to_patch_mask, mask_to_patch_mask

CROSS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)


def one_step_estimate(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean latent one Euler step to ``σ = 0`` predicts: ``x - σ · v`` (float32)."""
    return x.float() - float(sigma) * v.float()


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last (channel) dimension, per token: ``(1, L, C)`` x2 → ``(L,)`` float32."""
    if a.shape != b.shape:
        raise ValueError(f"the estimate {tuple(a.shape)} and the reference latent {tuple(b.shape)} differ in shape: "
                         "the output must be generated at the reference image's size")
    return F.cosine_similarity(a.float(), b.float(), dim=-1).reshape(-1)


def erode_cross(mask: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` bool → bool: keep a cell only if it and its 4 neighbours are set (outside the grid counts unset)."""
    hits = F.conv2d(mask[None, None].float(), CROSS.to(mask.device)[None, None], padding=1)[0, 0]
    return hits >= 5


def dilate_square(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """``(h, w)`` bool → bool: set every cell within Chebyshev distance ``radius`` of a set cell."""
    if radius <= 0:
        return mask.clone()
    size = 2 * radius + 1
    kernel = torch.ones(1, 1, size, size, device=mask.device)
    return F.conv2d(mask[None, None].float(), kernel, padding=radius)[0, 0] > 0


def adaptive_partition(estimate: torch.Tensor, reference: torch.Tensor, grid: tuple[int, int], threshold: float,
                       erosion_dilation: bool = True) -> torch.Tensor:
    """RegionE's edited mask ``(L,)``: ``cos(estimate, reference) <= threshold``, cleaned by erosion + dilation.

    ``estimate`` and ``reference``: ``(1, L, C)`` latents of the same shape; ``grid``: ``(h, w)`` with ``h·w = L``.
    """
    h, w = grid
    sim = token_cosine(estimate, reference)
    if sim.numel() != h * w:
        raise ValueError(f"{sim.numel()} tokens do not form the {h}x{w} grid")
    edited = (sim <= threshold).reshape(h, w)
    if erosion_dilation:
        edited = dilate_square(erode_cross(edited), 2)
    return edited.reshape(-1)


def plan_token_mask(boxes: Sequence, masks: Sequence | None, image_size: Size, grid: tuple[int, int],
                    patch: int = 16, margin: int = 0) -> torch.Tensor:
    """``(L,)`` bool: the tokens of the plan's regions on the noise grid, grown by ``margin`` rings.

    ``boxes``: the boxes the editor executes (original pixels, expanded); ``masks``: per region a pixel mask
    ``(H, W)`` of the original image or None (then the box is used); ``grid``: ``(h, w)`` patch grid.
    """
    h, w = grid
    out = torch.zeros(h, w, dtype=torch.bool)
    masks = list(masks) if masks is not None else [None] * len(boxes)
    for box, mask in zip(boxes, masks):
        out |= (box_to_patch_mask(box, image_size, (h, w), patch) if mask is None
                else mask_to_patch_mask(mask, image_size, (h, w), patch))
    if margin > 0:
        out = dilate_square(out, margin)
    return out.reshape(-1)


def token_ids(mask: torch.Tensor) -> torch.Tensor:
    """Sorted indices (int64) of the True entries of an ``(L,)`` mask."""
    return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
