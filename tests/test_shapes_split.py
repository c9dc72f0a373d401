"""The held-out split of the shapes set: fixed held-out (colour, shape, relation, colour, shape) position and
(colour, shape, colour, shape) colour-attribution combinations that training never realises, and the
shapes-GenEval prompts drawn only from them (small tasks: scenes from an rng stream training never uses)."""

import re

import numpy as np
import pytest

from got_jax.data import shapes
from got_jax.eval import detect, geneval
from got_jax.got.text import parse_got

MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _phrase_attrs(box):
    color, shape = box.phrase.split()[-2:]
    return color, shape


def _combos(objs):
    """(c1, s1, rel, c2, s2) and (c1, s1, c2, s2) of a list of (colour, shape, box): computed here from the rule."""
    out = set()
    for ca, sa, ba in objs:
        for cb, sb, bb in objs:
            if sa == sb or ca == cb:
                continue
            out.add((ca, sa, cb, sb))
            out.update((ca, sa, r, cb, sb) for r in geneval.relative_position(ba, bb))
    return out


def test_split_is_fixed_closed_under_mirrors_and_balanced():
    h = shapes.held_out()
    pos, ca = h["position"], h["color_attr"]
    assert len(pos) == len(set(pos)) == 4 * shapes.HELD_OUT_POSITION_PAIRS
    assert len(ca) == len(set(ca)) == 2 * shapes.HELD_OUT_COLOR_ATTR_PAIRS
    for c1, s1, rel, c2, s2 in pos:
        assert c1 != c2 and s1 != s2 and c1 in shapes.COLORS and s2 in shapes.SHAPES
        assert (c2, s2, MIRROR[rel], c1, s1) in pos  # the same scene described the other way round
    for c1, s1, c2, s2 in ca:
        assert (c2, s2, c1, s1) in ca
    assert {r: sum(p[2] == r for p in pos) for r in MIRROR} == {r: shapes.HELD_OUT_POSITION_PAIRS for r in MIRROR}
    # a strict subset: most combinations are trained (every colour-shape pair occurs in both kinds)
    all_pos = 4 * len(shapes.COLORS) * (len(shapes.COLORS) - 1) * len(shapes.SHAPES) * (len(shapes.SHAPES) - 1)
    assert len(pos) < all_pos / 5 and len(ca) < all_pos / 4 / 5
    # fixed: recomputed from scratch it is the same (it defines the benchmark)
    shapes.held_out.cache_clear()
    shapes._held_sets.cache_clear()
    assert shapes.held_out() == h


