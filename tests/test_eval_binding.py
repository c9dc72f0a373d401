"""The binding diagnostic (``python -m got_jax.eval.binding``): the shape swap of a plan, and the counts on two
stand-in pipelines whose behaviour is known -- one draws whatever plan it is given (binds), one always draws the
prompt's own scene (ignores which shape goes where) -- so the diagnostic is shown to tell them apart."""

import dataclasses
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from got_jax.data import shapes
from got_jax.eval import binding
from got_jax.eval import shapes as ev

SIZE = 64


def test_swap_shapes_trades_the_shapes_and_keeps_boxes_and_colours():
    p = shapes.eval_prompts("position", 1, SIZE)[0]
    a, b = p["objects"]
    plan = shapes.got_text(p["prompt"], [a, b], SIZE)
    swapped = binding.swap_shapes(plan)
    got = ev.plan_detections(swapped)
    want = ev.plan_detections(plan)
    assert [(d.color, d.cls) for d in got] == [(a.color, b.shape), (b.color, a.shape)]
    assert [d.box for d in got] == [d.box for d in want]  # same boxes, same colour tags
    assert f"containing {a.phrase.replace(a.shape, b.shape)}, {b.phrase.replace(b.shape, a.shape)}." in swapped
    assert binding.swap_shapes(swapped) == plan  # its own inverse
    same_shape = [a, dataclasses.replace(b, shape=a.shape)]
    assert binding.swap_shapes(shapes.got_text("x", same_shape, SIZE)) is None  # nothing to trade
    assert binding.swap_shapes("no plan") is None


def test_swap_shapes_trades_kind_paints_with_the_shapes():
    """With kind paints (the layout tag names the shape too) the tags are traded with the shapes, so the swapped
    plan's layout asks for the swapped shapes; with colour tags they stay (above)."""
    for p in shapes.eval_prompts("position", 6, SIZE):
        a, b = p["objects"]
        plan = shapes.got_text(p["prompt"], [a, b], SIZE, paint="kind")
        swapped = binding.swap_shapes(plan)
        got = ev.plan_detections(swapped)
        assert [(d.color, d.cls) for d in got] == [(a.color, b.shape), (b.color, a.shape)]
        assert [t.color for t in binding.parse_got(swapped)] == [shapes.KIND_PAINTS[a.color, b.shape],
                                                                 shapes.KIND_PAINTS[b.color, a.shape]]
        assert binding.swap_shapes(swapped) == plan
        colour_plan = shapes.got_text(p["prompt"], [a, b], SIZE)
        assert [t.color for t in binding.parse_got(binding.swap_shapes(colour_plan))] == [a.color, b.color]


def _fake_pipe(binds: bool):
    truth = {p["prompt"]: p["objects"] for p in shapes.eval_prompts("position", 96, SIZE)}

    def pipe(prompts, *, seed, got_texts=None, return_intermediates=False, **kw):
        texts = got_texts or [shapes.got_text(p, truth[p], SIZE) for p in prompts]
        images, inter = [], []
        for p, t in zip(prompts, texts):
            objs = truth[p]
            if binds:  # draw the given plan: its shapes, in the prompt's boxes
                objs = [dataclasses.replace(o, shape=d.cls) for o, d in zip(objs, ev.plan_detections(t))]
            images.append(Image.fromarray(shapes.render(objs, SIZE)))
            inter.append([{"hidden": np.random.default_rng(zlib.crc32(t.encode())).normal(size=(64, 8))}])
        return types.SimpleNamespace(images=images, got_texts=texts, intermediates=inter)

    return pipe


@pytest.mark.parametrize("binds", [True, False])
def test_diagnostic_tells_a_binding_model_from_one_that_ignores_the_boxes(binds):
    out = binding.run(_fake_pipe(binds), prompts=5, images_per_prompt=2, batch_size=4, log=lambda *a: None)
    assert (out["prompts"], out["images"], out["skipped_plans"]) == (5, 10, 0)
    assert out["true_plan_drawn"] == 1.0
    assert out["swapped_plan_drawn"] == (1.0 if binds else 0.0)
    assert out["swapped_drawn_as_original"] == (0.0 if binds else 1.0)
    assert out["hidden_shift_swap"] > 0 and out["hidden_shift_other_plan"] > 0
    assert out["scales"] == {"guidance_scale": 7.5, "layout_guidance_scale": 4.0, "image_guidance_scale": 1.0}
    assert "swapped plan drawn as planned" in binding.format_table(out)


def test_cli_rejects_bad_arguments_before_loading(tmp_path, capsys):
    for args, msg in ((["--prompts", "0"], "--prompts 0: between 1 and 96"),
                      (["--ckpt", str(tmp_path / "none")], "--ckpt: ")):
        with pytest.raises(SystemExit):
            binding.main(args)
        assert msg in capsys.readouterr().err
