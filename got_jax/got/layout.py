"""The spatial layout of a GoT plan: one painted canvas per box, plus drawings for users.

:func:`render_layout_canvases` reproduces the released layout code pixel for pixel::

    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(canvas).rectangle(((x1 / 1000 * width, y1 / 1000 * height),
                                      (x2 / 1000 * width, y2 / 1000 * height)), fill=colour)

PIL's filled rectangle truncates each float corner to ``int`` (C cast; corners are
non-negative here) and fills both end rows / columns inclusively, clipped to the canvas.
The numpy fill below does the same with the same float64 arithmetic (``c / 1000 * size``,
in that order: ``c * size / 1000`` rounds differently for some values).

Only boxes with a colour are painted (the released parser ignores boxes without
`` (colour)``); no painted box gives one all-black canvas.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from got_jax.got.text import Box, color_to_rgb


def painted_boxes(boxes: Sequence[Box]) -> list[Box]:
    """The boxes the released layout paints: those with a colour."""
    return [b for b in boxes if b.color is not None]


def _pixel_span(c1: int, c2: int, size: int) -> tuple[int, int]:
    """Half-open pixel range [lo, hi) that PIL fills for corners c1 <= c2 (0..1000 units)."""
    lo = int(c1 / 1000 * size)
    hi = int(c2 / 1000 * size)
    return max(lo, 0), min(hi + 1, size)


def render_layout_canvases(
    boxes: Sequence[Box], height: int, width: int, *, max_boxes: int | None = None
) -> np.ndarray:
    """Layout canvases ``(N, height, width, 3)`` uint8: box ``i`` filled in its colour on black.

    Boxes without a colour are skipped (as released). ``N = max(#painted boxes, 1)``; with no
    painted box the single canvas is all black. More painted boxes than ``max_boxes`` raises
    ``ValueError``. Unknown colour names raise :class:`~got_jax.got.text.GotTextError`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"layout size must be positive, got height={height}, width={width}")
    painted = painted_boxes(boxes)
    if max_boxes is not None and len(painted) > max_boxes:
        raise ValueError(f"GoT plan has {len(painted)} coloured boxes, more than max_boxes={max_boxes}")
    out = np.zeros((max(len(painted), 1), height, width, 3), np.uint8)
    for i, box in enumerate(painted):
        if box.x2 < box.x1 or box.y2 < box.y1:
            raise ValueError(f"box {box} has reversed corners (PIL refuses to draw it)")
        x_lo, x_hi = _pixel_span(box.x1, box.x2, width)
        y_lo, y_hi = _pixel_span(box.y1, box.y2, height)
        if x_lo < x_hi and y_lo < y_hi:
            out[i, y_lo:y_hi, x_lo:x_hi] = color_to_rgb(box.color)
    return out


def to_model_range(canvases: np.ndarray) -> np.ndarray:
    """uint8 ``[0, 255]`` images to float32 ``[-1, 1]`` (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    canvases = np.asarray(canvases)
    if canvases.dtype != np.uint8:
        raise ValueError(f"expected uint8 canvases, got dtype {canvases.dtype}")
    return canvases.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if arr.min() < 0:  # model range [-1, 1]
            arr = (arr + 1.0) / 2.0
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return Image.fromarray(arr[..., :3])


def draw_overlay(image: Image.Image | np.ndarray, boxes: Sequence[Box], *, line_width: int | None = None) -> Image.Image:
    """A copy of ``image`` with each box outlined in its colour (white if none) and its phrase as a label."""
    img = _as_pil(image).copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    lw = line_width or max(1, round(min(w, h) / 200))
    for box in boxes:
        rgb = color_to_rgb(box.color) if box.color is not None else (255, 255, 255)
        x1, y1, x2, y2 = box.to_pixels(h, w)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        draw.rectangle([x1, y1, x2, y2], outline=rgb, width=lw)
        label = box.phrase if box.phrase else (box.color or "")
        if label:
            tx, ty = x1 + lw + 1, y1 + lw + 1
            l, t, r, b = draw.textbbox((tx, ty), label)
            draw.rectangle([l - 1, t - 1, r + 1, b + 1], fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=rgb)
    return img


def layout_grid(
    canvases: np.ndarray, overlay: Image.Image | np.ndarray | None = None, *, columns: int | None = None
) -> Image.Image:
    """Canvases (and an optional overlay first) tiled into one RGB image with 2-pixel grey gaps."""
    canvases = np.asarray(canvases)
    if canvases.ndim != 4 or canvases.shape[-1] != 3:
        raise ValueError(f"expected canvases (N, H, W, 3), got shape {canvases.shape}")
    n, h, w, _ = canvases.shape
    tiles = [np.asarray(c) for c in canvases]
    if overlay is not None:
        tiles.insert(0, np.asarray(_as_pil(overlay).resize((w, h), Image.BICUBIC)))
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    gap = 2
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 128, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return Image.fromarray(grid)


def save_layout_grid(
    path: str | os.PathLike,
    canvases: np.ndarray,
    overlay: Image.Image | np.ndarray | None = None,
    *,
    columns: int | None = None,
) -> None:
    """Write :func:`layout_grid` as a PNG (temp file + rename, so nothing half-written)."""
    grid = layout_grid(canvases, overlay, columns=columns)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            grid.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
