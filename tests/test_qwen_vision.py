"""Qwen2.5-VL vision tower: parity with transformers' Qwen2_5_VisionTransformerPretrainedModel.

A tiny random tower with odd sizes (hidden 48, 3 heads of 16, mlp 37, out 29, depth 4 with full
attention in blocks 1 and 3, windows of 3x3 merged tokens so image edges give ragged windows, rotary
theta 1000 instead of the default 10000) is saved with ``save_pretrained`` and loaded through
``VISION_TABLE``. Every image grid is non-square (h != w). All comparisons are float32 at highest
matmul precision with ``max abs err <= 1e-4 * max(1, max |reference|)``.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
from configs.sharding_rules import RULES

from got_jax import sharding
from got_jax.checkpoint import CheckpointError, export_state, load_into_abstract, open_tensor_folder
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl.checkpoint import VISION_TABLE, load_vision_weights
from got_jax.models.qwen2_5_vl.vision import (Qwen2_5_VisionTransformer, VisionConfig, pad_pixel_values, position_ids,
                                              prepare_vision_inputs, segment_attention, window_index)

REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")

TINY = dict(depth=4, hidden_size=48, num_heads=3, intermediate_size=37, out_hidden_size=29, window_size=84,
            fullatt_block_indexes=[1, 3], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            in_channels=3, hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 1000.0})


_encode = nnx.jit(lambda m, pixel_values, aux: m(pixel_values, aux))  # one compile per input shape
_attention = jax.jit(segment_attention, static_argnums=(4, 5))


def _err(out, ref):
    ref = np.asarray(ref, np.float32)
    return float(np.max(np.abs(np.asarray(out, np.float32) - ref))), max(1.0, float(np.max(np.abs(ref))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf model, our loaded model, VisionConfig) with weights large enough that attention is sharp."""
    torch.manual_seed(0)
    hf = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("qwen_vision")
    hf.save_pretrained(str(path))
    cfg = VisionConfig.from_hf(json.loads((path / "config.json").read_text()))
    abstract = nnx.eval_shape(lambda: Qwen2_5_VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    model = load_into_abstract(abstract, open_tensor_folder(str(path)), VISION_TABLE)
    return hf, model, cfg


def _hf(hf, pixel_values, grid):
    with torch.no_grad():
        out = hf(torch.from_numpy(np.asarray(pixel_values, np.float32)), grid_thw=torch.from_numpy(np.asarray(grid)))
    return out.pooler_output.numpy()  # what get_image_features scatters into <|image_pad|>


def _processor():
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 400, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def test_config_from_hf_both_layouts_and_full_size_shapes():
    ref = json.load(open(os.path.join(REFERENCE_CONFIGS, "qwen2_5_vl_3b_config.json")))["vision_config"]
    cfg4 = VisionConfig.from_hf(ref)  # transformers 4.x: in_chans, no rope_parameters, extra keys
    sizes = (cfg4.depth, cfg4.hidden_size, cfg4.num_heads, cfg4.out_hidden_size, cfg4.in_chans)
    assert sizes == (32, 1280, 16, 2048, 3)
    assert cfg4.fullatt_block_indexes == (7, 15, 23, 31) and cfg4.window_size == 112 and cfg4.rope_theta == 10000.0
    hf_cfg = Qwen2_5_VLVisionConfig(**{k: v for k, v in ref.items() if k != "in_chans"})
    cfg5 = VisionConfig.from_hf(hf_cfg.to_dict())  # transformers 5.x: in_channels, rope_parameters
    assert cfg5 == cfg4
    with pytest.raises(ValueError, match=r"lacks required keys \['num_heads'\]"):
        VisionConfig.from_hf({k: v for k, v in ref.items() if k != "num_heads"})
    # every full-size torch tensor maps onto a parameter of the same shape (meta device: no memory)
    with torch.device("meta"):
        hf = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VisionTransformer(cfg4, rngs=nnx.Rngs(0)))
    ours = {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    seen = set()
    for key, t in hf.state_dict().items():
        path, hook = VISION_TABLE.to_jax(key)
        dummy = np.lib.stride_tricks.as_strided(np.zeros((), np.float32), tuple(t.shape), (0,) * t.dim())
        assert hook.to_jax(dummy).shape == ours[path], key
        seen.add(path)
    assert seen == set(ours)
    # full-size forward shapes (bfloat16 compute, padded bucket of 1536 patches) without memory
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Qwen2_5_VisionTransformer(cfg4, options=ModelOptions(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))))
    aux = prepare_vision_inputs(np.array([[1, 32, 46]]), cfg4, pad_to=1536)
    pixels = jax.ShapeDtypeStruct((1536, cfg4.patch_dim), jnp.float32)
    out = jax.eval_shape(lambda st, pv, a: nnx.merge(graphdef, st)(pv, a), state, pixels, aux)
    assert (out.shape, out.dtype) == ((384, 2048), jnp.bfloat16)


