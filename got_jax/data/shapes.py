"""Synthetic GoT shapes dataset: coloured circles / squares / triangles with exact GoT boxes.

Every object is drawn inside a pixel rectangle ``[x_lo, x_hi) x [y_lo, y_hi)`` that it touches on
all four sides, and its GoT box is the 0..1000 box that the layout renderer
(:func:`got_jax.got.layout.render_layout_canvases`) maps back to exactly that rectangle, so the
painted layout and the object's pixels coincide. Objects never overlap: one per cell of a 3 x 3 grid, each
:func:`cell_margin` pixels clear of its cell's borders. A plan lists its objects in :func:`reading_order`
(position plans: the related objects in reading order, then the reference object).

Captions cover GenEval's six task types (single object, two objects, counting, colours, position,
colour attribution), in turn, or with some weighted up (``--task-weights position=3``: :func:`task_cycle`).
Editing pairs (recolour, move, add, remove) carry a numbered editing plan.

Position captions ("two red circles to the left of a blue square", or GenEval's own template "a photo of a
red circle left of a blue square") hold under GenEval's position rule
(:func:`got_jax.eval.geneval.relative_position`) with margin :data:`RELATION_MARGIN`, on the pixel boxes
and on the GoT boxes alike, and the captioned relation is the only one that holds: the data teaches exactly
what the benchmark scores.

Held-out split (:func:`held_out`): a fixed set of (colour, shape, relation, colour, shape) position
combinations and (colour, shape, colour, shape) colour-attribution combinations, each with its mirror, that
no training scene (generation or editing, source or target) ever realises -- in its caption, its plan or
its pixels (:func:`leaks`). :func:`eval_prompts` draws the shapes-GenEval prompts: the held-out combinations
for position and colour attribution, and, for the small tasks, scenes from an rng stream that training
never uses.

Everything is deterministic from a seed. ``write_shapes`` stores the data in the layout the TFDS builders
read as their ``--manual_dir`` (``annotations/generation.jsonl``, ``annotations/editing.jsonl``,
``images/*.png``; field mappings ``shapes`` and ``shapes_edit`` of :mod:`got_jax.data.records`)::

    python -m got_jax.data.shapes --out DIR --size 64 --num-generation 200 --num-editing 100 --seed 0
    python -m got_jax.data.build got_generation --config shapes --manual_dir DIR --data_dir TFDS
    python -m got_jax.data.build got_editing --config shapes_edit --manual_dir DIR --data_dir TFDS
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from got_jax.eval.geneval import relation_margin, relative_position
from got_jax.got.text import Box, color_to_rgb, format_got

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EDITS = ("recolor", "move", "add", "remove")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
GRID = 3  # objects live in distinct cells of a GRID x GRID grid

# Layout paints (the colour tag after each box, which only paints the layout canvas): ``"color"`` tags a box with
# its object's colour, so the layout carries colour but not shape, and the UNet must take the shape from the
# reasoner's hidden states and tie it to the right box itself; ``"kind"`` tags it with a PIL colour naming the
# object's (colour, shape) pair (:data:`KIND_PAINTS`), so the layout carries both. GoT's layout colours are
# free (GOT_SYSTEM: "used only to paint the layout"); these are the shapes data's two choices.
PAINTS = ("color", "kind")
# One PIL colour per (colour, shape), each near its colour's hue (the overlays stay readable), chosen to keep the
# 18 paints' RGB directions apart: the minimum angle between two is 13.6 degrees (yellow vs orange, the closest
# pair of object colours: 12.3). Directions, not magnitudes, because a box's layout latent is averaged with the
# black canvases of the other boxes (GOT_SYSTEM, spatial guidance), which scales it.
KIND_PAINTS = {
    ("red", "circle"): "crimson", ("red", "square"): "maroon", ("red", "triangle"): "palevioletred",
    ("green", "circle"): "green", ("green", "square"): "chartreuse", ("green", "triangle"): "limegreen",
    ("blue", "circle"): "blue", ("blue", "square"): "darkslateblue", ("blue", "triangle"): "slategray",
    ("yellow", "circle"): "yellow", ("yellow", "square"): "olivedrab", ("yellow", "triangle"): "darkkhaki",
    ("purple", "circle"): "indigo", ("purple", "square"): "mediumorchid", ("purple", "triangle"): "mediumvioletred",
    ("orange", "circle"): "darkorange", ("orange", "square"): "orangered", ("orange", "triangle"): "coral",
}
PAINT_KINDS = {v: k for k, v in KIND_PAINTS.items()}  # paint -> (colour, shape)


def check_paint(paint: str) -> str:
    if paint not in PAINTS:
        raise ValueError(f"unknown layout paint {paint!r}; expected one of {PAINTS}")
    return paint


def paint_of(obj: "ShapeObject", paint: str = "color") -> str:
    """The colour tag that paints ``obj``'s box in the layout (:data:`PAINTS`)."""
    return obj.color if check_paint(paint) == "color" else KIND_PAINTS[(obj.color, obj.shape)]


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object: shape, colour name and its exact half-open pixel rectangle."""

    shape: str
    color: str
    x_lo: int
    y_lo: int
    x_hi: int
    y_hi: int
    cell: int

    @property
    def phrase(self) -> str:
        return f"{article(self.color)} {self.color} {self.shape}"


def article(word: str) -> str:
    """'a' or 'an' before ``word``."""
    return "an" if word[:1] in "aeiou" else "a"


def pixel_to_box_coords(lo: int, hi: int, size: int) -> tuple[int, int]:
    """0..1000 corners (c1, c2) that the layout renderer maps to the pixel range ``[lo, hi)``."""
    if not 0 <= lo < hi <= size or size > 1000:
        raise ValueError(f"bad pixel range [{lo}, {hi}) for size {size}")
    c1 = math.ceil(lo * 1000 / size)
    c2 = math.ceil((hi - 1) * 1000 / size)
    return c1, c2


def object_box(obj: ShapeObject, height: int, width: int, paint: str = "color") -> Box:
    """The exact GoT box of ``obj`` with its phrase and its layout paint (:func:`paint_of`)."""
    x1, x2 = pixel_to_box_coords(obj.x_lo, obj.x_hi, width)
    y1, y2 = pixel_to_box_coords(obj.y_lo, obj.y_hi, height)
    return Box(x1, y1, x2, y2, phrase=obj.phrase, color=paint_of(obj, paint))


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of ``shape`` touching all four sides of its h x w rectangle."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "circle":
        cy, cx = (h - 1) / 2, (w - 1) / 2
        ry, rx = max(h / 2, 0.5), max(w / 2, 0.5)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0 + 1e-9
    if shape == "triangle":
        # apex on the top row (centre), base spans the whole bottom row
        frac = (yy + 1) / h
        cx = (w - 1) / 2
        return np.abs(xx - cx) <= np.maximum(frac * (w / 2), 0.5) + 1e-9
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: list[ShapeObject], size: int, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """uint8 (size, size, 3) image of the objects on a plain background."""
    img = np.empty((size, size, 3), np.uint8)
    img[...] = background
    for o in objects:
        m = shape_mask(o.shape, o.y_hi - o.y_lo, o.x_hi - o.x_lo)
        img[o.y_lo : o.y_hi, o.x_lo : o.x_hi][m] = color_to_rgb(o.color)
    return img


def cell_margin(size: int) -> int:
    """Pixels every object keeps free at each border of its grid cell: neighbouring objects are at least twice
    this apart (4 px at 64 px, one latent cell of the demo's VAE), so a model that draws each object in its
    planned box does not merge neighbours."""
    return max(2, (size // GRID) // 10)


def _place(rng: np.random.Generator, shape: str, color: str, cell: int, size: int) -> ShapeObject:
    cs, m = size // GRID, cell_margin(size)
    row, col = divmod(cell, GRID)
    min_side = max(4, cs // 2)
    side_w = int(rng.integers(min_side, cs - 2 * m + 1))
    side_h = side_w if shape != "triangle" else int(rng.integers(min_side, cs - 2 * m + 1))
    x_lo = col * cs + int(rng.integers(m, cs - m - side_w + 1))
    y_lo = row * cs + int(rng.integers(m, cs - m - side_h + 1))
    return ShapeObject(shape, color, x_lo, y_lo, x_lo + side_w, y_lo + side_h, cell)


def _cells(rng, n, constraint=None):
    while True:
        cells = [int(c) for c in rng.choice(GRID * GRID, size=n, replace=False)]
        if constraint is None or constraint(cells):
            return cells


def reading_order(objects: list[ShapeObject]) -> list[ShapeObject]:
    """``objects`` sorted by grid cell, row by row (top-left first). Plans list their boxes in this order, so
    every box of a plan lies in a later cell than the one before it: a reasoner that learns the order cannot
    stack two objects in one box, as greedy decoding of randomly ordered plans did (every box in the centre)."""
    return sorted(objects, key=lambda o: o.cell)


# ------------------------------------------------------------------------------------ relations

# caption wording -> GenEval's relation; the GenEval-style captions use the relation itself
_RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# grid cells a relation can come from (a candidate; the GenEval check with margin decides)
_CELL_RELATIONS = {
    "left of": lambda a, b: a % GRID < b % GRID,
    "right of": lambda a, b: a % GRID > b % GRID,
    "above": lambda a, b: a // GRID < b // GRID,
    "below": lambda a, b: a // GRID > b // GRID,
}
RELATION_MARGIN = 0.1  # every generated relation holds under GenEval's rule by at least this much
_MAX_TRIES = 10_000


def pixel_box(obj: ShapeObject) -> tuple[int, int, int, int]:
    """The object's pixel box ``(x_lo, y_lo, x_hi, y_hi)`` (half-open: what a mask's extent gives)."""
    return (obj.x_lo, obj.y_lo, obj.x_hi, obj.y_hi)


def scene_relation_margin(a: ShapeObject, b: ShapeObject, relation: str, size: int) -> float:
    """:func:`got_jax.eval.geneval.relation_margin` of ``a`` relation ``b``, the smaller of its value on the
    pixel boxes (what a detector sees) and on the GoT boxes (what the plan says)."""
    ga, gb = object_box(a, size, size), object_box(b, size, size)
    return min(relation_margin(pixel_box(a), pixel_box(b), relation),
               relation_margin(ga.coords, gb.coords, relation))


def scene_relations(a: ShapeObject, b: ShapeObject, size: int) -> set[str]:
    """GenEval's relations of ``a`` to ``b`` that hold on their pixel boxes or on their GoT boxes."""
    ga, gb = object_box(a, size, size), object_box(b, size, size)
    return relative_position(pixel_box(a), pixel_box(b)) | relative_position(ga.coords, gb.coords)