def test_no_held_out_combination_in_training_data():
    """3000 generation examples over 3 seeds and sizes, plus 300 editing pairs: no held-out combination in a
    caption, in the plan (colours / shapes of the GoT boxes and GenEval's relations between them) or in the
    objects; a detector pass over part of the images (independent of the generator's own bookkeeping) agrees."""
    pos, ca = (set(v) for v in shapes.held_out().values())
    held = pos | ca
    seen_tasks = {"position": 0, "color_attr": 0}
    caption = re.compile(r"(\w+) (circle|square|triangle)s? (?:to the )?(left of|right of|above|below|and) "
                         r"an? (\w+) (circle|square|triangle)$")
    for seed, size in ((0, 64), (1, 96), (2, 64)):
        for i in range(1000):
            ex = shapes.generation_example(seed, i, size)
            m = caption.search(ex["caption"])
            if ex["task"] in seen_tasks:
                assert m, ex["caption"]
                c1, s1, rel, c2, s2 = m.groups()
                combo = (c1, s1, c2, s2) if rel == "and" else (c1, s1, rel, c2, s2)
                assert combo not in held, ex["caption"]
                seen_tasks[ex["task"]] += 1
            boxes = parse_got(ex["got"], strict=True)
            assert not _combos([(*_phrase_attrs(b), b.coords) for b in boxes]) & held, ex["got"]
            assert not _combos([(o.color, o.shape, shapes.pixel_box(o)) for o in ex["objects"]]) & held
            if i % 10 == 0:
                dets = detect.detect(ex["image"])
                assert not _combos([(d.color, d.cls, d.box) for d in dets]) & held
    assert min(seen_tasks.values()) > 400, seen_tasks
    for i in range(300):
        ex = shapes.editing_example(i // 150, i, 64)
        for key in ("source_image", "target_image"):
            dets = detect.detect(ex[key])
            assert not _combos([(d.color, d.cls, d.box) for d in dets]) & held, (ex["instruction"], key)


def test_leak_check_sees_held_out_scenes():
    """The generator's own filter (shapes.leaks) flags a scene that realises a held-out combination."""
    (c1, s1, rel, c2, s2) = shapes.held_out()["position"][0]
    p = shapes.eval_prompts("position", 1)[0]
    assert (c1, s1, rel, c2, s2) in shapes.leaks(p["objects"], 64)
    q = shapes.eval_prompts("color_attr", 1)[0]
    a, b = q["objects"]
    assert (a.color, a.shape, b.color, b.shape) in shapes.leaks(q["objects"], 64)


@pytest.mark.parametrize("task", shapes.TASKS)
def test_eval_prompts_come_from_the_held_out_split(task):
    n = {"position": len(shapes.held_out()["position"]), "color_attr": len(shapes.held_out()["color_attr"])}.get(task, 24)
    prompts = shapes.eval_prompts(task, n, 64)
    assert [p["index"] for p in prompts] == list(range(n)) and all(p["task"] == task for p in prompts)
    assert all(p["prompt"].startswith("a photo of ") for p in prompts)  # GenEval's phrasing
    if task == "position":
        got = set()
        for p in prompts:
            m = re.fullmatch(r"a photo of an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)", p["prompt"])
            assert m, p["prompt"]
            got.add(m.groups())
            inc = p["metadata"]["include"]
            assert inc == [{"class": m[5], "count": 1}, {"class": m[2], "count": 1, "position": [m[3], 0]}]
        assert got == set(shapes.held_out()["position"])  # exactly the held-out ones, each once
    elif task == "color_attr":
        got = {re.fullmatch(r"a photo of an? (\w+) (\w+) and an? (\w+) (\w+)", p["prompt"]).groups() for p in prompts}
        assert got == set(shapes.held_out()["color_attr"])
    else:
        assert len({p["prompt"] for p in prompts}) == len(shapes._eval_spaces()[task])  # every prompt, cycled
        if task == "counting":
            for p in prompts:
                (inc,), (exc,) = p["metadata"]["include"], p["metadata"]["exclude"]
                assert exc == {"class": inc["class"], "count": inc["count"] + 1}
    # deterministic; the ground-truth scenes come from the evaluation stream, not any training example
    again = shapes.eval_prompts(task, n, 64)
    assert [p["prompt"] for p in again] == [p["prompt"] for p in prompts]
    assert all(np.array_equal(shapes.render(a["objects"], 64), shapes.render(b["objects"], 64))
               for a, b in zip(prompts, again))
    train = {shapes.generation_example(s, i, 64)["image"].tobytes() for s in range(2) for i in range(300)}
    assert not any(shapes.render(p["objects"], 64).tobytes() in train for p in prompts)


def test_too_many_held_out_prompts_is_an_error():
    with pytest.raises(ValueError, match="only 96 combinations are held out"):
        shapes.eval_prompts("position", 97)
    with pytest.raises(ValueError, match="unknown task 'spatial'"):
        shapes.eval_prompts("spatial", 1)


@pytest.mark.parametrize("task", ["position", "color_attr"])
def test_train_combination_prompts_are_seen_combinations_and_fixed(task):
    """``combos="train"`` (the compositional-generalisation diagnostic): prompts of combinations that are not
    held out, each scene realising its own combination, deterministic, different from the benchmark's."""
    held = set(shapes.held_out()[task])
    combos = shapes.train_combinations(task)
    assert len(combos) == len(set(combos)) == {"position": 4 * 180 - 96, "color_attr": 180 - 30}[task]
    assert not held & set(combos)
    prompts = shapes.eval_prompts(task, 40, 64, combos="train")
    pat = (r"a photo of an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)" if task == "position"
           else r"a photo of an? (\w+) (\w+) and an? (\w+) (\w+)")
    got = [re.fullmatch(pat, p["prompt"]).groups() for p in prompts]
    assert len(set(got)) == 40 and all(g in set(combos) for g in got)
    for g, p in zip(got, prompts):
        assert g in shapes.scene_combinations(p["objects"], 64)  # the ground truth realises the prompt
    assert [p["prompt"] for p in shapes.eval_prompts(task, 40, 64, combos="train")] == [p["prompt"] for p in prompts]
    assert [p["prompt"] for p in shapes.eval_prompts(task, 4, 64)] != [p["prompt"] for p in prompts[:4]]
    with pytest.raises(ValueError, match=r"combos='seen'; expected one of \('held_out', 'train'\)"):
        shapes.eval_prompts(task, 1, 64, combos="seen")
