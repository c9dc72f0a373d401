"""GoT text: the reasoning chain's object boxes, parsed from and formatted back to text.

The released GoT reasoner marks objects as::

    <|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> (red)

with integer coordinates in 0..1000 (fractions of width / height times 1000) and an optional
colour name (a PIL colour name) in parentheses, used only to paint the spatial layout.
Boxes may also appear without an object phrase (``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``).

Differences from the released parser (``re.findall`` of
``<\\|box_start\\|>\\((\\d+),(\\d+)\\),\\((\\d+),(\\d+)\\)<\\|box_end\\|> \\((\\w+)\\)``):

* boxes WITHOUT a colour are returned too (``color=None``); the released code ignores them
  for the layout, and so does :func:`got_jax.got.layout.render_layout_canvases` (it skips
  boxes whose colour is ``None``), so the painted layout is the same;
* any whitespace (including none) is accepted between ``<|box_end|>`` and ``(colour)``;
  spaces inside the coordinate tuple are tolerated;
* coordinates are clamped to 0..1000 and empty boxes (``x1 >= x2`` or ``y1 >= y2`` after
  clamping) are dropped (non-strict) or rejected (strict); the released code passes them to
  PIL unchecked (which draws lines for equal ends and raises for reversed ones);
* colour names are checked as PIL would (``PIL.ImageColor.getrgb``): an unknown name raises
  :class:`GotTextError` in strict mode; in non-strict mode the box gets colour ``"white"``
  and the problem is recorded (the released code would crash inside PIL).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from PIL import ImageColor

OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"

COORD_MAX = 1000
FALLBACK_COLOR = "white"

_INT = r"([+-]?\d{1,12})"
_BOX_PATTERN = re.compile(
    r"(?:" + re.escape(OBJECT_REF_START) + r"(?P<phrase>(?:(?!<\|object_ref_(?:start|end)\|>).)*?)"
    + re.escape(OBJECT_REF_END) + r"\s*)?"
    + re.escape(BOX_START)
    + r"\s*\(\s*" + _INT + r"\s*,\s*" + _INT + r"\s*\)\s*,\s*\(\s*" + _INT + r"\s*,\s*" + _INT + r"\s*\)\s*"
    + re.escape(BOX_END)
    + r"(?:\s*\((?P<color>[A-Za-z0-9_#]+)\))?",
    re.DOTALL,
)


class GotTextError(ValueError):
    """A GoT text (or a box in it) that cannot be used; the message names the box and reason."""


@dataclasses.dataclass(frozen=True)
class Box:
    """One object box of a GoT plan: corners in 0..1000 units, optional phrase and colour."""

    x1: int
    y1: int
    x2: int
    y2: int
    phrase: str | None = None
    color: str | None = None

    @property
    def coords(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_pixels(self, height: int, width: int) -> tuple[float, float, float, float]:
        """Corners in pixels exactly as the released layout code computes them (``c / 1000 * size``)."""
        return (self.x1 / 1000 * width, self.y1 / 1000 * height, self.x2 / 1000 * width, self.y2 / 1000 * height)

    def rgb(self) -> tuple[int, int, int] | None:
        """The colour as an RGB triple (PIL's interpretation), or ``None`` without a colour."""
        if self.color is None:
            return None
        return color_to_rgb(self.color)

    def validate(self) -> None:
        """Raise :class:`GotTextError` unless coordinates are in range and the box is non-empty."""
        reason = _box_problem(self.x1, self.y1, self.x2, self.y2)
        if reason is None and any(not 0 <= c <= COORD_MAX for c in self.coords):
            reason = f"coordinates {self.coords} outside 0..{COORD_MAX}"
        if reason is None and self.color is not None and _color_rgb_or_none(self.color) is None:
            reason = f"unknown colour {self.color!r} (not a PIL colour name)"
        if reason is not None:
            raise GotTextError(f"bad box {format_box(self)!r}: {reason}")


def _color_rgb_or_none(name: str) -> tuple[int, int, int] | None:
    try:
        rgb = ImageColor.getrgb(name)
    except (ValueError, AttributeError, TypeError):
        return None
    return tuple(int(c) for c in rgb[:3])


def color_to_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a colour name exactly as PIL paints it (``ImageColor.getrgb``, alpha dropped)."""
    rgb = _color_rgb_or_none(name)
    if rgb is None:
        raise GotTextError(f"unknown colour {name!r} (not a PIL colour name)")
    return rgb


def _box_problem(x1: int, y1: int, x2: int, y2: int) -> str | None:
    if x1 >= x2:
        return f"empty box: x1={x1} >= x2={x2}"
    if y1 >= y2:
        return f"empty box: y1={y1} >= y2={y2}"
    return None


def _clamp(v: int) -> int:
    return min(max(v, 0), COORD_MAX)


def _parse(text: str, strict: bool) -> tuple[list[Box], list[str]]:
    if not isinstance(text, str):
        raise TypeError(f"GoT text must be a str, got {type(text).__name__}")
    boxes: list[Box] = []
    problems: list[str] = []
    for m in _BOX_PATTERN.finditer(text):
        snippet = m.group(0)
        raw = [int(m.group(i)) for i in range(2, 6)]
        coords = [_clamp(v) for v in raw]
        if coords != raw:
            msg = f"box {snippet!r}: coordinates {tuple(raw)} clamped to {tuple(coords)}"
            if strict:
                raise GotTextError(f"bad box {snippet!r}: coordinates {tuple(raw)} outside 0..{COORD_MAX}")
            problems.append(msg)
        reason = _box_problem(*coords)
        if reason is not None:
            if strict:
                raise GotTextError(f"bad box {snippet!r}: {reason}")
            problems.append(f"box {snippet!r} dropped: {reason}")
            continue
        color = m.group("color")
        if color is not None and _color_rgb_or_none(color) is None:
            if strict:
                raise GotTextError(f"bad box {snippet!r}: unknown colour {color!r} (not a PIL colour name)")
            problems.append(f"box {snippet!r}: unknown colour {color!r}, using {FALLBACK_COLOR!r}")
            color = FALLBACK_COLOR
        phrase = m.group("phrase")
        boxes.append(Box(*coords, phrase=phrase, color=color))
    return boxes, problems


def parse_got(text: str, *, strict: bool = False) -> list[Box]:
    """All boxes of a GoT text, in order of appearance.

    Non-strict (default): never raises on any ``str``; out-of-range coordinates are clamped to
    0..1000, empty boxes dropped, unknown colours replaced by ``"white"`` (see
    :func:`parse_got_report` for the list of such problems). Strict: any of these raises
    :class:`GotTextError` naming the box text and the reason.
    """
    return _parse(text, strict)[0]


def parse_got_report(text: str) -> tuple[list[Box], list[str]]:
    """Non-strict :func:`parse_got` plus a human-readable list of what was clamped, dropped or replaced."""
    return _parse(text, False)


def format_box(box: Box) -> str:
    """One box in the released format (phrase and `` (colour)`` only when present)."""
    out = ""
    if box.phrase is not None:
        out += f"{OBJECT_REF_START}{box.phrase}{OBJECT_REF_END}"
    out += f"{BOX_START}({box.x1},{box.y1}),({box.x2},{box.y2}){BOX_END}"
    if box.color is not None:
        out += f" ({box.color})"
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """A GoT plan: free text before the boxes, the boxes, and text between / after them.

    ``segments[i]`` is the text in front of ``boxes[i]``; ``tail`` follows the last box.
    """

    boxes: tuple[Box, ...]
    segments: tuple[str, ...] = ()
    tail: str = ""

    def __post_init__(self):
        if self.segments and len(self.segments) != len(self.boxes):
            raise GotTextError(f"Plan has {len(self.boxes)} boxes but {len(self.segments)} text segments")

    def to_text(self) -> str:
        return format_got(self.boxes, segments=self.segments or None, suffix=self.tail)


def format_got(
    boxes: Iterable[Box] | Plan,
    prefix_text: str = "",
    *,
    separator: str = "\n",
    segments: Sequence[str] | None = None,
    suffix: str = "",
) -> str:
    """GoT text in the released format: ``prefix_text`` then each box (``separator`` between).

    With ``segments`` (one string per box) each box is preceded by its segment instead of the
    separator. ``parse_got(format_got(boxes)) == list(boxes)`` for valid boxes whose phrases
    contain no special tokens.
    """
    if isinstance(boxes, Plan):
        return boxes.to_text() if not prefix_text else prefix_text + boxes.to_text()
    boxes = list(boxes)
    if segments is not None and len(segments) != len(boxes):
        raise GotTextError(f"format_got got {len(boxes)} boxes but {len(segments)} segments")
    parts = [prefix_text]
    for i, box in enumerate(boxes):
        if segments is not None:
            parts.append(segments[i])
        elif i > 0:
            parts.append(separator)
        parts.append(format_box(box))
    parts.append(suffix)
    return "".join(parts)
