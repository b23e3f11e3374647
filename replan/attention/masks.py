"""Token-level attention masks from (layout, rules): a dense mask and a FlexAttention ``BlockMask``.

Both come from one representation: tokens are compressed into **classes** (tokens with the same group membership),
and a rule set becomes a small ``(C, C)`` class mask ``allowed[a, b] = any_{g in a, h in b} rules[g, h]`` — the
union semantics of the official bitmask, without its 31-group limit. Then

* dense: ``mask[q, k] = class_mask[cls[q], cls[k]]``, built as ``rows.index_select(0, cls)`` from a ``(C, L)`` row
  table, so nothing of size L² exists beside the mask itself. ``dense_mask`` gives ``(1, 1, L, L)`` bool (True =
  attend); ``additive_mask`` gives the same mask as 0 / -inf in the compute dtype — what SDPA adds to the scores, so
  nothing is converted per block or per step. Its rows are stored ``ROW_ALIGN``-aligned (a ``(L, L')`` buffer,
  ``L' = L`` rounded up, viewed as ``L × L``): PyTorch's memory-efficient SDPA kernel copies a bias whose row stride
  is not a multiple of 8 elements into a padded one on every call: a second L² mask per attention call;
* BlockMask: per 128×128 block, which classes occur on each side decides full / partial / empty straight from
  ``class_mask``; ``BlockMask.from_kv_blocks`` takes those tables, so no ``mask_mod`` is evaluated over L². The
  ``mask_mod`` reads a class table padded to a power of two (at least 64), so two plans with the same token count
  give tensors of the same shapes and a compiled kernel is reused, not recompiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replan.attention.layout import TokenLayout
from replan.attention.rules import RuleSet

ROW_ALIGN = 8  # elements: the additive mask's row stride (what memory-efficient SDPA needs to use a bias in place)


def aligned_width(length: int) -> int:
    """The row stride of an additive mask over ``length`` keys: ``length`` rounded up to ``ROW_ALIGN``."""
    return -(-length // ROW_ALIGN) * ROW_ALIGN


@dataclass(frozen=True)
class GroupMembership:
    """Tokens compressed into membership classes: ``class_groups[c, g]`` says class c belongs to group g.

    With ``padded`` the last class holds padding tokens (``arranged``): they attend only to each other and no other
    token attends to them."""

    names: tuple[str, ...]
    token_class: torch.Tensor  # (L,) long
    class_groups: torch.Tensor  # (C, G) bool
    padded: bool = False

    @classmethod
    def from_layout(cls, layout: TokenLayout) -> GroupMembership:
        names, member = layout.membership()
        class_groups, token_class = torch.unique(member, dim=0, return_inverse=True)
        return cls(tuple(names), token_class, class_groups)

    @property
    def num_tokens(self) -> int:
        return self.token_class.numel()

    def arranged(self, order: torch.Tensor) -> GroupMembership:
        """The same tokens in another order: position i holds token ``order[i]`` of this membership, or a padding
        token where ``order[i] < 0`` (the token order of a context-parallel pass, ``replan.attention.parallel``)."""
        if self.padded:
            raise ValueError("this membership is already arranged")
        pad = order < 0
        token_class = self.token_class[order.clamp(min=0)]
        if not pad.any():
            return GroupMembership(self.names, token_class, self.class_groups)
        pad_class = self.class_groups.shape[0]
        token_class = torch.where(pad, torch.full_like(token_class, pad_class), token_class)
        class_groups = torch.cat([self.class_groups, self.class_groups.new_zeros(1, self.class_groups.shape[1])])
        return GroupMembership(self.names, token_class, class_groups, padded=True)

    def class_mask(self, rules: RuleSet) -> torch.Tensor:
        """``(C, C)`` bool: may a token of class a attend to a token of class b under ``rules`` (cached per rule
        set: a schedule asks for each of its rule sets when it is checked and again when its mask is built)."""
        cache = self.__dict__.setdefault("_class_masks", {})
        if rules not in cache:
            if len(cache) >= 4:
                cache.clear()
            cache[rules] = self._class_mask(rules)
        return cache[rules]

    def _class_mask(self, rules: RuleSet) -> torch.Tensor:
        r = rules.matrix(self.names).float()
        g = self.class_groups[:-1] if self.padded else self.class_groups
        g = g.float()
        allowed = (g @ r @ g.T) > 0
        empty = ~allowed.any(dim=1)
        if empty.any():
            stranded = sorted({self.names[j] for c in empty.nonzero().flatten().tolist()
                               for j in self.class_groups[c].nonzero().flatten().tolist()})
            raise ValueError(
                f"the attention rules '{rules.label}' let tokens of {stranded} attend to nothing; "
                "allow each group at least itself (e.g. 'Hint 1, Hint 1': true)"
            )
        if self.padded:  # padding sees only padding and is seen by nothing else
            n = allowed.shape[0]
            allowed = torch.cat([torch.cat([allowed, allowed.new_zeros(n, 1)], 1), allowed.new_zeros(1, n + 1)])
            allowed[n, n] = True
        return allowed


def _row_table(membership: GroupMembership, rules: RuleSet, device, on, off, width: int | None = None) -> torch.Tensor:
    """``(C, width)``: row c is the mask row of every token of class c (``on`` where it may attend, else ``off``);
    columns past L (``width`` > L) are filler that the caller's ``[:, :L]`` view leaves out."""
    allowed = membership.class_mask(rules).to(device)
    cls = membership.token_class.to(device)
    if width is not None and width > cls.numel():  # filler columns: class 0, never read
        cls = torch.cat([cls, cls.new_zeros(width - cls.numel())])
    table = torch.where(allowed, on, off)  # (C, C) in the mask dtype
    return table.index_select(1, cls)