# ------------------------------------------------------------------------------------ held-out split

SPLIT_SEED = 13  # fixes which combinations are held out (never change: it defines the benchmark)
HELD_OUT_POSITION_PAIRS = 24  # per axis (left/right, above/below): 4 x 24 position combinations
HELD_OUT_COLOR_ATTR_PAIRS = 15  # of 90 unordered pairs: 30 colour-attribution combinations
EVAL_STREAM = 2  # rng stream of evaluation scenes; training uses 0 (generation) and 1 (editing)
EVAL_SEED = 20_250_613


def _attribute_pairs() -> list[tuple[str, str, str, str]]:
    """Every ordered ((colour, shape), (colour, shape)) with different colours and different shapes."""
    return [(c1, s1, c2, s2) for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES
            if c1 != c2 and s1 != s2]


@functools.lru_cache(maxsize=None)
def held_out() -> dict[str, tuple]:
    """The fixed held-out split: ``"position"``: (c1, s1, relation, c2, s2) combinations (relation in GenEval's
    words), closed under the mirror (A left of B held out <=> B right of A held out), in evaluation order
    (relations interleaved); ``"color_attr"``: (c1, s1, c2, s2) combinations, closed under swapping the two
    objects. Training scenes never realise one (:func:`leaks`); evaluation prompts come only from them."""
    rng = np.random.default_rng(SPLIT_SEED)
    pairs = _attribute_pairs()
    pos = {}
    for rel in ("left of", "above"):
        reps = [pairs[i] for i in rng.permutation(len(pairs))]
        seen, chosen = set(), []
        for c1, s1, c2, s2 in reps:  # a representative and its mirror are the same scene: one pair
            if (c2, s2, c1, s1) in seen:
                continue
            seen.add((c1, s1, c2, s2))
            chosen.append((c1, s1, c2, s2))
            if len(chosen) == HELD_OUT_POSITION_PAIRS:
                break
        pos[rel] = [(c1, s1, rel, c2, s2) for c1, s1, c2, s2 in chosen]
        pos[_MIRROR[rel]] = [(c2, s2, _MIRROR[rel], c1, s1) for c1, s1, c2, s2 in chosen]
    half = HELD_OUT_POSITION_PAIRS // 2  # a mirror comes half a list later: the first prompts are distinct scenes
    order = [pos[r][(i + half * (r in ("right of", "below"))) % HELD_OUT_POSITION_PAIRS]
             for i in range(HELD_OUT_POSITION_PAIRS) for r in ("left of", "right of", "above", "below")]
    seen, ca = set(), []
    for i in rng.permutation(len(pairs)):
        c1, s1, c2, s2 = pairs[i]
        if (c1, s1, c2, s2) in seen:
            continue
        seen.update({(c1, s1, c2, s2), (c2, s2, c1, s1)})
        ca.append((c1, s1, c2, s2))
        if len(ca) == HELD_OUT_COLOR_ATTR_PAIRS:
            break
    ca = ca + [(c2, s2, c1, s1) for c1, s1, c2, s2 in ca]
    return {"position": tuple(order), "color_attr": tuple(ca)}


