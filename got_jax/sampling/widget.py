"""GoT plan boxes <-> the boxes of ``jupyter_bbox_widget.BBoxWidget`` (interactive plan editing in notebooks).

Why this widget: ``jupyter-bbox-widget`` (optional extra ``pip install -e ".[notebook]"``) is made for exactly
this job, drawing, moving, resizing, relabelling and deleting labelled boxes on an image, and is an
``anywidget`` widget, so it runs in Colab, JupyterLab and Notebook 7 without a front-end extension. Its state is
a plain list of dicts, so this module has no dependency on it. ``ipycanvas`` or a hand-written ``anywidget``
would need the box editing written in JavaScript; ``ipywidgets`` alone has no box drawing.

Coordinates. A GoT plan's box ``(x1,y1),(x2,y2)`` is in 0..1000 units of the image width / height (top-left
origin; the layout painter fills pixels ``int(c / 1000 * size)`` inclusive, see
:mod:`got_jax.got.layout`). A widget box is ``{"x", "y", "width", "height", "label"}`` in pixels of the
displayed image (top-left corner and size). The label carries the plan's phrase and colour as
``"a red apple (red)"``. :func:`plan_to_widget` keeps fractional pixels, so ``widget_to_plan(plan_to_widget(b))``
gives ``b`` back exactly. :func:`widget_to_plan` rounds to the nearest unit, clamps boxes dragged partly off the
image to 0..1000 (the plan convention, as :func:`got_jax.got.text.parse_got` does), orders swapped corners and
drops boxes that are empty after clamping; a label without ``(colour)`` or with an unknown colour gets
``default_color``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from got_jax.got.text import _BOX_PATTERN, COORD_MAX, Box, format_box
from got_jax.got.text import _color_rgb_or_none as _rgb

_LABEL = re.compile(r"^(?P<phrase>.*?)\s*\((?P<color>[A-Za-z0-9_#]+)\)\s*$", re.S)


def box_label(box: Box) -> str:
    """The widget label of ``box``: ``"phrase (colour)"`` (either part may be absent)."""
    phrase = box.phrase or ""
    if box.color is None:
        return phrase
    return f"{phrase} ({box.color})" if phrase else f"({box.color})"


def parse_label(label: str) -> tuple[str | None, str | None]:
    """``(phrase, colour)`` of a widget label (inverse of :func:`box_label`); empty parts are None."""
    m = _LABEL.match(label or "")
    phrase, color = (m.group("phrase"), m.group("color")) if m else (label or "", None)
    return (phrase.strip() or None), color


def plan_to_widget(boxes: Iterable[Box], width: int, height: int) -> list[dict]:
    """Widget boxes (pixels of a ``width`` x ``height`` image) for the plan's ``boxes``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    out = []
    for b in boxes:
        out.append({"x": b.x1 * width / COORD_MAX, "y": b.y1 * height / COORD_MAX,
                    "width": (b.x2 - b.x1) * width / COORD_MAX, "height": (b.y2 - b.y1) * height / COORD_MAX,
                    "label": box_label(b)})
    return out


def _unit(v: float, size: int) -> int:
    return min(max(round(v * COORD_MAX / size), 0), COORD_MAX)


def widget_to_plan(widget_boxes: Sequence[dict], width: int, height: int, *,
                   default_color: str | None = "white") -> list[Box]:
    """Plan boxes (0..1000 units) from widget boxes on a ``width`` x ``height`` image (module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    out = []
    for k, wb in enumerate(widget_boxes):
        try:
            x, y, w, h = (float(wb[key]) for key in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"widget box {k} ({wb!r}): needs numeric x, y, width, height ({e})") from None
        x1, x2 = sorted((_unit(x, width), _unit(x + w, width)))
        y1, y2 = sorted((_unit(y, height), _unit(y + h, height)))
        if x1 >= x2 or y1 >= y2:
            continue  # empty after clamping (dragged off the image, or a click without a drag)
        phrase, color = parse_label(str(wb.get("label", "")))
        if color is None or _rgb(color) is None:
            color = default_color
        out.append(Box(x1, y1, x2, y2, phrase=phrase, color=color))
    return out


def replace_boxes(got_text: str, boxes: Sequence[Box], *, separator: str = "\n") -> str:
    """``got_text`` with its i-th box written as ``boxes[i]``; the text around the boxes is kept. Boxes beyond
    the text's are appended (after ``separator``); the text's extra boxes are removed."""
    matches = list(_BOX_PATTERN.finditer(got_text))
    parts, pos = [], 0
    for m, b in zip(matches, boxes):
        parts += [got_text[pos:m.start()], format_box(b)]
        pos = m.end()
    for m in matches[len(boxes):]:
        parts.append(got_text[pos:m.start()])
        pos = m.end()
    parts.append(got_text[pos:])
    text = "".join(parts)
    extra = [format_box(b) for b in boxes[len(matches):]]
    if extra:
        tail = "<|im_gen_start|>" if text.endswith("<|im_gen_start|>") else ""
        text = text[:len(text) - len(tail)] if tail else text
        text = separator.join([text.rstrip("\n")] + extra if text.strip() else extra) + tail
    return text
