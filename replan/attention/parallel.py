"""Region masks under Ulysses context parallelism: the token order each rank attends in, and text padding.

diffusers' Ulysses attention (``ContextParallelConfig(ulysses_degree=N)``) splits the text tokens and the image tokens
of a transformer pass into N contiguous chunks each; rank r holds ``text_r`` and ``image_r``. A joint-attention
processor concatenates what it holds, ``[text_r ; image_r]``, and the all-to-all then hands every rank the whole
sequence for H/N heads — in the order ``[text_0 ; image_0 ; text_1 ; image_1 ; …]``, not ``[text ; image]``. Every
rank sees the same order, so one mask serves all ranks, but it must be written in that order: a mask in the natural
order would let the wrong tokens see each other (tested: ``tests/test_parallel_cp.py``).

Lengths. Plain Ulysses splits into equal chunks (diffusers asserts divisibility). Text that does not divide by N is
padded here: ``pad`` tokens after the last hint, which no token attends to (they attend only to each other, so no
row of the mask is empty); the transformer's output holds image tokens only, so nothing has to be cut off again.
The image part must divide by N (a padded image would shift the rotary positions and the output); otherwise use
diffusers' "Ulysses anything" (``ulysses_anything=True``), whose chunks are those of ``torch.tensor_split`` and
need no padding.

Everything here is plain tensor bookkeeping, testable without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1  # the value of a padding position in ``UlyssesLayout.order``


def chunk_sizes(n: int, degree: int, anything: bool = False) -> list[int]:
    """Token counts of the ``degree`` chunks of ``n`` tokens: equal chunks, or ``torch.tensor_split``'s with
    ``anything`` (the first ``n % degree`` chunks one longer)."""
    if anything:
        q, r = divmod(n, degree)
        return [q + 1] * r + [q] * (degree - r)
    if n % degree:
        raise ValueError(f"{n} tokens do not split into {degree} equal chunks")
    return [n // degree] * degree


@dataclass(frozen=True)
class UlyssesSplit:
    """How one transformer is split: the Ulysses degree and whether chunks may be unequal ("Ulysses anything")."""

    degree: int
    anything: bool = False

    def __post_init__(self):
        if self.degree < 2:
            raise ValueError(f"the Ulysses degree must be at least 2, got {self.degree}")

    def layout(self, text_len: int, image_len: int) -> UlyssesLayout:
        """The arrangement of one pass with ``text_len`` text and ``image_len`` image tokens; a ``ValueError``
        naming the fix when the image part cannot be split."""
        if image_len < self.degree:
            raise ValueError(f"the image part ({image_len} tokens) is shorter than the Ulysses degree {self.degree}")
        if not self.anything and image_len % self.degree:
            raise ValueError(
                f"the image part ({image_len} patch tokens: noise + reference) does not split into {self.degree} "
                f"equal chunks for Ulysses-{self.degree}: use ulysses_anything (--ulysses_anything), another degree, "
                "or an image size whose patch count divides"
            )
        if self.anything:  # unequal chunks are fine; only a chunk must not be empty
            pad = max(0, self.degree - text_len)
        else:
            pad = -text_len % self.degree
        return UlyssesLayout(self.degree, text_len, image_len, pad, self.anything)


@dataclass(frozen=True)
class UlyssesLayout:
    """One pass's token arrangement after the Ulysses all-to-all.

    ``text_len``/``image_len``: real tokens; ``pad``: padding tokens appended to the text."""

    degree: int
    text_len: int
    image_len: int
    pad: int = 0
    anything: bool = False

    @property
    def padded_text_len(self) -> int:
        return self.text_len + self.pad

    @property
    def total_len(self) -> int:
        return self.padded_text_len + self.image_len

    def order(self) -> torch.Tensor:
        """``(total_len,)`` long: at position i after the all-to-all, the index of the token in the natural,
        unpadded order ``[text ; image]`` — or ``PAD`` for a padding token."""
        text = torch.arange(self.padded_text_len)
        text = torch.where(text < self.text_len, text, torch.full_like(text, PAD))
        image = torch.arange(self.text_len, self.text_len + self.image_len)
        parts = []
        t0 = i0 = 0
        for nt, ni in zip(chunk_sizes(self.padded_text_len, self.degree, self.anything),
                          chunk_sizes(self.image_len, self.degree, self.anything)):
            parts += [text[t0 : t0 + nt], image[i0 : i0 + ni]]
            t0, i0 = t0 + nt, i0 + ni
        return torch.cat(parts)

    def key_padding_mask(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """``(1, 1, 1, total_len)`` additive mask (in the order after the all-to-all) that hides the padding keys:
        what an otherwise unmasked pass uses when the text was padded."""
        hidden = self.order() == PAD
        mask = torch.zeros(self.total_len, dtype=dtype)
        mask[hidden] = float("-inf")
        return mask.to(device)[None, None, None]


def pad_text_inputs(kwargs: dict, pad: int) -> dict:
    """The transformer's keyword arguments with ``pad`` zero tokens appended to the text stream.

    Pads ``encoder_hidden_states`` (B, T, C), the text position ids ``txt_ids`` ((T, d) for FLUX.1, (B, T, d) for
    FLUX.2) and a text padding mask ``encoder_hidden_states_mask`` (B, T) (Qwen-Image) along their token axis. The
    padding tokens are masked out as keys by the caller; their own outputs never reach the image tokens."""
    if pad <= 0:
        return kwargs
    out = dict(kwargs)
    text = kwargs["encoder_hidden_states"]
    out["encoder_hidden_states"] = torch.cat([text, text.new_zeros(text.shape[0], pad, text.shape[2])], dim=1)
    ids = kwargs.get("txt_ids")
    if ids is not None:
        axis = ids.dim() - 2
        shape = list(ids.shape)
        shape[axis] = pad
        out["txt_ids"] = torch.cat([ids, ids.new_zeros(shape)], dim=axis)
    mask = kwargs.get("encoder_hidden_states_mask")
    if mask is not None:
        out["encoder_hidden_states_mask"] = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return out