def dense_mask(membership: GroupMembership, rules: RuleSet, device=None) -> torch.Tensor:
    """``(1, 1, L, L)`` boolean mask (True = may attend), for previews, tests and SDPA."""
    on = torch.tensor(True, device=device)
    rows = _row_table(membership, rules, device, on, ~on)
    return rows.index_select(0, membership.token_class.to(device))[None, None]


def additive_mask(membership: GroupMembership, rules: RuleSet, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """``(1, 1, L, L)`` additive mask in ``dtype``: 0 where a token may attend, -inf where it may not.

    SDPA adds it to the scores as is (a boolean mask would be converted to this in every call). Every row allows at
    least the token's own class (``class_mask`` checks it), so no row is all -inf. The rows are ``aligned_width(L)``
    apart in memory (a view of an ``(L, aligned_width(L))`` buffer), so SDPA uses the mask without copying it.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"an additive mask needs a floating dtype, got {dtype}")
    length = membership.num_tokens
    zero = torch.zeros((), dtype=dtype, device=device)
    rows = _row_table(membership, rules, device, zero, torch.full((), float("-inf"), dtype=dtype, device=device),
                      aligned_width(length))
    return rows.index_select(0, membership.token_class.to(device))[:, :length][None, None]


def class_capacity(num_classes: int, minimum: int = 64) -> int:
    """The padded size of the BlockMask class table: the next power of two >= ``num_classes`` (at least 64)."""
    return max(minimum, 1 << max(0, num_classes - 1).bit_length())


def block_mask(membership: GroupMembership, rules: RuleSet, device=None, block_size: int = 128):
    """A FlexAttention ``BlockMask`` equal to ``dense_mask`` (broadcast over batch and heads)."""
    from torch.nn.attention.flex_attention import BlockMask

    allowed = membership.class_mask(rules)
    num_classes = allowed.shape[0]
    length = membership.num_tokens
    num_blocks = -(-length // block_size)
    pad = num_blocks * block_size - length
    # the padding class (index C) attends to nothing and is seen by nothing
    allowed_pad = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.bool)
    allowed_pad[:num_classes, :num_classes] = allowed
    cls_pad = torch.cat([membership.token_class, torch.full((pad,), num_classes, dtype=torch.long)])

    present = torch.zeros(num_blocks, num_classes + 1, dtype=torch.bool)
    present[torch.arange(num_blocks * block_size) // block_size, cls_pad] = True
    p = present.float()
    any_true = (p @ allowed_pad.float() @ p.T) > 0
    any_false = (p @ (~allowed_pad).float() @ p.T) > 0
    full = any_true & ~any_false
    partial = any_true & any_false

    def tables(blocks: torch.Tensor):
        counts = blocks.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None].to(device), order[None, None].to(device)

    # mask_mod's class table is padded to a capacity that depends on the class count only through a power-of-two
    # bucket, so plans with the same token count hand a compiled kernel tensors of the same shapes
    capacity = class_capacity(num_classes + 1)
    table = torch.zeros(capacity, capacity, dtype=torch.bool)
    table[: num_classes + 1, : num_classes + 1] = allowed_pad
    allowed_dev, cls_dev = table.to(device), cls_pad.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed_dev[cls_dev[q_idx], cls_dev[kv_idx]]

    kv_num, kv_idx = tables(partial)
    full_num, full_idx = tables(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length)
    )


def materialize_block_mask(bm) -> torch.Tensor:
    """Expand a ``BlockMask`` into its ``(L, L)`` boolean token mask (full blocks, plus ``mask_mod`` on partial ones).

    For tests and debugging: this is what FlexAttention computes with, independent of how the tables were built.
    """
    from torch.nn.attention.flex_attention import create_mask

    q_len, kv_len = bm.seq_lengths
    bq, bk = bm.BLOCK_SIZE
    nq, nk = bm.kv_num_blocks.shape[-1], bm.kv_indices.shape[-1]

    def block_table(num, idx):
        table = torch.zeros(nq, nk, dtype=torch.bool, device=num.device)
        for row in range(nq):
            table[row, idx[0, 0, row, : int(num[0, 0, row])].long()] = True
        return table

    partial = block_table(bm.kv_num_blocks, bm.kv_indices)
    full = partial & False
    if bm.full_kv_num_blocks is not None:
        full = block_table(bm.full_kv_num_blocks, bm.full_kv_indices)
    mods = create_mask(bm.mask_mod, 1, 1, nq * bq, nk * bk, device=bm.kv_num_blocks.device)[0, 0]
    expand = lambda t: t.repeat_interleave(bq, 0).repeat_interleave(bk, 1)  # noqa: E731
    dense = expand(full) | (expand(partial) & mods)
    return dense[:q_len, :kv_len]
