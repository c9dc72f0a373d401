"""Shapes-GenEval: GenEval's rules, the palette detector on ground-truth and wrong renders, plan scoring, the
pipeline's ``zero_layout`` and the ``python -m got_jax.eval.shapes`` CLI on a tiny random-weight folder."""

import dataclasses
import json
import math

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from got_jax.data import shapes
from got_jax.eval import detect, geneval
from got_jax.eval import shapes as ev

SIZE = 64  # the demo's image size
N_SMALL = 36  # prompts per small task (every possible prompt, cycled, with fresh scenes)


def _all_prompts(size=SIZE):
    out = []
    for t in shapes.TASKS:
        n = len(shapes.held_out()[t]) if t in ("position", "color_attr") else N_SMALL
        out += shapes.eval_prompts(t, n, size)
    return out


def _image_ok(img, metadata):
    return geneval.evaluate(geneval.by_class(detect.detect(img)), metadata)[0]


# ------------------------------------------------------------------------------------ GenEval's rules


def test_position_rule_boundaries_computed_from_the_rule():
    """Two 10 x 10 boxes on one row: the x offset shrinks by 0.1 * (10 + 10) = 2, then is divided by |offset|,
    so "left of" needs (|ox| - 2) / |ox| > 0.5, i.e. |ox| > 4; at |ox| = 4 exactly it is 0.5 (no relation)."""
    b = (50.0, 50.0, 60.0, 60.0)
    at = lambda ox, oy: (50.0 + ox, 50.0 + oy, 60.0 + ox, 60.0 + oy)  # noqa: E731
    assert geneval.position_offset(at(-4.0, 0.0), b) == (-0.5, 0.0)
    assert geneval.relative_position(at(-4.0, 0.0), b) == set()
    assert geneval.relative_position(at(-4.5, 0.0), b) == {"left of"}
    assert geneval.relative_position(at(4.5, 0.0), b) == {"right of"}
    assert geneval.relative_position(at(0.0, -4.5), b) == {"above"}  # y grows downwards
    assert geneval.relative_position(at(0.0, 4.5), b) == {"below"}
    # nothing left after shrinking on either axis: no relation at all (not even a weak one)
    assert geneval.position_offset(at(-2.0, 1.5), b) is None and geneval.relative_position(at(-2.0, 1.5), b) == set()
    # a diagonal: each axis (30 - 2) / (30 * sqrt 2) = 0.66 > 0.5 -> both relations hold
    assert geneval.relative_position(at(-30.0, -30.0), b) == {"left of", "above"}
    # the other axis counts in the norm: ox = -10, oy = 8 -> dx = -8 / hypot(10, 8) = -0.62; dy = 6 / 12.8 = 0.47
    dx, dy = geneval.position_offset(at(-10.0, 8.0), b)
    assert math.isclose(dx, -8 / math.hypot(10, 8)) and math.isclose(dy, 6 / math.hypot(10, 8))
    assert geneval.relative_position(at(-10.0, 8.0), b) == {"left of"}
    # box sizes matter: the same offset between two 40-wide boxes shrinks by 8 -> (10 - 8) / 10 = 0.2
    wide = (50.0, 50.0, 90.0, 60.0)
    assert geneval.relative_position((40.0, 50.0, 80.0, 60.0), wide) == set()
    # margins: positive iff the relation holds and is the only one
    assert math.isclose(geneval.relation_margin(at(-10.0, 0.0), b, "left of"), min(0.8 - 0.5, 0.5))
    assert geneval.relation_margin(at(-10.0, 0.0), b, "right of") < 0
    assert geneval.relation_margin(at(-30.0, -30.0), b, "left of") < 0  # "above" holds as well


def _det(cls, color, box, conf=1.0):
    return geneval.Detection(cls, color, box, (box[2] - box[0]) * (box[3] - box[1]), conf)


