"""Judge prompts: template files, request parts (text and images at the markers), digests, reply parsing.

Templates: one file per dimension (``quality.txt``, ``target_following.txt``, ``effect.txt``, ``consistency.txt``)
with the official file names, structure and placeholders ``{{{instruct}}}`` / ``{{{ref_exp}}}``
(``{{{instruction}}}`` / ``{{{referring_expression}}}`` are accepted too; regex ``\\{\\{\\{([^{}]+)\\}\\}\\}``;
``{{ }}`` stays literal), images placed right after the markers ``**Original Image**:`` and ``**Edited Image**:``
(quality: the edited image only, no placeholder). The official files (``python -m replan.templates fetch``) load as
they are. Scales: quality 1-5, target_following 5|1, effect and consistency 5|3|1.

Reading a reply (``SCORE_PARSE``): ``official`` (default) uses a numeric score as given, as the official code does: an
off-scale 4 for effect counts 4 (``is_off_scale`` tells); ``strict`` turns an off-scale score into ``JudgeOffScale``.
Neither mode asks the judge again for an off-scale value.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from importlib import resources
from pathlib import Path

from PIL import Image

from replan.clients import one_line
from replan.eval.scoring import DIMENSIONS
from replan.images import to_rgb
from replan.templates import describe, sha256_text

SCORE_KEYS = {"quality": "quality_score", "target_following": "target_score", "effect": "effect_score",
              "consistency": "consistency_score"}
SCALES = {"quality": (1, 2, 3, 4, 5), "target_following": (1, 5), "effect": (1, 3, 5), "consistency": (1, 3, 5)}
ORIGINAL_MARKER, EDITED_MARKER = "**Original Image**:", "**Edited Image**:"
# placeholder → what it is filled with; the official names first, replan's earlier names as aliases
PLACEHOLDERS = {"instruct": "instruction", "ref_exp": "referring_expression", "instruction": "instruction",
                "referring_expression": "referring_expression"}
REQUIRED_PLACEHOLDERS = {"quality": (), "target_following": ("instruction", "referring_expression"),
                         "effect": ("instruction", "referring_expression"),
                         "consistency": ("instruction", "referring_expression")}
PLACEHOLDER_RE = re.compile(r"\{\{\{([^{}]+)\}\}\}")
SCORE_PARSE = ("official", "strict")

Part = str | Image.Image


class JudgeParseError(ValueError):
    """A reply without a usable score for its dimension."""


class JudgeOffScale(JudgeParseError):
    """``strict`` reading: the reply has a score, but not one on its dimension's scale (never asked again)."""

    def __init__(self, message: str, score, reasoning: str = ""):
        super().__init__(message)
        self.score, self.reasoning = score, reasoning


# ---------------------------------------------------------------------------------------------------- templates
def load_templates(prompts_dir: str | Path | None = None, files: dict[str, str] | None = None,
                   package: str = "replan.eval") -> dict[str, str]:
    """``{name: template text}`` from ``prompts_dir`` (else ``<package>/prompts``); ``ValueError`` naming any missing
    file, missing or unknown placeholder, or misplaced image marker.

    ``files`` maps each template's file stem to the judge dimension whose rules it follows (default: the four eval
    dimensions, each its own file)."""
    files = files or {dim: dim for dim in DIMENSIONS}
    default_dir = package.replace(".", "/") + "/prompts"
    templates = {}
    for name, dim in files.items():
        if prompts_dir is None:
            text = resources.files(package).joinpath(f"prompts/{name}.txt").read_text(encoding="utf-8")
        else:
            path = Path(prompts_dir) / f"{name}.txt"
            if not path.is_file():
                raise ValueError(f"prompt template {path} does not exist (need {', '.join(files)} .txt files)")
            text = path.read_text(encoding="utf-8")
        check_template(dim, text, where=f"{prompts_dir or default_dir}/{name}.txt")
        templates[name] = text
    return templates


def describe_templates(templates: dict[str, str], prompts_dir: str | Path | None = None,
                       package: str = "replan.eval") -> dict[str, dict]:
    """``{name: {"name", "sha256"}}``: which rubric each template is (official file, replan's own, or a user file)."""
    where = f"replan:{package.split('.')[-1]}/prompts" if prompts_dir is None else str(prompts_dir)
    return {name: describe(text, f"{where}/{name}.txt") for name, text in templates.items()}


def check_template(dimension: str, text: str, where: str = "template") -> None:
    names = {m.strip() for m in PLACEHOLDER_RE.findall(text)}
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"{where}: unknown placeholder(s) {unknown}; allowed: {list(PLACEHOLDERS)}")
    filled = {PLACEHOLDERS[n] for n in names}
    missing = [p for p in REQUIRED_PLACEHOLDERS[dimension] if p not in filled]
    if missing:
        official = {v: k for k, v in reversed(PLACEHOLDERS.items())}
        raise ValueError(f"{where}: missing placeholder(s) " + ", ".join("{{{" + official[p] + "}}}" for p in missing))
    wanted = {ORIGINAL_MARKER: 0 if dimension == "quality" else 1, EDITED_MARKER: 1}
    for marker, count in wanted.items():
        if text.count(marker) != count:
            found = text.count(marker)
            raise ValueError(f"{where}: needs the marker {marker!r} exactly {count} time(s), found {found}")
    if dimension != "quality" and text.index(ORIGINAL_MARKER) > text.index(EDITED_MARKER):
        raise ValueError(f"{where}: {ORIGINAL_MARKER!r} must come before {EDITED_MARKER!r}")


def template_hash(text: str) -> str:
    return sha256_text(text)


