"""Synthetic GoT shapes dataset: exact boxes, all GenEval task types, editing pairs, CLI format."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from got_jax.data import records, shapes
from got_jax.got.layout import render_layout_canvases
from got_jax.got.text import color_to_rgb, parse_got


def _pixel_bbox(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("size", [64, 128])
def test_generation_boxes_match_pixels(size):
    tasks = set()
    for i in range(36):
        ex = shapes.generation_example(7, i, size)
        tasks.add(ex["task"])
        img = ex["image"]
        boxes = parse_got(ex["got"], strict=True)
        assert boxes == ex["boxes"]
        canv = render_layout_canvases(boxes, size, size)
        for box, c in zip(boxes, canv):
            painted = c.any(-1)
            x0, y0, x1, y1 = _pixel_bbox(painted)
            # the object's own pixels (its colour, inside the painted box) touch every side of the box
            obj = np.all(img == np.array(color_to_rgb(box.color), np.uint8), -1) & painted
            assert _pixel_bbox(obj) == (x0, y0, x1, y1)
            assert painted.sum() == (x1 - x0) * (y1 - y0)
        # every non-background pixel is covered by some box of its colour
        fg = np.any(img != 255, -1)
        assert not (fg & ~canv.any(-1).any(0)).any()
    assert tasks == set(shapes.TASKS)


def test_positions_and_counts_follow_captions():
    for i in range(60):
        ex = shapes.generation_example(3, i, 96)
        b = ex["boxes"]
        if ex["task"] == "counting":
            n = next(k for k, w in shapes.NUMBER_WORDS.items() if f" {w} " in ex["caption"])
            assert len(b) == n
        if ex["task"] == "position":
            rel = next(r for r in shapes._RELATIONS if r in ex["caption"])
            ref = b[-1]
            for o in b[:-1]:
                ok = {"to the left of": o.x2 < ref.x1, "to the right of": o.x1 > ref.x2,
                      "above": o.y2 < ref.y1, "below": o.y1 > ref.y2}[rel]
                assert ok, (ex["caption"], o, ref)


def test_editing_pairs():
    kinds = set()
    for i in range(16):
        ex = shapes.editing_example(1, i, 64)
        kinds.add(ex["task"])
        assert ex["got"].startswith("1. ") and "\n2. " in ex["got"] and "\n3. " in ex["got"]
        boxes = parse_got(ex["got"], strict=True)
        assert boxes == ex["boxes"]
        src, tgt = ex["source_image"], ex["target_image"]
        changed = np.any(src != tgt, -1)
        assert changed.any()
        # every changed pixel lies inside the edited object's box(es)
        inside = render_layout_canvases(boxes, 64, 64).any(-1).any(0)
        assert not (changed & ~inside).any(), ex["instruction"]
    assert kinds == set(shapes.EDITS)


def test_deterministic_and_seed_dependent():
    a, b, c = (shapes.generation_example(s, 5, 64) for s in (0, 0, 1))
    assert a["got"] == b["got"] and np.array_equal(a["image"], b["image"])
    assert a["got"] != c["got"] or not np.array_equal(a["image"], c["image"])


def test_cli_writes_reader_format(tmp_path):
    shapes.main(["--out", str(tmp_path), "--size", "32", "--num-generation", "6", "--num-editing", "4", "--seed", "2"])
    ann = tmp_path / "annotations"
    gen = list(records.read_records(ann / "generation.jsonl", "shapes", tmp_path))
    edit = list(records.read_records(ann / "editing.jsonl", "shapes_edit", tmp_path))
    assert len(gen) == 6 and len(edit) == 4
    for i, r in enumerate(gen):
        ex = shapes.generation_example(2, i, 32)
        assert (r.id, r.caption, r.got) == (ex["id"], ex["caption"], ex["got"])
        import io
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.image))), ex["image"])
    assert json.loads((ann / "editing.jsonl").read_text().splitlines()[0])["instruction"] == edit[0].instruction


def test_cli_output_builds_as_written(tmp_path, capsys):
    """``shapes --out D`` is the ``--manual_dir D`` of both builders, unchanged (the README's chain)."""
    from got_jax.data import build

    old = os.umask(0o022)
    try:
        shapes.main(["--out", str(tmp_path / "d"), "--size", "32", "--num-generation", "5", "--num-editing", "3"])
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "d" / "annotations" / "generation.jsonl").st_mode & 0o777) == oct(0o644)
    for name, config, n in (("got_generation", "shapes", 5), ("got_editing", "shapes_edit", 3)):
        build.main([name, "--config", config, "--manual_dir", str(tmp_path / "d"), "--data_dir", str(tmp_path / "t")])
        assert f"{n} examples" in capsys.readouterr().out