@functools.lru_cache(maxsize=None)
def _held_sets() -> tuple[frozenset, frozenset]:
    h = held_out()
    return frozenset(h["position"]), frozenset(h["color_attr"])


def scene_combinations(objects: list[ShapeObject], size: int) -> set[tuple]:
    """The (c1, s1, relation, c2, s2) and (c1, s1, c2, s2) combinations a scene realises: every ordered pair of
    objects with different shapes and colours, with every GenEval relation that holds between their boxes
    (pixel or GoT boxes, ``size`` x ``size`` image)."""
    out = set()
    for a in objects:
        for b in objects:
            if a is b or a.shape == b.shape or a.color == b.color:
                continue
            out.add((a.color, a.shape, b.color, b.shape))
            out.update((a.color, a.shape, rel, b.color, b.shape) for rel in scene_relations(a, b, size))
    return out


def leaks(objects: list[ShapeObject], size: int) -> set[tuple]:
    """The held-out combinations a scene realises (empty for every training scene)."""
    pos, ca = _held_sets()
    return {c for c in scene_combinations(objects, size) if c in pos or c in ca}


# ------------------------------------------------------------------------------------ scenes


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _place_relation(rng, rel: str, n: int, first: tuple[str, str], ref: tuple[str, str], size: int):
    """``n`` objects ``first`` (shape, colour) each in GenEval relation ``rel`` to one ``ref``, with margin."""
    for _ in range(_MAX_TRIES):
        cells = _cells(rng, n + 1, lambda cs: all(_CELL_RELATIONS[rel](a, cs[-1]) for a in cs[:-1]))
        objs = [_place(rng, first[0], first[1], k, size) for k in sorted(cells[:-1])] + [_place(rng, ref[0], ref[1], cells[-1], size)]
        if all(scene_relation_margin(o, objs[-1], rel, size) >= RELATION_MARGIN for o in objs[:-1]):
            return objs
    raise RuntimeError(f"no placement of {n} object(s) {rel} another at size {size} after {_MAX_TRIES} tries")


