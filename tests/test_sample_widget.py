"""Plan boxes <-> jupyter_bbox_widget boxes (got_jax/sampling/widget.py): round trip, the GoT coordinate
convention (0..1000 of width / height, top-left origin, the pixels the layout painter fills), clamping, labels,
and rewriting a chain's boxes in place."""

import numpy as np
import pytest

from got_jax.got.layout import render_layout_canvases
from got_jax.got.text import Box, parse_got
from got_jax.sampling.widget import box_label, parse_label, plan_to_widget, replace_boxes, widget_to_plan


def _random_boxes(rng, n):
    colors = ["red", "orange", "blue", "#00ff00", "navy", None]
    out = []
    for k in range(n):
        x1, x2 = sorted(rng.choice(1001, 2, replace=False))
        y1, y2 = sorted(rng.choice(1001, 2, replace=False))
        phrase = None if k % 4 == 3 else f"object {k} with (parens"
        out.append(Box(int(x1), int(y1), int(x2), int(y2), phrase=phrase, color=colors[k % len(colors)]))
    return out


@pytest.mark.parametrize("width,height", [(1024, 1024), (97, 61), (64, 800)])
def test_round_trip_is_exact(width, height):
    boxes = _random_boxes(np.random.default_rng(width + height), 24)
    back = widget_to_plan(plan_to_widget(boxes, width, height), width, height, default_color=None)
    assert back == boxes


def test_widget_pixels_are_the_plan_fractions_and_cover_the_painted_pixels():
    w, h = 200, 100
    wb = plan_to_widget([Box(250, 100, 750, 500, "a cat", "orange")], w, h)[0]
    assert wb == {"x": 50.0, "y": 10.0, "width": 100.0, "height": 40.0, "label": "a cat (orange)"}
    # the layout painter fills columns int(x1/1000*w) .. int(x2/1000*w) inclusive, rows likewise
    for box in _random_boxes(np.random.default_rng(1), 10):
        box = Box(*box.coords, color="red")
        b = plan_to_widget([box], w, h)[0]
        filled = render_layout_canvases([box], h, w)[0, ..., 0] > 0
        cols, rows = np.nonzero(filled.any(0))[0], np.nonzero(filled.any(1))[0]
        assert cols[0] == int(b["x"]) and cols[-1] == min(int(b["x"] + b["width"]), w - 1)
        assert rows[0] == int(b["y"]) and rows[-1] == min(int(b["y"] + b["height"]), h - 1)


def test_widget_edits_are_rounded_clamped_and_ordered():
    w, h = 640, 480
    boxes = widget_to_plan([
        {"x": -30, "y": -5, "width": 100, "height": 50, "label": "left (red)"},      # dragged past the top-left
        {"x": 600, "y": 400, "width": 200, "height": 200, "label": "right (blue)"},  # past the bottom-right
        {"x": 320, "y": 240, "width": -64, "height": -48, "label": "swapped"},       # drawn right-to-left
        {"x": 700, "y": 10, "width": 30, "height": 30, "label": "off (red)"},        # entirely off the image
        {"x": 10, "y": 10, "width": 0.1, "height": 30, "label": "click (red)"},      # no size after rounding
        {"x": 100.4, "y": 33.3, "width": 1, "height": 1, "label": "tiny (nosuchcolour)"},
    ], w, h)
    assert boxes == [
        Box(0, 0, round(70 * 1000 / w), round(45 * 1000 / h), "left", "red"),
        Box(round(600 * 1000 / w), round(400 * 1000 / h), 1000, 1000, "right", "blue"),
        Box(400, 400, 500, 500, "swapped", "white"),  # no colour in the label: the default
        Box(157, 69, 158, 71, "tiny", "white"),  # unknown colour: the default (parse_got's fallback)
    ]
    assert all(0 <= c <= 1000 for b in boxes for c in b.coords)
    with pytest.raises(ValueError, match=r"widget box 0 .*needs numeric x, y, width, height"):
        widget_to_plan([{"x": 1, "y": 2, "label": "a"}], w, h)
    with pytest.raises(ValueError, match="image size must be positive"):
        plan_to_widget([], 0, 10)


def test_labels():
    for box in (Box(0, 0, 1, 1, "a red apple", "red"), Box(0, 0, 1, 1, None, "red"), Box(0, 0, 1, 1, "x", None),
                Box(0, 0, 1, 1, "a (big) dog", "brown")):
        assert parse_label(box_label(box)) == (box.phrase, box.color)
    assert parse_label("") == (None, None)


def test_replace_boxes_keeps_the_reasoning_text():
    text = ("The image shows <|object_ref_start|>a cat<|object_ref_end|><|box_start|>(100,200),(400,900)<|box_end|>"
            " (orange) on <|object_ref_start|>a sofa<|object_ref_end|><|box_start|>(0,500),(1000,1000)<|box_end|>"
            " (blue).<|im_gen_start|>")
    cat, sofa = parse_got(text)
    moved = Box(500, 200, 800, 900, "a cat", "black")  # moved right, recoloured
    new = replace_boxes(text, [moved, sofa])
    assert parse_got(new) == [moved, sofa]
    assert new.startswith("The image shows ") and " on " in new and new.endswith(".<|im_gen_start|>")
    dog = Box(10, 10, 90, 90, "a dog", "white")
    more = replace_boxes(text, [cat, sofa, dog])
    assert parse_got(more) == [cat, sofa, dog] and more.endswith("<|im_gen_start|>")
    fewer = replace_boxes(text, [cat])
    assert parse_got(fewer) == [cat] and "a sofa" not in fewer and fewer.startswith("The image shows ")