@pytest.mark.parametrize("grid", [[[1, 14, 20]], [[1, 12, 10], [2, 8, 6], [1, 2, 26]]])
def test_host_precomputation_matches_transformers(grid):
    cfg = VisionConfig.from_hf(TINY)
    g = torch.tensor(grid)
    ref_idx, cu = get_vision_window_index(g, 2, cfg.window_size, 14)
    idx, wins, frames = window_index(np.array(grid), cfg)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    # window segments == transformers' cu_window_seqlens; full segments == per-frame cu_seqlens
    np.testing.assert_array_equal(np.flatnonzero(np.diff(np.repeat(wins, 4))) + 1, cu.numpy()[1:-1])
    frame_len = np.repeat([h * w for _, h, w in grid], [t for t, _, _ in grid])
    np.testing.assert_array_equal(np.flatnonzero(np.diff(np.repeat(frames, 4))) + 1, np.cumsum(frame_len)[:-1])
    np.testing.assert_array_equal(position_ids(np.array(grid), cfg), get_vision_position_ids(g, 2).numpy())
    aux = prepare_vision_inputs(np.array(grid), cfg)
    np.testing.assert_array_equal(aux.window_index[aux.reverse_index], np.arange(len(idx)))


def test_chunked_window_attention_equals_dense():
    cfg = VisionConfig.from_hf(TINY)
    aux = prepare_vision_inputs(np.array([[1, 14, 20], [1, 2, 4]]), cfg, pad_to=324)  # 288 real patches
    seg = jnp.asarray(aux.window_segment_ids)
    q, k, v = (jax.random.normal(jax.random.key(i), (324, 3, 16)) for i in range(3))
    dense = _attention(q, k, v, seg, None, 0.25)
    chunked = _attention(q, k, v, seg, 36, 0.25)  # 36 = 3x3 merged tokens of 4 patches
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(dense), rtol=1e-5, atol=1e-5)
    # a chunk shorter than the windows would be wrong, and the comparison sees it
    assert not np.allclose(np.asarray(_attention(q, k, v, seg, 12, 0.25)), np.asarray(dense), atol=1e-3)


def test_single_image_matches_transformers(tiny):
    hf, model, cfg = tiny
    img = (np.random.RandomState(0).rand(196, 283, 3) * 255).astype(np.uint8)
    batch = _processor()(images=[img], return_tensors="np")
    pv, grid = batch["pixel_values"], batch["image_grid_thw"]
    assert grid.tolist() == [[1, 14, 20]]  # 7x10 merged tokens: 3x4 windows of 3x3, ragged bottom and right
    ref = _hf(hf, pv, grid)
    out = _encode(model, jnp.asarray(pv), prepare_vision_inputs(grid, cfg))
    assert out.shape == ref.shape == (70, 29)
    err, scale = _err(out, ref)
    assert err <= 1e-4 * scale, (err, scale)
    # the window / full split matters: the same weights with other full-attention blocks disagree
    for other in [(), (0, 1, 2, 3), (0, 2)]:
        graphdef, state = nnx.split(model)
        wrong = nnx.merge(graphdef, state)
        wrong.cfg = VisionConfig.from_hf({**TINY, "fullatt_block_indexes": list(other)})
        werr, _ = _err(_encode(wrong, jnp.asarray(pv), prepare_vision_inputs(grid, wrong.cfg)), ref)
        assert werr > 1e-2 * scale, (other, werr)


def test_two_images_and_video_frames_in_one_call(tiny):
    hf, model, cfg = tiny
    grid = np.array([[1, 14, 20], [1, 6, 8], [2, 4, 6]])
    rng = np.random.RandomState(1)
    pv = rng.randn(int(np.prod(grid, 1).sum()), cfg.patch_dim).astype(np.float32)
    ref = _hf(hf, pv, grid)
    out = _encode(model, jnp.asarray(pv), prepare_vision_inputs(grid, cfg))
    assert out.shape == ref.shape == (70 + 12 + 12, 29)
    err, scale = _err(out, ref)
    assert err <= 1e-4 * scale, (err, scale)