def test_counting_needs_exactly_n_and_colour_checks_the_most_confident():
    meta = {"include": [{"class": "circle", "count": 3}], "exclude": [{"class": "circle", "count": 4}]}
    circles = [_det("circle", "red", (10.0 * i, 0.0, 10.0 * i + 8, 8.0)) for i in range(5)]
    other = [_det("square", "blue", (0.0, 50.0, 9.0, 59.0))]
    verdicts = [geneval.evaluate(geneval.by_class(circles[:n] + other), meta)[0] for n in range(6)]
    assert verdicts == [False, False, False, True, False, False]
    assert "expected circle<4, found 4" in geneval.evaluate(geneval.by_class(circles[:4]), meta)[1]
    # colour: GenEval classifies the top `count` detections of the class (by confidence) only
    meta = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    dets = [_det("circle", "blue", (0.0, 0.0, 9.0, 9.0), 0.9), _det("circle", "red", (20.0, 0.0, 29.0, 9.0), 0.8)]
    assert not geneval.evaluate(geneval.by_class(dets), meta)[0]
    dets[1] = dataclasses.replace(dets[1], confidence=0.95)
    assert geneval.evaluate(geneval.by_class(dets), meta)[0]


def test_position_requirement_every_object_against_every_target():
    meta = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 2, "position": ["left of", 0]}]}
    sq = _det("square", "red", (40.0, 0.0, 50.0, 10.0))
    left = [_det("circle", "blue", (0.0, 0.0, 10.0, 10.0)), _det("circle", "blue", (10.0, 0.0, 20.0, 10.0))]
    assert geneval.evaluate(geneval.by_class([sq] + left), meta) == (True, "")
    right = dataclasses.replace(left[1], box=(60.0, 0.0, 70.0, 10.0))
    ok, why = geneval.evaluate(geneval.by_class([sq, left[0], right]), meta)
    assert not ok and "expected circle left of target, found right of target" in why
    ok, why = geneval.evaluate(geneval.by_class(left), meta)  # no square: the target group failed
    assert not ok and "no target for circle to be left of" in why
    assert geneval.overall({"a": 1.0, "b": 0.5, "c": 0.0}) == 0.5


# ------------------------------------------------------------------------------------ the detector


def test_detector_on_ground_truth_renders():
    """Ground truth of every evaluation prompt (and of training examples) passes at >= 0.98 per task, and the
    detector recovers the drawn objects themselves (shape, colour, exact pixel box)."""
    per, exact, n = {t: [] for t in shapes.TASKS}, 0, 0
    for p in _all_prompts():
        img = shapes.render(p["objects"], SIZE)
        dets = detect.detect(img)
        per[p["task"]].append(geneval.evaluate(geneval.by_class(dets), p["metadata"])[0])
        exact += sorted((d.cls, d.color, tuple(map(int, d.box))) for d in dets) == sorted(
            (o.shape, o.color, shapes.pixel_box(o)) for o in p["objects"])
        n += 1
    acc = {t: float(np.mean(v)) for t, v in per.items()}
    assert min(acc.values()) >= 0.98, acc
    assert exact / n >= 0.98
    for i in range(120):
        ex = shapes.generation_example(11, i, SIZE)
        got = sorted((d.cls, d.color, tuple(map(int, d.box))) for d in detect.detect(ex["image"]))
        assert got == sorted((o.shape, o.color, shapes.pixel_box(o)) for o in ex["objects"]), ex["caption"]


def _wrong_scenes(p, rng):
    """Renders that contradict prompt ``p`` (wrong counts, colours, shapes, positions), as object lists."""
    objs, t = p["objects"], p["task"]
    other = lambda seq, x: [v for v in seq if v != x][int(rng.integers(len(seq) - 1))]  # noqa: E731
    if t == "single_object":
        return [[dataclasses.replace(objs[0], shape=other(shapes.SHAPES, objs[0].shape))], []]
    if t == "two_object":
        third = next(s for s in shapes.SHAPES if s not in (objs[0].shape, objs[1].shape))
        return [objs[:1], objs[1:], [objs[0], dataclasses.replace(objs[1], shape=third)]]
    if t == "counting":
        free = [c for c in range(shapes.GRID ** 2) if c not in {o.cell for o in objs}]
        extra = shapes._place(rng, objs[0].shape, objs[0].color, free[0], SIZE)
        return [objs[:-1], objs + [extra]]
    if t == "colors":
        return [[dataclasses.replace(objs[0], color=other(shapes.COLORS, objs[0].color))]]
    if t == "color_attr":
        a, b = objs
        return [[dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)],
                [dataclasses.replace(a, color=other(shapes.COLORS, a.color)), b]]
    # position: mirror the boxes across the image centre on the relation's axis (shapes stay upright)
    rel = p["metadata"]["include"][1]["position"][0]
    if rel in ("left of", "right of"):
        mirror = [dataclasses.replace(o, x_lo=SIZE - o.x_hi, x_hi=SIZE - o.x_lo) for o in objs]
    else:
        mirror = [dataclasses.replace(o, y_lo=SIZE - o.y_hi, y_hi=SIZE - o.y_lo) for o in objs]
    a, b = objs
    swapped_shapes = [dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape)]
    return [mirror, swapped_shapes]