def _position_caption(style: str, n: int, c1: str, s1: str, rel: str, c2: str, s2: str) -> str:
    if style == "geneval":  # GenEval's template ("a photo of a dog right of a cup"), with the colours
        return f"a photo of {article(c1)} {c1} {s1} {rel} {article(c2)} {c2} {s2}"
    words = next(k for k, v in _RELATIONS.items() if v == rel)
    return f"{NUMBER_WORDS[n]} {c1} {_plural(s1, n)} {words} {article(c2)} {c2} {s2}"


def _draw(rng: np.random.Generator, task: str, size: int) -> tuple[str, list[ShapeObject]]:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if task in ("single_object", "colors"):
        s, c = pick(SHAPES), pick(COLORS)
        (cell,) = _cells(rng, 1)
        cap = f"a photo of a {s}" if task == "single_object" else f"a photo of {article(c)} {c} {s}"
        return cap, [_place(rng, s, c, cell, size)]
    if task in ("two_object", "color_attr"):
        s1, s2 = (str(x) for x in rng.choice(SHAPES, 2, replace=False))
        c1, c2 = (str(x) for x in rng.choice(COLORS, 2, replace=False))
        cells = _cells(rng, 2)
        objs = [_place(rng, s1, c1, cells[0], size), _place(rng, s2, c2, cells[1], size)]
        cap = (f"a photo of a {s1} and a {s2}" if task == "two_object"
               else f"a photo of {article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}")
        return cap, reading_order(objs)
    if task == "counting":
        n, s, c = int(rng.integers(2, 5)), pick(SHAPES), pick(COLORS)
        return f"a photo of {NUMBER_WORDS[n]} {_plural(s, n)}", reading_order([_place(rng, s, c, k, size) for k in _cells(rng, n)])
    if task == "position":
        style = pick(("geneval", "counted"))
        rel = pick(list(_CELL_RELATIONS))
        n = 1 if style == "geneval" else int(rng.integers(1, 3))
        s1, s2 = (str(x) for x in rng.choice(SHAPES, 2, replace=False))
        c1, c2 = (str(x) for x in rng.choice(COLORS, 2, replace=False))
        objs = _place_relation(rng, rel, n, (s1, c1), (s2, c2), size)
        return _position_caption(style, n, c1, s1, rel, c2, s2), objs
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def sample_scene(rng: np.random.Generator, task: str, size: int) -> tuple[str, list[ShapeObject]]:
    """A training caption of GenEval task type ``task`` and the objects that satisfy it: position relations
    hold under GenEval's rule with margin :data:`RELATION_MARGIN`, and no held-out combination is realised
    (the scene is redrawn until so)."""
    for _ in range(_MAX_TRIES):
        cap, objs = _draw(rng, task, size)
        if not leaks(objs, size):
            return cap, objs
    raise RuntimeError(f"no training scene of task {task!r} free of held-out combinations in {_MAX_TRIES} tries")