def test_padding_gives_the_same_features(tiny):
    hf, model, cfg = tiny
    grid = np.array([[1, 6, 8], [1, 4, 10]])
    n = int(np.prod(grid, 1).sum())
    pv = np.random.RandomState(2).randn(n, cfg.patch_dim).astype(np.float32)
    plain = np.asarray(_encode(model, jnp.asarray(pv), prepare_vision_inputs(grid, cfg)))
    aux = prepare_vision_inputs(grid, cfg, pad_to=n + 48)
    assert aux.num_patches == n + 48 and aux.valid.sum() == n // 4
    # unpadded pixels with a padded aux: padded rows are dropped
    cut = np.asarray(_encode(model, jnp.asarray(pv), aux))
    # padded pixels: padded rows come out last, as zeros
    full = np.asarray(_encode(model, jnp.asarray(pad_pixel_values(pv, aux)), aux))
    assert cut.shape == plain.shape and full.shape == ((n + 48) // 4, 29)
    err, scale = _err(cut, plain)
    assert err <= 1e-6 * scale, err
    np.testing.assert_array_equal(full[: n // 4], cut)
    assert not full[n // 4:].any()
    err, scale = _err(plain, _hf(hf, pv, grid))
    assert err <= 1e-4 * scale, (err, scale)
    with pytest.raises(ValueError, match="pad_to=102 must be a multiple"):
        prepare_vision_inputs(grid, cfg, pad_to=102)
    with pytest.raises(ValueError, match="smaller than the 88 patches"):
        prepare_vision_inputs(grid, cfg, pad_to=84)


def test_jit_reuses_the_padded_bucket(tiny):
    hf, model, cfg = tiny
    traces = []

    @nnx.jit
    def encode(m, pixel_values, aux):
        traces.append(pixel_values.shape)
        return m(pixel_values, aux)

    bucket = 256
    rng = np.random.RandomState(3)
    for grid in (np.array([[1, 14, 16]]), np.array([[1, 8, 10], [1, 4, 8]])):
        n = int(np.prod(grid, 1).sum())
        pv = rng.randn(n, cfg.patch_dim).astype(np.float32)
        aux = prepare_vision_inputs(grid, cfg, pad_to=bucket)
        out = np.asarray(encode(model, jnp.asarray(pad_pixel_values(pv, aux)), aux))[: n // 4]
        err, scale = _err(out, _hf(hf, pv, grid))
        assert err <= 1e-4 * scale, (grid.tolist(), err, scale)
    assert len(traces) == 1, traces


def test_sharded_on_a_mesh_matches_transformers(tiny):
    hf, model, cfg = tiny
    grid = np.array([[1, 14, 20]])
    pv = np.random.RandomState(4).randn(280, cfg.patch_dim).astype(np.float32)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    mesh = sharding.make_mesh((2, 2, 2))
    sharding.shard_model(sharded, mesh, RULES)
    assert sharded.blocks[0].attn.qkv.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    with sharding.use_mesh(mesh, RULES):
        out = nnx.jit(lambda m, p, a: m(p, a))(sharded, jnp.asarray(pv), prepare_vision_inputs(grid, cfg))
    err, scale = _err(out, _hf(hf, pv, grid))
    assert err <= 1e-4 * scale, (err, scale)


def test_loads_from_prefixed_full_checkpoints(tiny, tmp_path):
    """transformers 5.x (model.visual.*) and 4.x (visual.*) folders; other modules' keys are skipped."""
    from safetensors.torch import save_file

    hf, model, cfg = tiny
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    exported = {k: thunk() for k, thunk in export_state(model, VISION_TABLE)}  # the table backwards
    assert set(exported) == set(sd)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
    for prefix in ("model.visual.", "visual."):
        folder = tmp_path / prefix.strip(".")
        folder.mkdir()
        save_file({prefix + k: v for k, v in sd.items()} | {"lm_head.weight": torch.zeros(3, 2)},
                  str(folder / "model.safetensors"))
        loaded = load_vision_weights(cfg, open_tensor_folder(str(folder)), torch_prefix=prefix)
        np.testing.assert_array_equal(np.asarray(loaded.blocks[2].attn.qkv.kernel[...]),
                                      np.asarray(model.blocks[2].attn.qkv.kernel[...]))
        with pytest.raises(CheckpointError, match="missing tensor"):
            load_vision_weights(cfg, open_tensor_folder(str(folder)), torch_prefix="model.vision.")
