"""A deterministic detector for the shapes world (in place of GenEval's Mask2Former + CLIP colour classifier).

1. **Colour segmentation.** Each pixel goes to the nearest colour of the shapes palette
   (:data:`got_jax.data.shapes.COLORS`, as PIL paints them) or of the white background, by RGB distance;
   pixels farther than :data:`MAX_COLOR_DISTANCE` from all of them (blends, noise) belong to nothing.
2. **Connected components** (8-connected) per palette colour; components smaller than ``min_area`` pixels
   are dropped.
3. **Shape from the mask.** A triangle (apex up, as the shapes set draws it) has its centroid at about 2/3 of
   its height (a circle or square at 1/2); a square fills its box (a circle about pi/4 of it). So:
   centroid below :data:`TRIANGLE_CENTROID` of the box height -> triangle; else fill ratio above
   :data:`SQUARE_FILL` -> square; else circle.

A detection's box is the mask's extent ``(x_min, y_min, x_max + 1, y_max + 1)`` in pixels (for a render of
the shapes set: exactly the object's pixel rectangle), its colour the palette colour it was segmented as, and
its area (the confidence order of GenEval's rules: largest first) the mask's pixel count.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from got_jax.data.shapes import COLORS
from got_jax.eval.geneval import Detection
from got_jax.got.text import color_to_rgb

BACKGROUND = (255, 255, 255)
PALETTE = np.asarray([color_to_rgb(c) for c in COLORS] + [BACKGROUND], np.float32)  # (len(COLORS) + 1, 3)
MAX_COLOR_DISTANCE = 80.0  # < half the smallest palette distance (red-orange: 165)
TRIANGLE_CENTROID = 0.57
SQUARE_FILL = 0.9
_EIGHT = np.ones((3, 3), bool)


def default_min_area(height: int, width: int) -> int:
    """Smallest component kept: 0.4% of the image (16 px at 64x64), at least 4 px."""
    return max(4, round(0.004 * height * width))


def segment(image: np.ndarray) -> np.ndarray:
    """(H, W) int map: index into :data:`COLORS`, ``len(COLORS)`` for background, -1 for no colour."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"detector: expected an (H, W, 3) image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"detector: expected a uint8 image, got {img.dtype}")
    d = np.linalg.norm(img[:, :, None, :].astype(np.float32) - PALETTE[None, None], axis=-1)
    label = np.argmin(d, axis=-1)
    label[np.min(d, axis=-1) > MAX_COLOR_DISTANCE] = -1
    return label


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle from a boolean object mask (see the module docstring)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("classify_shape: empty mask")
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    centroid = (ys.mean() - ys.min() + 0.5) / h
    if centroid > TRIANGLE_CENTROID:
        return "triangle"
    return "square" if ys.size / (h * w) > SQUARE_FILL else "circle"


def detect(image, *, min_area: int | None = None) -> list[Detection]:
    """All objects of an image (uint8 (H, W, 3) array or PIL image), in decreasing area."""
    img = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    label = segment(img)
    h, w = label.shape
    min_area = default_min_area(h, w) if min_area is None else int(min_area)
    out = []
    for ci, color in enumerate(COLORS):
        comps, n = ndimage.label(label == ci, structure=_EIGHT)
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            mask = comps[sl] == k
            area = int(mask.sum())
            if area < min_area:
                continue
            shape = classify_shape(mask)
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            out.append(Detection(shape, color, tuple(float(v) for v in box), float(area)))
    out.sort(key=lambda d: (-d.area, d.box))
    return out