def render(text: str, values: dict[str, str]) -> str:
    """Replace every ``{{{name}}}`` with ``values[name]`` (one pass: substituted text is never re-scanned)."""
    return PLACEHOLDER_RE.sub(lambda m: str(values[m.group(1).strip()]), text)


def build_parts(dimension: str, template: str, instruction: str, referring_expression: str,
                original: Image.Image | None, edited: Image.Image) -> list[Part]:
    """``[text, original, text, edited, text]`` (quality: ``[text, edited, text]``): each image right after its
    marker. The template is split before substitution, so a marker inside an instruction cannot move an image."""
    given = {"instruction": instruction, "referring_expression": referring_expression}
    values = {name: given[kind] for name, kind in PLACEHOLDERS.items()}
    if dimension == "quality":
        head, tail = template.split(EDITED_MARKER, 1)
        pieces: list[Part] = [render(head, values) + EDITED_MARKER, edited, render(tail, values)]
    else:
        if original is None:
            raise ValueError(f"dimension {dimension!r} needs the original image")
        head, rest = template.split(ORIGINAL_MARKER, 1)
        middle, tail = rest.split(EDITED_MARKER, 1)
        pieces = [render(head, values) + ORIGINAL_MARKER, original, render(middle, values) + EDITED_MARKER, edited,
                  render(tail, values)]
    return [p for p in pieces if not (isinstance(p, str) and not p.strip())]


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def parts_digest(dimension: str, parts: list[Part]) -> str:
    """A hash of everything the judge sees for one call (dimension, text, image pixels)."""
    h = hashlib.sha256(dimension.encode())
    for p in parts:
        h.update(b"\0T" + p.encode("utf-8") if isinstance(p, str) else b"\0I" + image_digest(p).encode())
    return h.hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG")
    return buf.getvalue()


def response_schema(dimension: str) -> dict:
    """The JSON schema sent with each call, as the official eval sends it (descriptions included)."""
    key = SCORE_KEYS[dimension]
    return {"type": "object", "properties": {
        "reasoning": {"type": "string", "description": "A brief explanation for the score."},
        key: {"type": "integer", "description": "A numerical score from 1 to 5."}}, "required": [key, "reasoning"]}


# ---------------------------------------------------------------------------------------------------- parsing
_THINK_RE = re.compile(r"<think>.*?</think>", re.S)
_FENCE_JSON_RE = re.compile(r"```\s*json\s*\n?(.*?)```", re.S | re.I)
_FENCE_RE = re.compile(r"```[^\n`]*\n?(.*?)```", re.S)
_NUMBER_RE = re.compile(r"(?<![\w.])(\d+)(?!\w|\.\d)")


def _json_object(text: str) -> dict | None:
    """The reply's JSON object: the whole text, a ```json block, a bare ``` block, or the first embedded object."""
    candidates = [text.strip()] + _FENCE_JSON_RE.findall(text) + _FENCE_RE.findall(text)
    for c in candidates:
        try:
            data = json.loads(c)
        except (ValueError, RecursionError):
            continue
        if isinstance(data, dict):
            return data
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            data, _ = decoder.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(data, dict):
            return data
    return None


def _as_number(value) -> int | float | None:
    """A JSON score as a number: an int, a finite float (integral floats become ints), or a string of digits;
    booleans, NaN and infinities are not scores."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value) if value.is_integer() else value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def is_off_scale(score, dimension: str) -> bool:
    """True for a number that is not one of the dimension's scale values (e.g. 4 for effect, 7 anywhere)."""
    return score is not None and score not in SCALES[dimension]


def parse_judgement(text: str, dimension: str, score_parse: str = "official") -> tuple[int | float, str]:
    """``(score, reasoning)`` from a reply, or ``JudgeParseError``.

    Order: JSON (whole reply, fenced ```json, bare fence, embedded object) with the dimension's score key (or
    ``score``); without any JSON object, a number labelled as the score (``target_score: 5``, ``Score: 3``), else
    the reply's only distinct standalone number (``"5"``, ``"5/5"``; ``"4 out of 5"`` is ambiguous). A score off the
    dimension's scale is used as given with ``score_parse="official"`` and raises ``JudgeOffScale`` with
    ``"strict"``.
    """
    if score_parse not in SCORE_PARSE:
        raise ValueError(f"score_parse must be one of {', '.join(SCORE_PARSE)}, got {score_parse!r}")
    key, allowed = SCORE_KEYS[dimension], SCALES[dimension]
    text = _THINK_RE.sub("", text or "").strip()
    if not text:
        raise JudgeParseError("empty reply")
    data = _json_object(text)
    if data is not None:
        value = data.get(key, data.get("score"))
        score = _as_number(value)
        if score is None:
            raise JudgeParseError(f"JSON reply has no numeric {key!r}: {one_line(text, 160)!r}")
        reasoning = data.get("reasoning")
        reasoning = reasoning if isinstance(reasoning, str) else ("" if reasoning is None else json.dumps(reasoning))
    else:
        labelled = re.search(rf"(?:{key}|score)\W{{0,4}}(\d+)(?!\w|\.\d)", text, re.I)
        numbers = {int(n) for n in _NUMBER_RE.findall(text)}
        if labelled:
            score = int(labelled.group(1))
        elif len(numbers) == 1:
            score = numbers.pop()
        else:
            raise JudgeParseError(f"no JSON and no unambiguous score in the reply: {one_line(text, 160)!r}")
        reasoning = text
    if score not in allowed and score_parse == "strict":
        raise JudgeOffScale(f"{key} {score} is outside the scale {list(allowed)}", score, reasoning)
    return score, reasoning


