"""Rematerialisation (ModelOptions.remat): gradients are the same with and without it.

The demo GoT's reasoner (2 decoder layers with LoRA, 2 vision blocks, one window and one full attention) and
UNet's resnet + transformer blocks, float32, random weights. For ``remat`` in ("full", "dots") the gradient of
a fixed random projection of the outputs w.r.t. every parameter equals the no-remat gradient within
``1e-5 * max(1, max |g|)`` per tensor (XLA fuses the recomputed forward differently, so the last bits
of float32 sums may differ; measured about 1e-6), and the differentiated program really contains checkpoint (remat)
equations (none without remat).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from got_jax.got.demo import DEMO_PROCESSOR, demo_config, random_model
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl.processing import make_image_processor, preprocess_images


def _with_remat(model, remat):
    """The same model (shared weights) with ``remat`` set in every module's options."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    for _, m in nnx.iter_graph(clone):
        if isinstance(m, nnx.Module) and isinstance(getattr(m, "options", None), ModelOptions):
            if m.options.remat != "none" or hasattr(m, "forward"):
                m.options = m.options.replace(remat=remat)
    return clone


def _grads(model, loss_fn):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return loss_fn(nnx.merge(graphdef, p, rest))

    grad = jax.jit(jax.grad(f))
    return grad(params), jax.make_jaxpr(jax.grad(f))(params)


@pytest.fixture(scope="module")
def got():
    from got_jax.models.qwen2_5_vl.lora import add_lora, lora_modules

    model = add_lora(random_model(demo_config(), 5), ModelOptions(lora_rank=2), jax.random.key(0))
    for i, m in enumerate(lora_modules(model).values()):  # non-zero B so A gets a gradient too
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), m.lora_b.shape))
    return model


def _compare(got, select, loss_fn, min_tensors=20):
    """Gradients of ``loss_fn(select(model))`` w.r.t. the parameters of ``select(model)``."""
    ref, jaxpr = _grads(select(_with_remat(got, "none")), loss_fn)
    assert "checkpoint" not in str(jaxpr) and "remat" not in str(jaxpr)
    for remat in ("full", "dots"):
        g, jaxpr = _grads(select(_with_remat(got, remat)), loss_fn)
        assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr), remat
        flat_ref = dict(nnx.to_flat_state(ref))
        n = 0
        for path, v in nnx.to_flat_state(g):
            a, b = np.asarray(v.get_value()), np.asarray(flat_ref[path].get_value())
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), (remat, path)
            n += 1
        assert n > min_tensors


def test_reasoner_gradients_equal_with_remat(got):
    """Decoder layers (with LoRA) and vision blocks under remat: same gradients."""
    from PIL import Image

    rng = np.random.default_rng(0)
    proc = make_image_processor(**DEMO_PROCESSOR)
    img = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    pixels, grid = preprocess_images([img], proc)
    r = got.reasoner
    n_img = int(np.prod(grid[0])) // 4
    ids = np.concatenate([[5, r.cfg.vision_start_token_id], [r.cfg.image_token_id] * n_img,
                          [r.cfg.vision_end_token_id], rng.integers(10, 200, 6)])[None]
    positions, _, mask, aux = r.prepare(ids, grid)
    w = jnp.asarray(rng.standard_normal((1, ids.shape[1], r.cfg.text.vocab_size)), jnp.float32)

    def loss(model):
        out = model.forward(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask),
                                     jnp.asarray(pixels), aux)
        return jnp.sum(out.logits * w)

    _compare(got, lambda m: m.reasoner, loss)


def test_unet_block_gradients_equal_with_remat(got):
    """A resnet block (with time embedding) feeding a cross-attention transformer block of the UNet, under remat:
    same gradients (the blocks of the whole UNet, compiled three times, would take minutes on CPU; the
    options test checks every UNet block carries the remat option)."""
    rng = np.random.default_rng(1)
    blk = got.unet.down_blocks[1]
    cin = blk.resnets[0].conv1.kernel.shape[2]
    x = jnp.asarray(rng.standard_normal((2, 4, 4, cin)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, blk.resnets[0].time_emb_proj.kernel.shape[0])), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 4, 4, blk.resnets[0].conv2.kernel.shape[3])), jnp.float32)

    def loss(b):
        return jnp.sum(b.attentions[0](b.resnets[0](x, temb), ctx) * w)

    _compare(got, lambda m: m.unet.down_blocks[1], loss, min_tensors=10)
