"""ModelOptions (validation, threading into every module), the trainable filter, and GoT.unet_input.

The GoT here is the demo config (tiny reasoner with a vision tower, 2-level UNet, 4-level VAE) with host-drawn
random weights (``got_jax.got.demo.random_model``). Float32; equality is exact where the same computation is
done twice, else ``max abs err <= 1e-5 * max(1, max |reference|)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from got_jax.checkpoint.mapping import path_str
from got_jax.got.demo import demo_config, random_model
from got_jax.models.options import DECODER_PROJECTIONS, ModelOptions, remat_policy
from got_jax.models.sdxl import layers
from got_jax.train.trainable import base_weights, frozen_filter, trainable_filter


def test_options_validation_and_normalisation():
    o = ModelOptions(dtype="bfloat16", lora_rank=None, lora_targets=("q", "down_proj"))
    assert o.dtype == np.dtype(jnp.bfloat16) and o.param_dtype == np.dtype("float32")
    assert o.lora_rank == 0 and o.lora_scale == 0.0 and o.reasoner_training() == "full"
    assert o.lora_targets == ("q_proj", "down_proj")
    assert ModelOptions().lora_targets == DECODER_PROJECTIONS
    assert hash(o) == hash(ModelOptions(dtype=jnp.bfloat16, lora_targets=["q_proj", "down"]))
    r = ModelOptions(lora_rank=4, lora_alpha=8)
    assert r.lora_scale == 2.0 and r.reasoner_training() == "lora"
    assert ModelOptions(lora_rank=4, lora_alpha=8, use_rslora=True).lora_scale == 4.0
    assert r.without_lora().lora_rank == 0 and r.lora_on("q_proj") and not o.lora_on("q_proj")
    for bad, match in [(dict(remat="some"), "remat"), (dict(lora_rank=-1), "lora_rank"),
                       (dict(lora_targets=("qkv",)), "unknown modules"), (dict(lora_dropout=1.0), "lora_dropout"),
                       (dict(dtype="float33"), "dtype"), (dict(lora_rank=2, lora_targets=()), "empty")]:
        with pytest.raises(ValueError, match=match):
            ModelOptions(**bad)
    with pytest.raises(AttributeError):
        o.remat = "full"
    assert remat_policy("full") is None and remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable


@pytest.fixture(scope="module")
def abstract_got():
    from got_jax.got.model import GoT

    opts = ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention_impl="blocked", remat="dots",
                        lora_rank=2, lora_targets=("q", "v", "up"))
    return nnx.eval_shape(lambda: GoT(demo_config(), options=opts, rngs=nnx.Rngs(0))), opts


def test_options_reach_every_module(abstract_got):
    """param_dtype on every parameter, compute dtype / attention kernel / remat / LoRA where they act; the VAE
    (frozen) runs without remat."""
    got, opts = abstract_got
    assert {v.dtype for v in jax.tree.leaves(nnx.state(got, nnx.Param))} == {np.dtype("float32")}
    mods = list(nnx.iter_graph(got))
    dtypes = {getattr(m, "dtype") for _, m in mods if isinstance(m, nnx.Module) and hasattr(m, "dtype")}
    assert dtypes == {np.dtype(jnp.bfloat16)}
    attn = [m for _, m in mods if isinstance(m, layers.Attention)]
    assert attn and all(m.attention_impl == "blocked" for m in attn)
    remat = {(path_str(p).split(".")[0], m.options.remat) for p, m in mods if hasattr(m, "forward")}
    assert remat == {("reasoner", "dots"), ("unet", "dots"), ("vae", "none")}
    lora_paths = {path_str(p).rsplit(".", 2)[-2] for p, _ in nnx.to_flat_state(nnx.state(got, nnx.LoRAParam))}
    assert lora_paths == {"q_proj", "v_proj", "up_proj"}


def test_trainable_filter_lora_and_full(abstract_got):
    """LoRA mode: adapters + embeddings/LM head/decoder norms + projectors + UNet; vision tower, VAE and LoRA base
    kernels frozen. Full mode: the whole reasoner except its vision tower. Each param is in exactly one set."""
    got, opts = abstract_got
    every = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(got, nnx.Param))}

    def paths(f):
        return {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(got, f))}

    train, frozen = paths(trainable_filter(opts)), paths(frozen_filter(opts))
    assert train | frozen == every and not train & frozen
    lm = "reasoner.language_model."
    assert {p for p in train if p.endswith(("lora_a", "lora_b"))} == paths(nnx.LoRAParam)
    assert lm + "embed_tokens.embedding" in train and lm + "norm.weight" in train
    assert lm + "layers.1.input_layernorm.weight" in train and lm + "layers.0.post_attention_layernorm.weight" in train
    assert not [p for p in train if p.startswith(lm) and p.endswith(("kernel", "bias"))]  # base projections frozen
    assert not [p for p in train if p.startswith(("reasoner.visual", "vae"))]
    for part in ("unet.", "projector.", "pooled_projector."):
        assert {p for p in every if p.startswith(part)} <= train
    assert paths(base_weights()) == every - paths(nnx.LoRAParam)
    full = paths(trainable_filter("full"))
    assert full == {p for p in every if not p.startswith(("reasoner.visual", "vae"))}
    with pytest.raises(ValueError, match="unknown training mode"):
        trainable_filter("half")


def test_unet_input_is_what_guided_noise_feeds_the_unet():
    """guided_noise == the four-way combination of UNet calls on unet_input([noisy, reference, layout]) built here
    branch by branch; unet_input concatenates in that order and checks shapes."""
    got = random_model(demo_config(), 3)
    rng = np.random.default_rng(0)
    b, h = 2, 8
    noisy, ref, lay = (jnp.asarray(rng.standard_normal((b, h, h, 4)), jnp.float32) for _ in range(3))
    inp = got.unet_input(noisy, ref, lay)
    np.testing.assert_array_equal(np.asarray(inp), np.concatenate([noisy, ref, lay], axis=-1))
    ctx, null = (jnp.asarray(rng.standard_normal((b, 64, 64)), jnp.float32) for _ in range(2))
    pooled = jnp.asarray(rng.standard_normal((b, 32)), jnp.float32)
    time_ids = jnp.tile(jnp.asarray([[64., 64., 0., 0., 64., 64.]]), (b, 1))
    scales = jnp.asarray([[7.5, 4.0, 1.0], [3.0, 2.0, 1.5]])
    t = jnp.asarray(500)
    e = np.asarray(got.guided_noise(noisy, t, ctx, null, pooled, ref, lay, time_ids, scales))
    z = jnp.zeros_like(lay)
    e1, e2, e3, e4 = (np.asarray(got.unet(got.unet_input(noisy, r, l), t, c, pooled, time_ids))
                      for r, l, c in [(ref, lay, ctx), (ref, z, ctx), (ref, z, null), (z, z, null)])
    g, c, i = (np.asarray(scales[:, k])[:, None, None, None] for k in range(3))
    want = e4 + g * (e2 - e3) + c * (e1 - e2) + i * (e3 - e4)
    assert np.abs(e - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    with pytest.raises(ValueError, match="same shape"):
        got.unet_input(noisy, ref[:, :4], lay)
    with pytest.raises(ValueError, match="channels"):
        got.unet_input(noisy[..., :3], ref[..., :3], lay[..., :3])