def test_detector_rejects_wrong_renders():
    """Renders of wrong counts, colours, shapes and positions, scored against the prompt: every one fails."""
    rng = np.random.default_rng(0)
    checked = {t: 0 for t in shapes.TASKS}
    for p in _all_prompts():
        for objs in _wrong_scenes(p, rng):
            assert not _image_ok(shapes.render(objs, SIZE), p["metadata"]), (p["prompt"], objs)
            checked[p["task"]] += 1
    assert min(checked.values()) >= 30, checked
    # pure noise holds no objects; a blurred object is still found
    noise = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    assert detect.detect(noise) == []
    p = shapes.eval_prompts("colors", 1)[0]
    blurred = np.asarray(Image.fromarray(shapes.render(p["objects"], SIZE)).resize((SIZE // 2, SIZE // 2), Image.BILINEAR)
                         .resize((SIZE, SIZE), Image.BILINEAR))
    assert _image_ok(blurred, p["metadata"])


def test_detector_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image, got shape \(8, 8\)"):
        detect.detect(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="expected a uint8 image, got float32"):
        detect.detect(np.zeros((8, 8, 3), np.float32))


# ------------------------------------------------------------------------------------ plan scoring


def test_plan_scoring_on_correct_and_wrong_plans():
    """The GoT text of each ground-truth scene satisfies its prompt; plans of wrong scenes do not; a plan
    without colour tags falls back to the colour word of its phrases; boxes without a shape are ignored."""
    rng = np.random.default_rng(0)
    for p in _all_prompts():
        assert ev.score_plan(shapes.got_text(p["prompt"], p["objects"], SIZE), p["metadata"])[0], p["prompt"]
        for objs in _wrong_scenes(p, rng):
            assert not ev.score_plan(shapes.got_text(p["prompt"], objs, SIZE), p["metadata"])[0], (p["prompt"], objs)
    meta = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    plan = "<|object_ref_start|>a red circle<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"
    assert ev.score_plan(plan, meta)[0]
    assert not ev.score_plan(plan.replace("red", "blue"), meta)[0]
    assert ev.plan_detections("no boxes at all") == []
    # two objects planned in one place fail (the greedy plans of recipe 2 stacked every box in the centre)
    meta2 = {"include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]}
    sq = "<|object_ref_start|>a blue square<|object_ref_end|><|box_start|>({},{}),({},{})<|box_end|> (blue)"
    assert ev.score_plan(plan + sq.format(400, 100, 600, 300), meta2)[0]  # apart
    assert ev.score_plan(plan + sq.format(300, 100, 500, 300), meta2)[0]  # touching edges: no common area
    ok, reason = ev.score_plan(plan + sq.format(299, 299, 500, 500), meta2)  # one unit of common area
    assert not ok and reason == "plan boxes 1 (circle) and 2 (square) overlap: (100, 100, 300, 300) and (299, 299, 500, 500)"
    assert not ev.score_plan(plan + sq.format(100, 100, 300, 300), meta2)[0]
    assert ev.plan_detections("<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(1,1),(9,9)<|box_end|> (red)") == []


# ------------------------------------------------------------------------------------ sampling


def test_follows_plan_checks_colour_and_place():
    plan = "<|object_ref_start|>a red circle<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|> (red)"
    img = np.full((64, 64, 3), 255, np.uint8)
    img[4:28, 4:28] = (255, 0, 0)
    assert ev.follows_plan(Image.fromarray(img), plan)
    assert ev.follows_plan(img, plan)  # an array works too
    assert not ev.follows_plan(Image.fromarray(img), plan.replace("(red)", "(blue)"))  # wrong colour
    assert not ev.follows_plan(Image.fromarray(img[::-1, ::-1].copy()), plan)  # painted elsewhere
    assert not ev.follows_plan(Image.fromarray(img), "a red circle")  # no box
    small = np.full((64, 64, 3), 255, np.uint8)
    small[4:8, 4:8] = (255, 0, 0)  # red, but 16 of the box's 1,024 pixels: under the 20% it needs
    assert not ev.follows_plan(small, plan)


def test_draws_plan_binds_each_planned_shape_to_its_box():
    """``draws``: the image's objects and the plan's pair up one to one (shape, colour, centre inside the planned
    box). Ground truth drawn from its own plan passes (every eval prompt, >= 0.98 as the detector); the same plan
    with its shapes swapped between the boxes, an object missing, an extra one or a recoloured one fails."""
    ok = [ev.draws_plan(shapes.render(p["objects"], SIZE), shapes.got_text(p["prompt"], p["objects"], SIZE))[0]
          for p in _all_prompts()]
    assert np.mean(ok) >= 0.98
    p = shapes.eval_prompts("position", 1, SIZE)[0]
    a, b = p["objects"]
    plan = shapes.got_text(p["prompt"], [a, b], SIZE)
    assert ev.draws_plan(Image.fromarray(shapes.render([a, b], SIZE)), plan) == (True, "")
    swapped = [dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape)]
    good, why = ev.draws_plan(shapes.render(swapped, SIZE), plan)
    assert not good and why == f"planned object 1 ({a.color} {a.shape}): its box holds {a.color} {b.shape}"
    assert ev.follows_plan(shapes.render(swapped, SIZE), plan)  # the lenient score cannot see it
    good, why = ev.draws_plan(shapes.render([a], SIZE), plan)
    assert not good and why == f"planned object 2 ({b.color} {b.shape}): nothing drawn in its box"
    free = next(c for c in range(shapes.GRID ** 2) if c not in (a.cell, b.cell))
    extra = shapes._place(np.random.default_rng(0), "circle", "red", free, SIZE)
    good, why = ev.draws_plan(shapes.render([a, b, extra], SIZE), plan)
    assert not good and why == "drawn but not planned: red circle"
    recoloured = [a, dataclasses.replace(b, color=next(c for c in shapes.COLORS if c not in (a.color, b.color)))]
    assert not ev.draws_plan(shapes.render(recoloured, SIZE), plan)[0]
    assert ev.draws_plan(shapes.render([a, b], SIZE), "a plan without boxes") == (
        False, "the plan states no object with a shape")


def test_summary_reports_follows_per_task_and_none_without_a_plan():
    rows = [{"task": "colors", "index": 0, "correct": True, "plan_correct": True, "follows": True},
            {"task": "colors", "index": 1, "correct": False, "plan_correct": True, "follows": False},
            {"task": "position", "index": 0, "correct": False, "plan_correct": False, "follows": True}]
    s = ev.summarize(rows, ("colors", "position"))
    assert s["tasks"]["colors"]["draws"] is None and s["overall"]["draws"] is None  # rows without the score
    assert s["tasks"]["colors"]["follows"] == 0.5 and s["tasks"]["position"]["follows"] == 1.0
    assert s["overall"]["follows"] == 0.75  # GenEval's way: the mean of the task means
    assert ev.format_table(s).splitlines()[-1].split()[-2] == "0.750"
    s = ev.summarize([dict(r, follows=None) for r in rows], ("colors", "position"))
    assert s["overall"]["follows"] is None and s["tasks"]["colors"]["follows"] is None
    s = ev.summarize([dict(r, draws=r["follows"] and r["correct"]) for r in rows], ("colors", "position"))
    assert s["tasks"]["colors"]["draws"] == 0.5 and s["tasks"]["position"]["draws"] == 0.0
    assert s["overall"]["draws"] == 0.25 and ev.format_table(s).splitlines()[-1].split()[-3] == "0.250"


class _StubVAEModel(nnx.Module):
    """The two model methods :func:`ev.vae_round_trips` uses (an NNX module, as it splits the model), with a VAE
    that is exact (``decode`` inverts ``encode_mode``) unless ``decode`` is given another map of the [0, 1] image."""

    def __init__(self, scaling_factor=0.25, post=None):
        import types

        self.config = types.SimpleNamespace(vae=types.SimpleNamespace(scaling_factor=scaling_factor))
        self.post = post or (lambda img: img)

    def encode_mode(self, images):
        return images * 3.0  # unscaled latents: any invertible map

    def decode(self, latents):
        import jax.numpy as jnp

        img = latents / self.config.vae.scaling_factor / 3.0  # the pipeline's decode divides by the scaling factor
        return self.post(jnp.clip(img / 2 + 0.5, 0.0, 1.0))


def test_vae_ceiling_scores_round_trips_of_the_ground_truth():
    """An exact VAE passes every task (the ground-truth renders do); a VAE that rotates the colour channels
    (red -> blue, the other palette colours off the palette) fails the colour tasks, and one that blurs the
    shapes (4x4 block means) fails where shapes must be recognised."""
    import types

    import jax.numpy as jnp

    settings = ev.Settings(prompts_per_task=12, size=SIZE)
    exact = ev.vae_round_trips(types.SimpleNamespace(model=_StubVAEModel()), settings, batch_size=5)
    assert len(exact) == 72 and {r["task"] for r in exact} == set(shapes.TASKS)
    s = ev.summarize([dict(r, plan_correct=True, follows=None) for r in exact], shapes.TASKS, exact)
    assert s["overall"]["vae_ceiling"] == 1.0 and all(v["vae_ceiling"] == 1.0 for v in s["tasks"].values())
    swapped = ev.vae_round_trips(types.SimpleNamespace(model=_StubVAEModel(post=lambda im: im[..., [1, 2, 0]])), settings)
    acc = ev.summarize([dict(r, plan_correct=True) for r in swapped], shapes.TASKS, swapped)["tasks"]
    assert acc["colors"]["vae_ceiling"] == 0.0 and acc["color_attr"]["vae_ceiling"] == 0.0, acc

    def blur(im):
        b, h, w, c = im.shape
        m = im.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
        return jnp.repeat(jnp.repeat(m, 4, 1), 4, 2)

    blurred = ev.vae_round_trips(types.SimpleNamespace(model=_StubVAEModel(post=blur)), settings)
    acc = ev.summarize([dict(r, plan_correct=True) for r in blurred], shapes.TASKS, blurred)
    assert acc["overall"]["vae_ceiling"] <= 0.5, acc
    line = ev.format_table(s).splitlines()[-1].split()
    assert line[-1] == "1.000" and line[-2] == "-"  # the VAE ceiling column after follows


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A converted GoT folder (config, params, tokenizer) of the tiny random-weight demo GoT."""
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder
    from got_jax.got.demo import demo_config, random_model
    from got_jax.got.tokenizer import BUNDLED_TOKENIZER_DIR

    config = demo_config()
    folder = tmp_path_factory.mktemp("evalckpt") / "ckpt"
    toks = {p.name: str(p) for p in BUNDLED_TOKENIZER_DIR.iterdir() if p.is_file()}
    write_checkpoint_folder(str(folder), dict(config, param_dtype="float32"), pure_tree(random_model(config, 0)), toks)
    return folder


@pytest.fixture(scope="module")
def tiny_pipe(tiny_ckpt):
    """The folder loaded as the CLI loads it (shared: its compiled programs serve both tests below)."""
    return ev.load_pipeline(str(tiny_ckpt))


@pytest.mark.slow
def test_zero_layout_zeroes_the_layout_latents(tiny_pipe):
    """GoTPipeline(zero_layout=True): the layout latents are exactly zero, so the layout guidance term
    c * (e1 - e2) vanishes and the image does not depend on the layout scale c; the chain and its boxes are
    still returned. (That the layout latents are the plan's otherwise is the pipeline parity tests' job.)"""
    plan = "<|object_ref_start|>a red circle<|object_ref_end|><|box_start|>(100,100),(500,600)<|box_end|> (red)"
    kw = dict(got_texts=[plan] * 2, height=32, width=32, num_inference_steps=2, seed=[3, 4], return_intermediates=True,
              zero_layout=True)
    c4 = tiny_pipe(["a red circle"] * 2, layout_guidance_scale=4.0, **kw)
    c0 = tiny_pipe(["a red circle"] * 2, layout_guidance_scale=0.0, **kw)
    for out in (c4, c0):
        assert out.got_texts[0].startswith(plan) and len(out.plans[0]) == 1
        for row in out.intermediates:
            assert row[0]["layout_latents"].shape == (4, 4, 4) and np.abs(row[0]["layout_latents"]).max() == 0
    for a, b in zip(c4.intermediates, c0.intermediates):
        np.testing.assert_allclose(a[0]["image"], b[0]["image"], atol=1e-6)
    assert np.abs(c4.intermediates[0][0]["image"] - c4.intermediates[1][0]["image"]).max() > 1e-3  # seeds differ


@pytest.mark.slow
def test_cli_writes_table_json_and_contact_sheet(tiny_ckpt, tiny_pipe, tmp_path, capsys, monkeypatch):
    """``python -m got_jax.eval.shapes`` (its main) on the tiny folder: 1 prompt per task, 1 image, 2 steps. The
    folder is loaded by ``load_pipeline`` once for the module (the fixture); main gets that pipeline."""
    loads = []
    monkeypatch.setattr(ev, "load_pipeline", lambda ckpt, dtype: loads.append((ckpt, dtype)) or tiny_pipe)
    out = tmp_path / "eval"
    res = ev.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--prompts_per_task", "1", "--images_per_prompt", "1",
                   "--steps", "2", "--size", "32", "--max_new_tokens", "8", "--batch_size", "2", "--no_layout"])
    assert loads == [(str(tiny_ckpt), "float32")]
    printed = capsys.readouterr().out
    for t in shapes.TASKS:
        assert any(line.startswith(t) for line in printed.splitlines()), printed
    assert "overall" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["no_layout"] is True and saved["ckpt"] == str(tiny_ckpt)
    assert set(saved["tasks"]) == set(shapes.TASKS) and len(saved["samples"]) == 6
    accs = [v["image_accuracy"] for v in saved["tasks"].values()]
    assert saved["overall"]["image"] == pytest.approx(np.mean(accs)) == res["overall"]["image"]
    for s in saved["samples"]:
        assert s["prompt"] == shapes.eval_prompts(s["task"], 1, 32)[0]["prompt"]
        assert Image.open(out / s["image"]).size == (32, 32)
        assert s["correct"] == _image_ok(np.asarray(Image.open(out / s["image"])), s["metadata"])
    trips = saved["vae_round_trips"]  # one ground-truth round trip per prompt, scored like the samples
    assert [(r["task"], r["index"]) for r in trips] == [(t, 0) for t in shapes.TASKS]
    for t in shapes.TASKS:
        assert saved["tasks"][t]["vae_ceiling"] == float(next(r["correct"] for r in trips if r["task"] == t))
    sheet = Image.open(out / "failures.png")
    fails = sum(not (s["correct"] and s["plan_correct"]) for s in saved["samples"])
    assert fails > 0 and sheet.size[0] >= ev.TILE  # random weights: plans cannot satisfy the prompts
    # bad arguments fail before the model loads
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--tasks", "spatial"])
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", "/nonexistent", "--out", str(out), "--prompts_per_task", "97", "--tasks", "position"])
    assert "only 96 position combinations are held out" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the diagnostic's prompts come from the 624 seen combinations
        ev.main(["--ckpt", "/nonexistent", "--out", str(out), "--prompts_per_task", "625", "--tasks", "position",
                 "--combos", "train"])
    assert "only 624 position combinations are not held out" in capsys.readouterr().err
    for args, msg in ((["--ckpt", str(tmp_path / "none")], "--ckpt: "), (["--ckpt", str(tiny_ckpt), "--size", "40"],
                                                                         "--size 40: must be a positive multiple of 16")):
        with pytest.raises(SystemExit):
            ev.main(args + ["--out", str(out)])
        assert msg in capsys.readouterr().err
    assert loads == [(str(tiny_ckpt), "float32")]  # none of the bad calls got to loading


def test_ablation_folder_is_sampled_with_its_sampling_defaults(tiny_ckpt, tmp_path, monkeypatch):
    """A folder exported from an ablation run records ``sampling_defaults`` (``no_chain`` / ``zero_layout``): the
    CLI samples every batch with them and stores them in the settings, with no flag given."""
    import shutil
    import types

    folder = tmp_path / "ablation"
    shutil.copytree(tiny_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, sampling_defaults={"no_chain": True, "zero_layout": True})))
    calls = []

    def fake_pipe(prompts, **kw):
        calls.append(kw)
        return types.SimpleNamespace(images=[Image.new("RGB", (32, 32), "white")] * len(prompts),
                                     got_texts=["<|im_gen_start|>"] * len(prompts))

    fake_pipe.model = _StubVAEModel()  # an exact VAE

    monkeypatch.setattr(ev, "load_pipeline", lambda ckpt, dtype: fake_pipe)
    res = ev.main(["--ckpt", str(folder), "--out", str(tmp_path / "o"), "--prompts_per_task", "1",
                   "--images_per_prompt", "1", "--size", "32", "--batch_size", "6"])
    assert len(calls) == 1 and calls[0]["no_chain"] is True and calls[0]["zero_layout"] is True
    assert res["settings"]["no_chain"] is True and res["settings"]["no_layout"] is True
    assert res["overall"]["plan"] == 0.0  # no chain, no plan
    assert res["overall"]["follows"] is None and all(s["follows"] is None for s in res["samples"])  # nothing to follow
    assert res["overall"]["draws"] is None and all(s["draws"] is None for s in res["samples"])
    assert ev.format_table(res).splitlines()[-1].split()[-2] == "-"  # follows
    assert res["overall"]["vae_ceiling"] == 1.0  # the exact VAE: every ground truth at 32 px passes
    res = ev.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "p"), "--prompts_per_task", "1",
                   "--images_per_prompt", "1", "--size", "32", "--batch_size", "6"])
    assert calls[-1]["no_chain"] is False and calls[-1]["zero_layout"] is False


def test_guidance_scales_come_from_the_flags_else_the_folder_else_the_paper(tiny_ckpt, tmp_path, monkeypatch):
    """An export records the guidance scales its config chose (``sampling_defaults``); the CLI samples with them
    unless a flag overrides one, and a folder without them gets the paper's T2I values (g 7.5, c 4.0, i 1.0).
    ``sample.py``'s demo defaults (``configs/sample_demo.py``) read the same record."""
    import shutil
    import types

    from configs import sample_demo

    folder = tmp_path / "tuned"
    shutil.copytree(tiny_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, sampling_defaults={"guidance_scale": 1.5,
                                                                                 "layout_guidance_scale": 2.0})))
    calls = []

    def fake_pipe(prompts, **kw):
        calls.append(kw)
        return types.SimpleNamespace(images=[Image.new("RGB", (32, 32), "white")] * len(prompts),
                                     got_texts=["<|im_gen_start|>"] * len(prompts))

    fake_pipe.model = _StubVAEModel()
    monkeypatch.setattr(ev, "load_pipeline", lambda ckpt, dtype: fake_pipe)
    args = ["--prompts_per_task", "1", "--images_per_prompt", "1", "--size", "32", "--batch_size", "6",
            "--tasks", "single_object"]
    scales = lambda kw: tuple(kw[k] for k in ev.GUIDANCE)  # noqa: E731
    for i, (extra, want) in enumerate(((["--ckpt", str(folder)], (1.5, 2.0, 1.0)),
                                       (["--ckpt", str(folder), "--guidance_scale", "3"], (3.0, 2.0, 1.0)),
                                       (["--ckpt", str(tiny_ckpt)], (7.5, 4.0, 1.0)))):
        res = ev.main(args + extra + ["--out", str(tmp_path / f"o{i}")])
        assert scales(calls[-1]) == want and scales(res["settings"]) == want, (extra, scales(calls[-1]))
    assert sample_demo.demo_guidance(str(folder)) == {"guidance_scale": 1.5, "layout_guidance_scale": 2.0}
    assert sample_demo.demo_guidance(str(tiny_ckpt)) == {} and sample_demo.demo_guidance(str(tmp_path / "x")) == {}