# ------------------------------------------------------------------------------------ evaluation prompts


def geneval_metadata(task: str, spec: dict) -> dict:
    """GenEval's metadata (``tag``, ``include``, ``exclude``) of an evaluation prompt ``spec``."""
    if task == "single_object":
        inc = [{"class": spec["shape"], "count": 1}]
    elif task == "two_object":
        inc = [{"class": spec["shapes"][0], "count": 1}, {"class": spec["shapes"][1], "count": 1}]
    elif task == "counting":
        return {"tag": task, "include": [{"class": spec["shape"], "count": spec["count"]}],
                "exclude": [{"class": spec["shape"], "count": spec["count"] + 1}]}
    elif task == "colors":
        inc = [{"class": spec["shape"], "count": 1, "color": spec["color"]}]
    elif task == "position":  # GenEval: the target first, then the object with its relation to group 0
        c1, s1, rel, c2, s2 = spec["combo"]
        inc = [{"class": s2, "count": 1}, {"class": s1, "count": 1, "position": [rel, 0]}]
    elif task == "color_attr":
        c1, s1, c2, s2 = spec["combo"]
        inc = [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return {"tag": task, "include": inc}


def _eval_spaces() -> dict[str, list[dict]]:
    return {
        "single_object": [{"shape": s} for s in SHAPES],
        "two_object": [{"shapes": (a, b)} for a in SHAPES for b in SHAPES if a != b],
        "counting": [{"shape": s, "count": n} for n in (2, 3, 4) for s in SHAPES],
        "colors": [{"shape": s, "color": c} for s in SHAPES for c in COLORS],
        "position": [{"combo": c} for c in held_out()["position"]],
        "color_attr": [{"combo": c} for c in held_out()["color_attr"]],
    }


def _eval_scene(rng, task: str, spec: dict, size: int) -> tuple[str, list[ShapeObject]]:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if task == "single_object":
        s = spec["shape"]
        return f"a photo of a {s}", [_place(rng, s, pick(COLORS), _cells(rng, 1)[0], size)]
    if task == "colors":
        s, c = spec["shape"], spec["color"]
        return f"a photo of {article(c)} {c} {s}", [_place(rng, s, c, _cells(rng, 1)[0], size)]
    if task == "counting":
        s, n = spec["shape"], spec["count"]
        c = pick(COLORS)
        return f"a photo of {NUMBER_WORDS[n]} {_plural(s, n)}", reading_order([_place(rng, s, c, k, size) for k in _cells(rng, n)])
    if task == "two_object":
        (s1, s2), cells = spec["shapes"], _cells(rng, 2)
        c1, c2 = (str(x) for x in rng.choice(COLORS, 2, replace=False))
        return f"a photo of a {s1} and a {s2}", reading_order([_place(rng, s1, c1, cells[0], size),
                                                                _place(rng, s2, c2, cells[1], size)])
    if task == "color_attr":
        c1, s1, c2, s2 = spec["combo"]
        cells = _cells(rng, 2)
        return (f"a photo of {article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}",
                reading_order([_place(rng, s1, c1, cells[0], size), _place(rng, s2, c2, cells[1], size)]))
    c1, s1, rel, c2, s2 = spec["combo"]
    return _position_caption("geneval", 1, c1, s1, rel, c2, s2), _place_relation(rng, rel, 1, (s1, c1), (s2, c2), size)


# which position / colour-attribution combinations eval_prompts draws from, and how an error names them
COMBOS = {"held_out": "are held out", "train": "are not held out"}


def train_combinations(task: str) -> list[tuple]:
    """The position (c1, s1, relation, c2, s2) or colour-attribution (c1, s1, c2, s2) combinations that are *not*
    held out, i.e. the ones training scenes may realise (with 12,000 scenes nearly all of them do)."""
    pos, ca = _held_sets()
    if task == "position":
        return [(c1, s1, rel, c2, s2) for c1, s1, c2, s2 in _attribute_pairs() for rel in _CELL_RELATIONS
                if (c1, s1, rel, c2, s2) not in pos]
    if task == "color_attr":
        return [c for c in _attribute_pairs() if c not in ca]
    raise ValueError(f"train_combinations: {task!r} has no combinations; expected position or color_attr")


def combinations(task: str, combos: str = "held_out") -> list[tuple]:
    """The position or colour-attribution combinations :func:`eval_prompts` draws ``combos`` prompts from."""
    return list(held_out()[task]) if combos == "held_out" else train_combinations(task)


def eval_prompts(task: str, n: int, size: int = 64, combos: str = "held_out") -> list[dict]:
    """``n`` evaluation prompts of ``task`` in GenEval's phrasing: ``{"task", "index", "prompt", "metadata",
    "objects"}`` where ``objects`` is a ground-truth scene of the prompt (drawn from the evaluation rng stream,
    which training never uses). Position and colour-attribution prompts are the held-out combinations (in
    :func:`held_out` order; asking for more than there are is an error); the small tasks cycle through their
    few possible prompts in a fixed shuffled order.

    ``combos="train"`` (a diagnostic, not the benchmark) draws position and colour-attribution prompts from the
    combinations training may realise instead (:func:`train_combinations`, a fixed shuffled order, fresh
    evaluation-stream scenes): the gap to the held-out score is what compositional generalisation costs. The
    small tasks are the same either way."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if combos not in COMBOS:
        raise ValueError(f"combos={combos!r}; expected one of {tuple(COMBOS)}")
    space = _eval_spaces()[task]
    stream = [EVAL_SEED, EVAL_STREAM, TASKS.index(task)]
    order = None
    if task in ("position", "color_attr"):
        space = [{"combo": c} for c in combinations(task, combos)]
        if n > len(space):
            raise ValueError(f"{n} {task} prompts asked for, but only {len(space)} combinations {COMBOS[combos]}")
        if combos == "held_out":
            order = list(range(len(space)))  # held_out() order
        else:
            stream = stream + [1]  # the diagnostic's own order and scenes
    if order is None:
        order = [int(i) for i in np.random.default_rng(stream).permutation(len(space))]
    out = []
    for i in range(n):
        spec = space[order[i % len(order)]]
        rng = np.random.default_rng(stream + [i])
        caption, objs = _eval_scene(rng, task, spec, size)
        out.append({"task": task, "index": i, "prompt": caption, "metadata": geneval_metadata(task, spec), "objects": objs})
    return out


def got_text(caption: str, objects: list[ShapeObject], size: int, paint: str = "color") -> str:
    """Generation GoT text in the released format (description, then one box per object, tagged with its
    layout paint: :data:`PAINTS`)."""
    boxes = [object_box(o, size, size, paint) for o in objects]
    names = ", ".join(o.phrase for o in objects)
    prefix = f"The image shows {caption} on a plain white background, containing {names}.\n"
    return format_got(boxes, prefix)


def task_cycle(weights: dict[str, int] | None = None) -> tuple[str, ...]:
    """The repeating order of generation tasks: each task ``weights[task]`` times (default 1) per cycle,
    interleaved (smooth weighted round-robin; ties in :data:`TASKS` order). All weights 1 give :data:`TASKS`
    itself, so the default data is unchanged. Weights are non-negative integers, at least one positive."""
    w = {t: 1 for t in TASKS}
    for t, v in (weights or {}).items():
        if t not in TASKS:
            raise ValueError(f"task weight for unknown task {t!r}; tasks are {TASKS}")
        if int(v) != v or v < 0:
            raise ValueError(f"task weight {t}={v}: must be a non-negative integer")
        w[t] = int(v)
    total = sum(w.values())
    if total == 0:
        raise ValueError("task weights are all 0: no generation task left")
    credit, out = {t: 0 for t in TASKS}, []
    for _ in range(total):
        for t in TASKS:
            credit[t] += w[t]
        best = max(TASKS, key=lambda t: (credit[t], -TASKS.index(t)))
        credit[best] -= total
        out.append(best)
    return tuple(out)


def parse_task_weights(text: str) -> dict[str, int]:
    """``"position=3,counting=2"`` -> ``{"position": 3, "counting": 2}`` (checked by :func:`task_cycle`)."""
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"task weight {part!r}: expected TASK=INTEGER, e.g. position=3")
        out[name.strip()] = int(value)
    task_cycle(out)
    return out


def generation_example(seed: int, index: int, size: int, task_weights: dict[str, int] | None = None,
                       paint: str = "color") -> dict:
    """One generation example: caption, GoT text, image (uint8 HWC), the ground-truth GoT boxes and objects.
    The task is ``task_cycle(task_weights)[index % len(cycle)]`` (default: GenEval's six in turn); ``paint`` the
    boxes' layout colour tags (:data:`PAINTS`; the scenes do not depend on it)."""
    rng = np.random.default_rng([seed, 0, index])
    cycle = task_cycle(task_weights)
    task = cycle[index % len(cycle)]
    caption, objs = sample_scene(rng, task, size)
    return {
        "id": f"gen_{index:07d}", "task": task, "caption": caption, "got": got_text(caption, objs, size, paint),
        "image": render(objs, size), "boxes": [object_box(o, size, size, paint) for o in objs], "objects": objs,
    }


def editing_example(seed: int, index: int, size: int, paint: str = "color") -> dict:
    """One editing pair (recolour / move / add / remove) with a numbered editing plan; neither image realises a
    held-out combination (:func:`leaks`). ``paint``: the boxes' layout colour tags (:data:`PAINTS`)."""
    rng = np.random.default_rng([seed, 1, index])
    kind = EDITS[index % len(EDITS)]
    for _ in range(_MAX_TRIES):  # redrawn until neither image realises a held-out combination
        n = int(rng.integers(1 if kind in ("add", "recolor", "move") else 2, 4))
        cells = _cells(rng, n + 1)
        objs = [_place(rng, str(rng.choice(SHAPES)), str(rng.choice(COLORS)), k, size) for k in cells[:n]]
        k = int(rng.integers(n))
        tgt = list(objs)
        if kind == "recolor":
            new = str(rng.choice([c for c in COLORS if c != objs[k].color]))
            tgt[k] = dataclasses.replace(objs[k], color=new)
            instr = f"change the color of the {objs[k].color} {objs[k].shape} to {new}"
            subject, result = objs[k], tgt[k]
        elif kind == "move":
            o = objs[k]
            cs = size // GRID
            dr, dc = divmod(cells[n], GRID)
            r, c = divmod(o.cell, GRID)
            dx, dy = (dc - c) * cs, (dr - r) * cs
            tgt[k] = dataclasses.replace(o, x_lo=o.x_lo + dx, x_hi=o.x_hi + dx, y_lo=o.y_lo + dy, y_hi=o.y_hi + dy, cell=cells[n])
            instr = f"move the {o.color} {o.shape} to the {['top', 'middle', 'bottom'][dr]} {['left', 'center', 'right'][dc]}"
            subject, result = o, tgt[k]
        elif kind == "add":
            new = _place(rng, str(rng.choice(SHAPES)), str(rng.choice(COLORS)), cells[n], size)
            tgt.append(new)
            instr = f"add {new.phrase}"
            subject, result = new, new
        else:
            o = tgt.pop(k)
            instr = f"remove the {o.color} {o.shape}"
            subject, result = o, None
        if not leaks(objs, size) and not leaks(tgt, size):
            break
    else:
        raise RuntimeError(f"no editing scene free of held-out combinations in {_MAX_TRIES} tries")
    sb = object_box(subject, size, size, paint)
    names = ", ".join(o.phrase for o in objs)
    steps = [f"1. The source image shows {names} on a plain white background.\n", f"2. The object to edit is "]
    segs = [steps[0] + steps[1]]
    boxes = [sb]
    if kind == "add":
        segs = [steps[0] + "2. The new object goes at "]
    tail = {
        "recolor": f".\n3. Change its color from {subject.color} to {result.color if result else ''}.\n4. The result shows {', '.join(o.phrase for o in tgt)}.",
        "move": ".\n3. Move it to its new position ",
        "add": f".\n3. Paint {subject.phrase} there.\n4. The result shows {', '.join(o.phrase for o in tgt)}.",
        "remove": f".\n3. Remove it and fill the area with the white background.\n4. The result shows {', '.join(o.phrase for o in tgt) or 'an empty background'}.",
    }[kind]
    if kind == "move":
        boxes.append(object_box(result, size, size, paint))
        segs.append(tail)
        tail = f".\n4. The result shows {', '.join(o.phrase for o in tgt)}."
    return {
        "id": f"edit_{index:07d}", "task": kind, "instruction": instr, "got": format_got(boxes, segments=segs, suffix=tail),
        "source_image": render(objs, size), "target_image": render(tgt, size), "boxes": boxes,
    }


ANNOTATIONS = "annotations"  # the folder the TFDS builders read (got_jax.data.tfds_builders)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_png(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img).save(path, format="PNG")


def write_shapes(out: str | os.PathLike, *, size: int = 64, num_generation: int = 60, num_editing: int = 20, seed: int = 0,
                 task_weights: dict[str, int] | None = None, paint: str = "color") -> Path:
    """Write ``annotations/generation.jsonl`` / ``annotations/editing.jsonl`` + ``images/*.png`` under ``out``
    (atomically per file): a ``--manual_dir`` for ``got_generation --config shapes`` and ``got_editing --config
    shapes_edit`` as written. ``task_weights`` sets the share of each generation task (:func:`task_cycle`),
    ``paint`` the boxes' layout colour tags (:data:`PAINTS`)."""
    task_cycle(task_weights)  # bad weights and paints fail before anything is written
    check_paint(paint)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / ANNOTATIONS).mkdir(parents=True, exist_ok=True)
    gen = functools.partial(generation_example, task_weights=task_weights, paint=paint)
    edit = functools.partial(editing_example, paint=paint)
    for name, n, fn in (("generation", num_generation, gen), ("editing", num_editing, edit)):
        lines = []
        for i in range(n):
            ex = fn(seed, i, size)
            rec = {k: ex[k] for k in ("id", "task", "got")}
            if name == "generation":
                rec["caption"] = ex["caption"]
                rec["image"] = f"images/{ex['id']}.png"
                _write_png(out / rec["image"], ex["image"])
            else:
                rec["instruction"] = ex["instruction"]
                for key in ("source_image", "target_image"):
                    rec[key] = f"images/{ex['id']}_{key.split('_')[0]}.png"
                    _write_png(out / rec[key], ex[key])
            lines.append(json.dumps(rec))
        fd, tmp = tempfile.mkstemp(dir=out / ANNOTATIONS, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, out / ANNOTATIONS / f"{name}.jsonl")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write (the --manual_dir of got_jax.data.build)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-generation", type=int, default=60)
    p.add_argument("--num-editing", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-weights", default="", help="share of each generation task per cycle, e.g. position=3 "
                   f"(others 1; tasks: {','.join(TASKS)})")
    p.add_argument("--paint", default="color", choices=PAINTS,
                   help="layout colour tags: the object's colour, or a colour naming its (colour, shape) kind")
    a = p.parse_args(argv)
    try:
        weights = parse_task_weights(a.task_weights)
    except ValueError as e:
        p.error(f"--task-weights: {e}")
    path = write_shapes(a.out, size=a.size, num_generation=a.num_generation, num_editing=a.num_editing, seed=a.seed,
                        task_weights=weights, paint=a.paint)
    print(f"wrote {a.num_generation} generation and {a.num_editing} editing examples to {path}; build them with\n"
          f"  python -m got_jax.data.build got_generation --config shapes --manual_dir {path} --data_dir TFDS_DIR\n"
          f"  python -m got_jax.data.build got_editing --config shapes_edit --manual_dir {path} --data_dir TFDS_DIR")


if __name__ == "__main__":
    main()
