"""GenEval's scoring rules (djghosh13/geneval, ``evaluation/evaluate_images.py``), detector-agnostic.

A prompt's *metadata* is GenEval's: ``{"tag": task, "include": [req, ...], "exclude": [req, ...]}`` where a
requirement is ``{"class": name, "count": n}`` plus optionally ``"color": name`` and
``"position": [relation, index of an earlier include group]``. *Detections* map a class name to a list of
:class:`Detection` in decreasing confidence. The rules, as GenEval has them:

* an include requirement takes the first ``count`` detections of its class; fewer than ``count`` fails;
* with a colour, at least ``count`` of those must have that colour;
* with a position, every one of those must hold the relation against every object of the target group
  (:func:`relative_position`); a target group that failed its own requirement fails the position;
* an exclude requirement fails when ``count`` or more detections of its class exist (counting prompts
  include ``count = N`` and exclude ``count = N + 1``: exactly N);
* the overall score is the mean of the per-task accuracies.

Nothing here imports a model or the shapes set: the same rules score images (detected objects) and plans
(the boxes of a GoT text).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

POSITION_THRESHOLD = 0.1  # GenEval: each axis of the centre offset shrinks by 0.1 x the summed box sizes
RELATION_THRESHOLD = 0.5  # ... then a relation holds when the shrunk offset / |offset| passes 0.5
RELATIONS = ("left of", "right of", "above", "below")


@dataclasses.dataclass(frozen=True)
class Detection:
    """One found object: class name, colour name (None if unknown), box ``(x1, y1, x2, y2)`` in any units
    shared by all detections of an image (pixels for images, 0..1000 for plans), its size and confidence."""

    cls: str
    color: str | None
    box: tuple[float, float, float, float]
    area: float = 0.0
    confidence: float = 1.0


def position_offset(box_a: Sequence[float], box_b: Sequence[float]) -> tuple[float, float] | None:
    """GenEval's normalised offset of ``box_a``'s centre from ``box_b``'s: each axis of the centre offset is
    shrunk towards 0 by 0.1 x (width_a + width_b) (resp. heights), clamped at 0, then divided by the norm of
    the *original* offset. ``None`` when nothing is left on either axis (GenEval: ``|revised| < 1e-3``)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    ox, oy = (ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2
    rx = math.copysign(max(abs(ox) - POSITION_THRESHOLD * (abs(ax2 - ax1) + abs(bx2 - bx1)), 0.0), ox)
    ry = math.copysign(max(abs(oy) - POSITION_THRESHOLD * (abs(ay2 - ay1) + abs(by2 - by1)), 0.0), oy)
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return None
    norm = math.hypot(ox, oy)
    return rx / norm, ry / norm


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """The relations of A to B that GenEval's rule finds (possibly two, e.g. left of and above; or none)."""
    d = position_offset(box_a, box_b)
    if d is None:
        return set()
    dx, dy = d
    rels = set()
    if dx < -RELATION_THRESHOLD:
        rels.add("left of")
    if dx > RELATION_THRESHOLD:
        rels.add("right of")
    if dy < -RELATION_THRESHOLD:
        rels.add("above")
    if dy > RELATION_THRESHOLD:
        rels.add("below")
    return rels


def relation_margin(box_a: Sequence[float], box_b: Sequence[float], relation: str) -> float:
    """How far A-relation-B is inside GenEval's rule: the normalised offset on the relation's axis past the
    0.5 threshold, minus how far the other axis comes to its own threshold -- ``min(|d_rel| - 0.5,
    0.5 - |d_other|)`` with the sign of ``d_rel`` checked. Positive iff the relation holds and is the only one;
    ``>= m`` means both hold with margin ``m``. ``-1`` when no relation holds at all."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    d = position_offset(box_a, box_b)
    if d is None:
        return -1.0
    dx, dy = d
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    sign = -1.0 if relation in ("left of", "above") else 1.0
    return min(sign * along - RELATION_THRESHOLD, RELATION_THRESHOLD - abs(across))


def evaluate(detections: Mapping[str, Sequence[Detection]], metadata: Mapping) -> tuple[bool, str]:
    """GenEval's ``evaluate``: (correct, reason) for one image's (or plan's) detections against a prompt's
    metadata (see the module docstring). ``reason`` lists every failed requirement ("" when correct)."""
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = list(detections.get(cls, []))[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and matched:
                rel, target = req["position"]
                if target >= len(groups) or groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        bad = next((t for t in groups[target] if rel not in relative_position(obj.box, t.box)), None)
                        if bad is not None:
                            correct = matched = False
                            found_rels = " and ".join(sorted(relative_position(obj.box, bad.box))) or "no relation"
                            reasons.append(f"expected {cls} {rel} target, found {found_rels} target")
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        if len(detections.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(detections[cls])}")
    return correct, "\n".join(reasons)


def by_class(dets: Sequence[Detection]) -> dict[str, list[Detection]]:
    """Detections grouped per class, most confident first (GenEval's order), larger first among equals."""
    out: dict[str, list[Detection]] = {}
    for d in sorted(dets, key=lambda d: (-d.confidence, -d.area)):
        out.setdefault(d.cls, []).append(d)
    return out


def overall(task_accuracies: Mapping[str, float]) -> float:
    """GenEval's overall score: the mean of the per-task accuracies."""
    if not task_accuracies:
        raise ValueError("no task accuracies to average")
    return float(np.mean(list(task_accuracies.values())))
