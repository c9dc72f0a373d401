"""A deterministic detector for the shapes world (in place of GenEval's Mask2Former + CLIP colour classifier).

1. **Colour segmentation.** Each pixel goes to the nearest colour of the shapes palette
   (:data:`got_jax.data.shapes.COLORS`, as PIL paints them) or of the white background, by RGB distance;
   pixels farther than :data:`MAX_COLOR_DISTANCE` from all of them (blends, noise) belong to nothing.
2. **Connected components** (8-connected) per palette colour; components smaller than ``min_area`` pixels
   are dropped.
3. **Shape from the mask.** The mask is compared with the ideal circle, square and triangle that the
   shapes set draws in the mask's box (:func:`got_jax.data.shapes.shape_mask`); the shape with the highest
   IoU wins and that IoU is the detection's confidence. Components whose confidence is below
   :data:`MIN_CONFIDENCE`, whose box is thinner than 3 px or more elongated than :data:`MAX_ASPECT` are not
   objects (GenEval likewise keeps detections above a confidence threshold): colour noise does not count.

A detection's box is the mask's extent ``(x_min, y_min, x_max + 1, y_max + 1)`` in pixels (for a render of
the shapes set: exactly the object's pixel rectangle), its colour the palette colour it was segmented as;
detections are ordered by decreasing confidence, then area (GenEval's rules take the most confident first).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from got_jax.data.shapes import COLORS, SHAPES, shape_mask
from got_jax.eval.geneval import Detection
from got_jax.got.text import color_to_rgb

BACKGROUND = (255, 255, 255)
PALETTE = np.asarray([color_to_rgb(c) for c in COLORS] + [BACKGROUND], np.float32)  # (len(COLORS) + 1, 3)
MAX_COLOR_DISTANCE = 80.0  # < half the smallest palette distance (red-orange: 165)
MIN_CONFIDENCE = 0.75  # IoU with the ideal shape
MAX_ASPECT = 2.0  # the shapes set draws boxes at most 2:1
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
    d = np.sum((img[:, :, None, :].astype(np.float32) - PALETTE[None, None]) ** 2, axis=-1)
    label = np.argmin(d, axis=-1)
    label[np.min(d, axis=-1) > MAX_COLOR_DISTANCE ** 2] = -1
    return label


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU with that shape's ideal mask in the same box) for a boolean object mask cropped to its box."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("classify_shape: empty mask")
    h, w = mask.shape
    ious = []
    for s in SHAPES:
        ideal = shape_mask(s, h, w)
        ious.append((mask & ideal).sum() / (mask | ideal).sum())
    best = int(np.argmax(ious))
    return SHAPES[best], float(ious[best])


def detect(image, *, min_area: int | None = None) -> list[Detection]:
    """All objects of an image (uint8 (H, W, 3) array or PIL image), most confident first."""
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
            bh, bw = mask.shape
            if min(bh, bw) < 3 or max(bh, bw) > MAX_ASPECT * min(bh, bw):
                continue
            shape, conf = classify_shape(mask)
            if conf < MIN_CONFIDENCE:
                continue
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            out.append(Detection(shape, color, tuple(float(v) for v in box), float(area), conf))
    out.sort(key=lambda d: (-d.confidence, -d.area, d.box))
    return out
