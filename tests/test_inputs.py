"""Training and sampling build the reasoner's inputs the same way (one prompt builder, one image path).

The training data pipeline (``got_jax.data.pipeline.ExampleProcessor``) and the sampling pipeline
(``GoTPipeline._prompt_ids``) both go through ``got_jax.got.tokenizer.prompt_ids`` / ``reasoner_image``;
for the same instruction and source image they must give identical prompt token ids and pixel values
(exact equality), for T2I and editing. The bundled small tokenizer; random 64 px images.
"""

import io
import types

import numpy as np
import pytest
from PIL import Image

from got_jax.data import pipeline as P
from got_jax.data import shapes
from got_jax.got import tokenizer as T
from got_jax.got.pipeline import GoTPipeline, load_image_processor


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("editing,view", [(False, 448), (True, 448), (True, 56)])
def test_training_and_sampling_see_the_same_prompt_and_pixels(tok, editing, view):
    """``view``: the training config's ``data.reasoner_size`` (448 released; the demo's 56), which an exported
    folder records and :class:`GoTPipeline` samples with (``source_size``)."""
    rng = np.random.default_rng(0)
    ex = shapes.generation_example(0, 3, 64)
    source = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    text = "make the circle blue" if editing else ex["caption"]
    record = {"id": "r0", "got": ex["got"], ("target_image" if editing else "image"): _png(ex["image"]),
              ("instruction" if editing else "caption"): text}
    if editing:
        record["source_image"] = _png(source)
    cfg = P.PipelineConfig(kind="editing" if editing else "generation", buckets=((64, 64),), max_text_len=640,
                           max_boxes=4, reasoner_size=view)
    out = P.ExampleProcessor(cfg, tok)(0, record)
    assert "_skip" not in out, out

    sampler = types.SimpleNamespace(tokenizer=tok, image_processor=load_image_processor(None), source_size=view)
    ids, images = GoTPipeline._prompt_ids(sampler, text, Image.fromarray(source) if editing else None)
    assert ids == T.prompt_ids(tok, text, int(np.prod(out["image_grid_thw"])) // 4 if editing else 0)
    np.testing.assert_array_equal(out["input_ids"][:len(ids)], ids)
    assert not out["loss_mask"][:len(ids)].any() and out["loss_mask"][len(ids)]  # the answer starts right after
    if editing:
        (pv, grid), = images
        np.testing.assert_array_equal(out["image_grid_thw"], grid[0])
        np.testing.assert_array_equal(out["pixel_values"][:len(pv)], pv)
        assert (np.asarray(ids) == T.got_token_ids(tok).image_pad).sum() == len(pv) // 4 == (view // 28) ** 2
    else:
        assert images == [] and T.IMAGE_PAD not in tok.decode(ids)
