"""Synthetic GoT shapes dataset: exact boxes, all GenEval task types, editing pairs, CLI format."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from got_jax.data import records, shapes
from got_jax.eval import geneval
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


_CAPTION = re.compile(
    r"^(?:a photo of )?(?P<n>a|an|one|two|three|four) (?:(?P<c1>\w+) )??(?P<s1>circle|square|triangle)s?"
    r"(?: (?P<rel>to the left of|to the right of|left of|right of|above|below|and) (?:a|an) (?:(?P<c2>\w+) )?"
    r"(?P<s2>circle|square|triangle))?$")
_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def _parse_caption(cap):
    m = _CAPTION.match(cap)
    assert m, cap
    rel = m["rel"] and m["rel"].replace("to the ", "")
    return _WORDS[m["n"]], m["c1"], m["s1"], rel, m["c2"], m["s2"]


def _phrase_attrs(box):
    words = box.phrase.split()
    return words[-2], words[-1]  # "a red circle" -> (red, circle)


def test_every_caption_holds_on_many_seeds():
    """Thousands of examples (4 seeds x 750, two sizes): counts, colours and shapes of every caption are the
    plan's; every position caption's relation holds under GenEval's rule (relative_position) with margin
    RELATION_MARGIN on the GoT boxes and the pixel boxes, and is the only relation that holds."""
    m = shapes.RELATION_MARGIN
    checked = {t: 0 for t in shapes.TASKS}
    for seed in range(4):
        size = (64, 96)[seed % 2]
        for i in range(750):
            ex = shapes.generation_example(seed, i, size)
            boxes = parse_got(ex["got"], strict=True)
            attrs = [_phrase_attrs(b) for b in boxes]
            assert [b.color for b in boxes] == [c for c, _ in attrs]
            n, c1, s1, rel, c2, s2 = _parse_caption(ex["caption"])
            task = ex["task"]
            checked[task] += 1
            if task in ("single_object", "colors", "counting"):
                assert len(boxes) == n and {s for _, s in attrs} == {s1}, ex["caption"]
                if c1 is not None:
                    assert {c for c, _ in attrs} == {c1}
            elif task in ("two_object", "color_attr"):
                assert rel == "and" and len(attrs) == 2, ex["caption"]
                if task == "color_attr":  # the plan lists the caption's two objects, in reading order
                    assert sorted(attrs) == sorted([(c1, s1), (c2, s2)]), ex["caption"]
                else:
                    assert sorted(s for _, s in attrs) == sorted([s1, s2]), ex["caption"]
            else:
                assert attrs == [(c1, s1)] * n + [(c2, s2)], ex["caption"]
                pix = [shapes.pixel_box(o) for o in ex["objects"]]
                for got_a, pix_a in zip(boxes[:-1], pix[:-1]):
                    for a, b in ((got_a.coords, boxes[-1].coords), (pix_a, pix[-1])):
                        assert geneval.relative_position(a, b) == {rel}, (ex["caption"], a, b)
                        dx, dy = geneval.position_offset(a, b)
                        along, across = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
                        assert abs(along) >= 0.5 + m and abs(across) <= 0.5 - m, (ex["caption"], dx, dy)
    assert min(checked.values()) >= 500, checked


@pytest.mark.parametrize("size", [64, 96, 128])
def test_objects_keep_their_cell_margin_and_plans_list_them_in_reading_order(size):
    """Every object keeps cell_margin(size) px clear of its cell's borders (so neighbours are >= 2 x that apart:
    4 px at 64), sizes span the whole allowed range, and plans list their objects row by row (position plans:
    the related objects in reading order, the reference last), in generation and evaluation scenes alike."""
    m, cs = shapes.cell_margin(size), size // shapes.GRID
    assert m == {64: 2, 96: 3, 128: 4}[size]
    sides = set()
    examples = [shapes.generation_example(s, i, size, {"position": 2}) for s in range(3) for i in range(200)]
    scenes = [(ex["task"], ex["objects"]) for ex in examples]
    scenes += [(t, p["objects"]) for t in shapes.TASKS for p in shapes.eval_prompts(t, 12, size)]
    for task, objs in scenes:
        for o in objs:
            row, col = divmod(o.cell, shapes.GRID)
            assert col * cs + m <= o.x_lo < o.x_hi <= (col + 1) * cs - m, (task, o)
            assert row * cs + m <= o.y_lo < o.y_hi <= (row + 1) * cs - m, (task, o)
            sides.add(o.x_hi - o.x_lo)
        listed = objs[:-1] if task == "position" else objs
        assert [o.cell for o in listed] == sorted(o.cell for o in listed), (task, objs)
    assert sides == set(range(max(4, cs // 2), cs - 2 * m + 1))
    for ex in examples:  # the plan's boxes are the objects', in the same order
        assert ex["boxes"] == [shapes.object_box(o, size, size) for o in ex["objects"]]
        assert parse_got(ex["got"], strict=True) == ex["boxes"]


def test_position_captions_use_both_phrasings():
    caps = [shapes.generation_example(0, i, 64)["caption"] for i in range(4, 600, 6)]
    assert any(c.startswith("a photo of ") and " left of " in c and "to the" not in c for c in caps)
    assert any(c.startswith("two ") and " to the " in c for c in caps)


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


def test_task_weights_set_the_share_of_each_task_and_default_to_geneval_in_turn(tmp_path, capsys):
    assert shapes.task_cycle() == shapes.TASKS == shapes.task_cycle({t: 1 for t in shapes.TASKS})
    assert [shapes.generation_example(3, i, 64)["task"] for i in range(12)] == list(shapes.TASKS) * 2
    cycle = shapes.task_cycle({"position": 3})
    assert len(cycle) == 8 and cycle.count("position") == 3 and set(cycle) == set(shapes.TASKS)
    assert all(cycle[i] != cycle[i + 1] for i in range(len(cycle) - 1) if cycle[i] == "position")  # interleaved
    assert "single_object" not in shapes.task_cycle({"single_object": 0})
    exs = [shapes.generation_example(3, i, 64, {"position": 3}) for i in range(16)]
    assert [e["task"] for e in exs] == list(cycle) * 2
    for e in exs:  # weighted scenes keep the data's guarantees: no held-out combination, relations with margin
        assert not shapes.leaks(e["objects"], 64)
        if e["task"] == "position":
            a, b = e["objects"][0], e["objects"][-1]
            rel = next(r for r in ("left of", "right of", "above", "below") if r in e["caption"])
            assert shapes.scene_relation_margin(a, b, rel, 64) >= shapes.RELATION_MARGIN
    assert shapes.parse_task_weights("position=3, counting=2") == {"position": 3, "counting": 2}
    assert shapes.parse_task_weights("") == {}
    for bad, msg in (("spatial=2", "unknown task 'spatial'"), ("position=x", "TASK=INTEGER"),
                     ("position", "TASK=INTEGER"), (",".join(f"{t}=0" for t in shapes.TASKS), "all 0")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            shapes.parse_task_weights(bad)
    out = tmp_path / "w"
    shapes.main(["--out", str(out), "--num-generation", "16", "--num-editing", "0", "--task-weights", "position=3"])
    tasks = [json.loads(line)["task"] for line in (out / "annotations" / "generation.jsonl").read_text().splitlines()]
    assert tasks.count("position") == 6 and len(tasks) == 16
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path / "bad"), "--task-weights", "spatial=2"])
    assert "--task-weights: task weight for unknown task 'spatial'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written


def test_kind_paints_name_each_colour_and_shape_apart():
    """``paint="kind"``: every box's layout tag is a PIL colour naming its (colour, shape) pair, the 18 paints are
    distinct in RGB direction (a box's layout latent is scaled by the averaging over boxes, so magnitude cannot tell
    them apart), and the scenes, captions and images are those of ``paint="color"``."""
    assert set(shapes.KIND_PAINTS) == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
    assert len(set(shapes.KIND_PAINTS.values())) == 18
    dirs = np.array([color_to_rgb(p) for p in shapes.KIND_PAINTS.values()], float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cos = dirs @ dirs.T
    np.fill_diagonal(cos, -1)
    assert np.degrees(np.arccos(cos.max())) > 13.5
    for i in range(24):
        kind, color = shapes.generation_example(4, i, 64, {"position": 3}, paint="kind"), shapes.generation_example(
            4, i, 64, {"position": 3})
        assert kind["caption"] == color["caption"] and np.array_equal(kind["image"], color["image"])
        boxes = parse_got(kind["got"], strict=True)
        assert [b.color for b in boxes] == [shapes.KIND_PAINTS[o.color, o.shape] for o in kind["objects"]]
        assert [b.color for b in parse_got(color["got"])] == [o.color for o in color["objects"]]
        assert [dataclasses.replace(b, color=None) for b in boxes] == [
            dataclasses.replace(b, color=None) for b in parse_got(color["got"])]  # same boxes and phrases
        canvases = render_layout_canvases(boxes, 64, 64)
        for canvas, o in zip(canvases, kind["objects"]):
            assert tuple(canvas[o.y_lo, o.x_lo]) == color_to_rgb(shapes.KIND_PAINTS[o.color, o.shape])
    for i in range(8):
        ed = shapes.editing_example(4, i, 64, paint="kind")
        tags = [b.color for b in parse_got(ed["got"])]
        assert tags and all(t in shapes.PAINT_KINDS for t in tags)
        assert shapes.PAINT_KINDS[tags[0]] in {(o, s) for o in shapes.COLORS for s in shapes.SHAPES}


def test_paint_option_of_the_cli(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path / "k"), "--num-generation", "6", "--num-editing", "2", "--paint", "kind"])
    for line in (tmp_path / "k" / "annotations" / "generation.jsonl").read_text().splitlines():
        tags = [b.color for b in parse_got(json.loads(line)["got"])]
        assert tags and all(t in shapes.PAINT_KINDS for t in tags)
    with pytest.raises(ValueError, match="unknown layout paint 'shape'"):
        shapes.write_shapes(tmp_path / "bad", paint="shape")
    assert not (tmp_path / "bad").exists()  # nothing written
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path / "bad2"), "--paint", "shape"])
    assert "--paint: invalid choice: 'shape'" in capsys.readouterr().err