def test_rescore_scores_the_stored_samples_again(tmp_path, capsys):
    """``--rescore``: results.json's GoT texts and the written PNGs scored again with no model and no sampling.
    With unchanged scorers it gives back what the run stored (PNGs are lossless); a stored plan that no longer
    matches its image changes ``draws``; a missing image or results file is a one-line error naming it."""
    import types

    truth = {p["prompt"]: p["objects"] for t in shapes.TASKS for p in shapes.eval_prompts(t, 1, SIZE)}

    def fake_pipe(prompts, **kw):  # each prompt's ground truth, drawn from its own plan
        return types.SimpleNamespace(images=[Image.fromarray(shapes.render(truth[p], SIZE)) for p in prompts],
                                     got_texts=[shapes.got_text(p, truth[p], SIZE) for p in prompts])

    fake_pipe.model = _StubVAEModel()
    out = tmp_path / "run"
    settings = ev.Settings(prompts_per_task=1, images_per_prompt=1, batch_size=6, guidance_scale=2.0)
    res = ev.run(fake_pipe, out, settings, log=lambda *a: None)
    assert res["overall"]["draws"] == 1.0 and res["overall"]["image"] == 1.0
    stored = json.loads((out / "results.json").read_text())
    again = ev.main(["--out", str(out), "--rescore"])
    assert json.loads((out / "results.json").read_text()) == stored
    assert {k: again[k] for k in ("overall", "tasks", "settings", "vae_round_trips")} == {
        k: stored[k] for k in ("overall", "tasks", "settings", "vae_round_trips")}
    # a plan whose first two boxes trade places: the position image no longer draws it
    i = next(n for n, s in enumerate(stored["samples"]) if s["task"] == "position")
    objs = truth[stored["samples"][i]["prompt"]]
    swapped = [dataclasses.replace(objs[0], shape=objs[1].shape), dataclasses.replace(objs[1], shape=objs[0].shape)]
    stored["samples"][i]["got_text"] = shapes.got_text(stored["samples"][i]["prompt"], swapped, SIZE)
    (out / "results.json").write_text(json.dumps(stored))
    again = ev.rescore(out, log=lambda *a: None)
    assert again["tasks"]["position"]["draws"] == 0.0 and again["tasks"]["position"]["image_accuracy"] == 1.0
    assert again["samples"][i]["draws_reason"].startswith("planned object 1")
    (out / stored["samples"][0]["image"]).unlink()
    for args, msg in ((["--out", str(out)], f"{out / stored['samples'][0]['image']}: the image of a stored sample "
                                            "is missing"),
                      (["--out", str(tmp_path / "none")], "no results.json to re-score")):
        with pytest.raises(SystemExit):
            ev.main(args + ["--rescore"])
        assert msg in capsys.readouterr().err


def test_plans_with_kind_paints_are_scored_by_their_objects_colours():
    """A plan whose boxes carry kind paints (``paint="kind"``) states its objects' colours in the phrases:
    plan, draws and follows read them there (:func:`got_jax.eval.shapes.box_color`), so ground truth passes all
    three and a recoloured image fails draws and follows."""
    for task in shapes.TASKS:
        for p in shapes.eval_prompts(task, 2, 64):
            objs = p["objects"]
            plan = shapes.got_text(p["prompt"], objs, 64, paint="kind")
            assert [d.color for d in ev.plan_detections(plan)] == [o.color for o in objs]
            assert ev.score_plan(plan, p["metadata"])[0]
            img = shapes.render(objs, 64)
            assert ev.draws_plan(img, plan) == (True, "") and ev.follows_plan(img, plan)
            other = next(c for c in shapes.COLORS if c != objs[0].color)
            wrong = shapes.render([dataclasses.replace(objs[0], color=other)] + list(objs[1:]), 64)
            assert not ev.draws_plan(wrong, plan)[0] and not ev.follows_plan(wrong, plan)
