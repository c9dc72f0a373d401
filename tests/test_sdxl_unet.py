"""SDXL UNet parity with diffusers 0.42.1 on the same (tiny, random) weights, loaded by our loader."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from configs.sharding_rules import RULES

from got_jax import sharding
from got_jax.checkpoint import CheckpointError
from got_jax.models.options import ModelOptions
from got_jax.models.sdxl import UNet2DConditionModel, UNetConfig, load_diffusers_checkpoint

REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")

diffusers = pytest.importorskip("diffusers")

REF = os.path.join(REFERENCE_CONFIGS, "sdxl_base_unet_config.json")


def tiny_cfg(**over):
    cfg = dict(sample_size=16, in_channels=12, out_channels=4, block_out_channels=(24, 40, 56),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               layers_per_block=2, transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 7),
               cross_attention_dim=32, norm_num_groups=4, use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=20 + 6 * 8)
    cfg.update(over)
    return cfg


def make_torch_unet(**over):
    torch.manual_seed(0)
    m = diffusers.UNet2DConditionModel(**tiny_cfg(**over)).eval()
    with torch.no_grad():  # random non-zero values everywhere (diffusers zero-inits some layers)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def inputs(b=2, h=16, w=16, seed=1):
    g = np.random.default_rng(seed)
    return dict(sample=g.standard_normal((b, h, w, 12)).astype(np.float32),
                t=np.array([999, 17], np.int64)[:b], ctx=g.standard_normal((b, 7, 32)).astype(np.float32),
                text=g.standard_normal((b, 20)).astype(np.float32),
                tid=TIME_IDS[:b])


# SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w): no row is a palindrome
# and rows differ, so reading the six values in another order (or another row's) changes the output
TIME_IDS = np.array([[1024., 768., 32., 96., 896., 640.], [512., 832., 64., 0., 448., 704.]], np.float32)


def torch_out(m, x):
    with torch.no_grad():
        return m(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2)), torch.from_numpy(x["t"]),
                 torch.from_numpy(x["ctx"]), added_cond_kwargs=dict(text_embeds=torch.from_numpy(x["text"]),
                                                                    time_ids=torch.from_numpy(x["tid"]))
                 ).sample.numpy().transpose(0, 2, 3, 1)


@nnx.jit
def run(model, sample, t, ctx, text, tid):
    return model(sample, t, ctx, text, tid)


def ours(model, x):
    return np.asarray(run(model, x["sample"], x["t"], x["ctx"], x["text"], x["tid"]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = make_torch_unet()
    path = tmp_path_factory.mktemp("unet")
    m.save_pretrained(path)
    return m, path


def test_unet_matches_diffusers_12ch_text_time(saved):
    """12-channel input, text_time added conditions, transformer_layers_per_block (1, 2, 3), per-block heads."""
    tm, path = saved
    model = load_diffusers_checkpoint(path, "unet")
    assert model.cfg.in_channels == 12 and model.cfg.transformer_layers_per_block == (1, 2, 3)
    x = inputs()
    ref = torch_out(tm, x)
    got = ours(model, x)
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, scale)


def test_unet_matches_diffusers_cross_attention_in_last_up_block(tmp_path):
    """Recipe 5's demo UNet (configs/demo_shapes_xattr16.py, ``model.demo_unet``): two levels, the first down
    block without attention but both up blocks with it (the last one has no upsampler), so the up path
    attends at full latent resolution."""
    over = dict(block_out_channels=(24, 40), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4))
    tm = make_torch_unet(**over)
    tm.save_pretrained(tmp_path)
    model = load_diffusers_checkpoint(tmp_path, "unet")
    assert model.cfg.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    x = inputs()
    ref = torch_out(tm, x)
    got = ours(model, x)
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, scale)


def test_unet_sharded_matches_unsharded(saved):
    tm, path = saved
    x = inputs()
    model = load_diffusers_checkpoint(path, "unet")
    ref = ours(model, x)
    mesh = sharding.make_mesh((2, 4, 1))
    sharded = load_diffusers_checkpoint(path, "unet", mesh=mesh, rules=RULES)
    with sharding.use_mesh(mesh, RULES):
        got = ours(sharded, x)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    kernel = sharded.down_blocks[1].attentions[0].transformer_blocks[0].ff.geglu.proj.kernel[...]
    assert len(kernel.sharding.device_set) == 8


def test_unet_fp16_variant(tmp_path):
    """save_pretrained(variant='fp16') of an fp16 model, loaded into float32: parity within fp16 rounding."""
    tm = make_torch_unet().half()
    tm.save_pretrained(tmp_path, variant="fp16")
    model = load_diffusers_checkpoint(tmp_path, "unet", variant="fp16")
    assert model.conv_in.kernel[...].dtype == jnp.float32
    x = inputs()
    ref = torch_out(tm.float(), x)  # the same fp16-rounded weights, evaluated in float32
    got = ours(model, x)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    with pytest.raises(CheckpointError, match="variant='bf16'"):
        load_diffusers_checkpoint(tmp_path, "unet", variant="bf16")


def test_param_count_matches_diffusers_sdxl_12ch():
    d = json.load(open(REF))
    d["in_channels"] = 12
    with torch.device("meta"):
        ref = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_config(d).parameters())
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_diffusers(d), rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == ref


def test_bad_checkpoints(saved, tmp_path):
    tm, path = saved
    from safetensors.torch import load_file, save_file
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_diffusers_checkpoint(tmp_path / "nope", "unet")
    sd = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    for name, change in [("missing", lambda s: s.pop("mid_block.attentions.0.proj_in.weight")),
                         ("shape", lambda s: s.__setitem__("conv_in.weight", torch.zeros(24, 11, 3, 3)))]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text((path / "config.json").read_text())
        s = dict(sd)
        change(s)
        save_file(s, str(bad / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(CheckpointError) as e:
            load_diffusers_checkpoint(bad, "unet")
        key = "mid_block.attentions.0.proj_in.weight" if name == "missing" else "conv_in.weight"
        assert key in str(e.value)
    cfg = json.loads((path / "config.json").read_text())
    cfg["class_embed_type"] = "timestep"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        load_diffusers_checkpoint(odd, "unet")


def test_attention_registry_seam():
    """A registered kernel is used when selected by name; unknown names raise."""
    from got_jax.models.sdxl import layers

    calls = []

    def einsum_attention(q, k, v):
        calls.append(q.shape)
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", w, v)

    layers.register_attention("test_einsum", einsum_attention)
    kw = dict(rngs=nnx.Rngs(0))
    a = layers.Attention(16, 4, 8, options=ModelOptions(attention_impl="xla"), **kw)
    b = layers.Attention(16, 4, 8, options=ModelOptions(attention_impl="test_einsum"), **kw)
    nnx.update(b, nnx.state(a))
    x, ctx = jnp.ones((2, 5, 16)) * jnp.arange(5.)[None, :, None] / 5, jnp.cos(jnp.arange(2 * 3 * 8.)).reshape(2, 3, 8)
    np.testing.assert_allclose(np.asarray(b(x, ctx)), np.asarray(a(x, ctx)), atol=1e-5)
    assert calls == [(2, 5, 4, 4)]
    with pytest.raises(ValueError, match="unknown attention implementation"):
        layers.get_attention("nope")


@pytest.mark.parametrize("t,s", [(1000, 77), (300, 300), (64, 64)])
def test_blocked_attention_matches_dot_product_attention(t, s):
    """The CPU blocked attention (query blocks of 64, padded) equals jax.nn.dot_product_attention;
    max abs error <= 1e-5 (outputs are O(1))."""
    from got_jax.models.sdxl import layers

    g = np.random.default_rng(0)
    q, k, v = (jnp.asarray(g.standard_normal(sh).astype(np.float32) * 2) for sh in
               ((2, t, 3, 8), (2, s, 3, 8), (2, s, 3, 8)))
    want = jax.nn.dot_product_attention(q, k, v)
    for fn in (layers.blocked_attention, layers.get_attention("xla")):
        got = fn(q, k, v)
        assert got.shape == want.shape
        assert float(jnp.abs(got - want).max()) <= 1e-5
