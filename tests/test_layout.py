"""Layout canvases equal the released PIL drawing pixel for pixel; overlay / grid helpers work."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from got_reference import diffusion_transform, released_layout_canvases

from got_jax.got.layout import draw_overlay, layout_grid, render_layout_canvases, save_layout_grid, to_model_range
from got_jax.got.text import Box, parse_got

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "gray", "darkgreen"]


def _pil_reference(boxes, height, width):
    """The released layout code, written out: one black canvas per coloured box, PIL rectangle fill."""
    coloured = [b for b in boxes if b.color is not None]
    canvases = [Image.new("RGB", (width, height), (0, 0, 0)) for _ in range(max(len(coloured), 1))]
    for canvas, b in zip(canvases, coloured):
        ImageDraw.Draw(canvas).rectangle(
            ((b.x1 / 1000 * width, b.y1 / 1000 * height), (b.x2 / 1000 * width, b.y2 / 1000 * height)), fill=b.color)
    return np.stack([np.asarray(c) for c in canvases])


def _random_boxes(rng, n):
    out = []
    for _ in range(n):
        x1, x2 = sorted(rng.choice(1001, 2, replace=False))
        y1, y2 = sorted(rng.choice(1001, 2, replace=False))
        color = None if rng.random() < 0.15 else str(rng.choice(COLOURS))
        out.append(Box(int(x1), int(y1), int(x2), int(y2), "obj", color))
    return out


@pytest.mark.parametrize("height, width", [(64, 64), (37, 53), (1, 7), (101, 3), (128, 96), (29, 1000)])
def test_equals_pil_random_boxes(height, width):
    rng = np.random.default_rng(height * 1009 + width)
    for _ in range(60):
        boxes = _random_boxes(rng, int(rng.integers(0, 5)))
        ours = render_layout_canvases(boxes, height, width)
        ref = _pil_reference(boxes, height, width)
        assert ours.dtype == np.uint8 and ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


def test_edge_boxes_equal_pil():
    # full canvas, 1-unit boxes and corners where c / 1000 * size lands just below an integer
    boxes = [Box(0, 0, 1000, 1000, color="red"), Box(999, 999, 1000, 1000, color="blue"),
             Box(290, 290, 291, 291, color="green"), Box(0, 0, 1, 1, color="white"), Box(70, 570, 290, 580, color="pink")]
    for h, w in [(100, 100), (1000, 1000), (7, 1001), (333, 29)]:
        np.testing.assert_array_equal(render_layout_canvases(boxes, h, w), _pil_reference(boxes, h, w))


def test_no_box_and_max_boxes():
    text = "no boxes <|box_start|>(1,2),(3,4)<|box_end|>"
    black = render_layout_canvases(parse_got(text), 16, 24)
    np.testing.assert_array_equal(black, np.stack([np.asarray(c) for c in released_layout_canvases(text, 16, 24)]))
    with pytest.raises(ValueError, match="3 coloured boxes, more than max_boxes=2"):
        render_layout_canvases([Box(0, 0, 10, 10, color="red")] * 3, 8, 8, max_boxes=2)


def test_to_model_range_equals_released_transform():
    canvases = render_layout_canvases([Box(0, 0, 500, 700, color="orange"), Box(100, 300, 900, 600, color="pink")],
                                      8, 12)
    x = to_model_range(canvases)
    want = np.stack([diffusion_transform(Image.fromarray(c), 8, 12).numpy().transpose(1, 2, 0) for c in canvases])
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)


def test_overlay_and_grid(tmp_path):
    boxes = [Box(100, 100, 600, 700, "a red apple", "red"), Box(650, 50, 950, 400, None, None)]
    image = np.full((64, 80, 3), 40, np.uint8)
    overlay = draw_overlay(image, boxes)
    arr = np.asarray(overlay)
    assert overlay.size == (80, 64) and (arr == (255, 0, 0)).all(-1).any()  # red outline drawn
    assert np.array_equal(arr[32, 30], image[32, 30])  # interior untouched
    canvases = render_layout_canvases(boxes, 64, 80)
    path = tmp_path / "grid.png"
    save_layout_grid(path, canvases, overlay)
    grid = np.asarray(Image.open(path))
    assert canvases.shape[0] == 1 and grid.shape == (64, 80 * 2 + 2, 3)  # overlay | canvas, 2-pixel gap
    np.testing.assert_array_equal(grid[:64, :80], arr)
    np.testing.assert_array_equal(grid, np.asarray(layout_grid(canvases, overlay)))
    np.testing.assert_array_equal(grid[:64, 82:162], canvases[0])
