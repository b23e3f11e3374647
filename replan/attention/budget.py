"""How much memory a plan's region attention needs, checked before any model work.

The cost is a function of numbers known before encoding: the token count L of the joint sequence (text spans from the
tokenizer, patch grids from the generation size), the number of groups, the backend, the compute dtype and the
head count. Per backend:

* ``dense``: one additive ``(1, 1, L, L)`` mask in the compute dtype, its rows padded to ``aligned_width(L)`` (one
  rule set's mask is alive at a time);
* ``flex``: the BlockMask tables (``(L/128)²`` int32 entries, a few times) — and, when the transformer is **not**
  compiled, the score matrix eager FlexAttention materialises (heads × L² float32, twice);
* both: the token → group membership built once per edit (L × groups booleans, twice during ``torch.unique``).

``check_budget`` raises ``AttentionBudgetError`` (a ``ValueError``: the CLI exits 2, the server answers 413, the app
shows it) with one line naming the regions, the tokens and the ways out.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from replan.attention.masks import aligned_width

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
DEFAULT_FRACTION = 0.5  # of the device's free memory


class AttentionBudgetError(ValueError):
    """The plan's attention masks would not fit the memory budget."""


def parse_bytes(value: int | float | str | None) -> int | None:
    """``"8GB"``, ``"512MiB"``, ``"1.5g"``, ``"2e9"``, ``1000000`` → bytes; None stays None."""
    if value is None:
        return None
    number, unit = None, ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m and m.group(2).lower() in UNITS:
            number, unit = float(m.group(1)), m.group(2).lower()
    if number is None or not number > 0 or number == float("inf"):
        raise ValueError(f"cannot read the attention budget {value!r}: use a size > 0 like 8GB, 512MiB or 2e9")
    return int(number * UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def free_memory(device) -> int | None:
    """Free bytes on ``device``: CUDA's ``mem_get_info``, the kernel's MemAvailable for the CPU; None if unknown."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def default_budget(device) -> int | None:
    """Half the device's free memory now (None when it cannot be measured: no check)."""
    free = free_memory(device)
    return None if free is None else int(free * DEFAULT_FRACTION)


@dataclass(frozen=True)
class AttentionCost:
    """Bytes the region attention of one layout needs, by part."""

    tokens: int
    backend: str
    mask: int  # masks alive during the pass (dense) or BlockMask tables (flex)
    work: int  # per attention call beyond the mask (eager flex's score matrix)
    build: int  # token → group membership while the masks are built

    @property
    def total(self) -> int:
        return self.mask + self.work + self.build


def attention_cost(tokens: int, groups: int, backend: str = "dense", dtype: torch.dtype = torch.float32,
                   heads: int = 1, compiled: bool = False, block_size: int = 128) -> AttentionCost:
    """The memory of one layout's region attention (see the module docstring)."""
    build = 2 * tokens * groups
    if backend == "dense":
        itemsize = torch.empty((), dtype=dtype).element_size()
        return AttentionCost(tokens, backend, tokens * aligned_width(tokens) * itemsize, 0, build)
    blocks = -(-tokens // block_size)
    tables = 4 * blocks * blocks * 4 + 16 * tokens
    work = 0 if compiled else 2 * heads * tokens * tokens * 4
    return AttentionCost(tokens, backend, tables, work, build)


@dataclass(frozen=True)
class LayoutSize:
    """Token counts of a plan's layout, known from tokenisation alone."""

    regions: int
    main: int  # main-prompt tokens (0 when deleted)
    hints: int  # all hint tokens
    image: int  # noise + reference patches
    groups: int

    @property
    def tokens(self) -> int:
        return self.main + self.hints + self.image


def check_budget(size: LayoutSize, budget: int | None, *, backend: str, dtype: torch.dtype, heads: int,
                 compiled: bool, trimmed: LayoutSize | None = None, trim_allowed: bool = True) -> bool:
    """Whether the edit must trim hint padding to fit ``budget``; raises ``AttentionBudgetError`` when nothing fits.

    ``trimmed``: the layout without hint padding (None when the hints have none). Returns False when the layout fits
    as it is, True when only the trimmed one fits (and ``trim_allowed``)."""
    if budget is None:
        return False
    cost = attention_cost(size.tokens, size.groups, backend, dtype, heads, compiled)
    if cost.total <= budget:
        return False
    if trimmed is not None and trim_allowed:
        if attention_cost(trimmed.tokens, trimmed.groups, backend, dtype, heads, compiled).total <= budget:
            return True
    raise AttentionBudgetError(_message(size, cost, budget, backend, dtype, heads, compiled, trimmed, trim_allowed))


def fit_hint_padding(padded: LayoutSize, trimmed: LayoutSize | None, budget: int | None, wanted: bool | None, *,
                     backend: str, dtype: torch.dtype, heads: int, compiled: bool) -> tuple[bool, str | None]:
    """Decide whether hints run without their padding, or refuse (``AttentionBudgetError``).

    ``wanted``: True (always trim), False (never: the official padding or nothing), None (trim only when the padded
    layout is over ``budget`` and the trimmed one is not). Returns ``(trim, note)``: ``note`` says why the padding was
    trimmed automatically (None otherwise)."""
    layout = trimmed if wanted and trimmed is not None else padded
    must_trim = check_budget(layout, budget, backend=backend, dtype=dtype, heads=heads, compiled=compiled,
                             trimmed=None if wanted else trimmed, trim_allowed=wanted is None)
    if not must_trim:
        return bool(wanted), None
    return True, (f"trimmed: the padded layout ({padded.tokens:,} tokens) is over the {format_bytes(budget)} "
                  f"attention budget; without padding it is {trimmed.tokens:,} tokens")


def _message(size, cost, budget, backend, dtype, heads, compiled, trimmed, trim_allowed) -> str:
    what = "dense masks" if backend == "dense" else ("FlexAttention tables" if compiled else
                                                      "eager FlexAttention scores")
    head = (f"the plan's {size.regions} region(s) make a {size.tokens:,}-token attention layout ({size.main:,} prompt"
            f" + {size.hints:,} hint + {size.image:,} image tokens) whose {what} need {format_bytes(cost.total)}, "
            f"over the {format_bytes(budget)} attention budget")
    ways = []
    if trimmed is not None:
        t = attention_cost(trimmed.tokens, trimmed.groups, backend, dtype, heads, compiled)
        if trim_allowed:
            ways.append(f"even without hint padding it is {trimmed.tokens:,} tokens ({format_bytes(t.total)})")
        else:
            ways.append(f"allow hint-padding trimming ({trimmed.tokens:,} tokens, {format_bytes(t.total)})")
    ways.append("use fewer regions or shorter hints")
    best = trimmed if trimmed is not None and trim_allowed else size
    if backend == "dense" or not compiled:
        flex = attention_cost(best.tokens, best.groups, "flex", dtype, heads, True)
        ways.append(f"use the flex backend with compile (--attention flex --compile: {format_bytes(flex.total)})")
    ways.append("or raise --attention_budget")
    return head + "; " + "; ".join(ways)
