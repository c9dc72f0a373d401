"""Qwen2.5-VL reasoner: parity with transformers' Qwen2_5_VLForConditionalGeneration and the loader.

transformers 5.24's ``save_pretrained`` writes the 4.x key layout (``model.layers.*``, ``visual.*``);
the 5.x layout (``model.language_model.*``, ``model.visual.*``) is produced by renaming keys.
A tiny random model with odd sizes (text: hidden 72, 6 query heads in 2 key/value groups of 3, head 12,
mrope_section (1, 2, 3), rope_theta 1e6 as the released 3B, mlp 83, 3 layers, vocab 211; vision: patches
of 4 px, windows of 2x2 merged tokens so a 12x8-patch image has 6 windows, full attention in block 1,
rotary theta 1000) is saved with ``save_pretrained`` and loaded by ``load_hf_checkpoint``. Every image
has a non-square grid (h != w), so swapped height / width positions cannot hide. Every comparison is
float32 at highest matmul precision with ``max abs err <= 1e-4 * max(1, max |reference|)`` over the
compared (non-padding) positions.
"""

import json
import os

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel
from configs.sharding_rules import RULES

from got_jax import sharding
from got_jax.checkpoint import CheckpointError
from got_jax.models.qwen2_5_vl import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, count_params,
                                       get_rope_index, load_hf_checkpoint, preprocess_images)
from got_jax.models.qwen2_5_vl.vision import prepare_vision_inputs

REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")

IMG, VID, VSTART, VEND = 200, 201, 198, 199  # tiny-config special ids (the code reads them from config.json)
# 2 key/value heads shared by 3 query heads each: query head i must read kv head i // 3 (not i % 2)
TEXT = dict(vocab_size=211, hidden_size=72, intermediate_size=83, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 2, 3]}, rope_theta=1e6,
            rms_norm_eps=1e-6, initializer_range=0.2)
VISION = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=72,
              fullatt_block_indexes=[1], window_size=16, patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
              initializer_range=0.2, rope_parameters={"rope_type": "axial", "rope_theta": 1000.0})


def hf_config(tied: bool) -> HFConfig:
    return HFConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_id=IMG, video_token_id=VID,
                    vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tied,
                    initializer_range=0.2)


def build_hf(path, tied: bool, seed: int = 0, **save_kw) -> HFModel:
    """A random HF model saved to ``path`` (weights scaled up so logits and attention are not flat)."""
    torch.manual_seed(seed)
    hf = HFModel(hf_config(tied)).eval().float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    hf.save_pretrained(str(path), **save_kw)
    return hf


def image_inputs(sizes, seed=1):
    """(pixel_values, image_grid_thw) from transformers' image processor for random images of ``sizes`` (h, w)."""
    rng = np.random.RandomState(seed)
    images = [rng.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return preprocess_images(images, min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4, merge_size=2,
                             temporal_patch_size=2)


def image_span(grid):
    n = int(np.prod(grid)) // 4
    return [VSTART] + [IMG] * n + [VEND]


def hf_forward(hf, ids, mask=None, pv=None, grid=None):
    kw = dict(input_ids=torch.tensor(ids))
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((np.asarray(ids) == IMG).astype(np.int64)))
    with torch.no_grad():
        out = hf(**kw, output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def check(out, ref, where=None):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if where is not None:
        out, ref = out[where], ref[where]
    err, scale = float(np.abs(out - ref).max()), max(1.0, float(np.abs(ref).max()))
    assert err <= 1e-4 * scale, (err, scale)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_untied")
    return build_hf(path, tied=False), path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tied")
    return build_hf(path, tied=True, seed=1, max_shard_size="100KB"), path  # sharded with an index


def test_config_both_layouts():
    ref = json.load(open(os.path.join(REFERENCE_CONFIGS, "qwen2_5_vl_3b_config.json")))
    cfg4 = Qwen2_5_VLConfig.from_hf_config(ref)
    hf5 = HFConfig(**ref).to_dict()
    assert "text_config" in hf5
    cfg5 = Qwen2_5_VLConfig.from_hf_config(hf5)
    assert cfg4 == cfg5
    t = cfg4.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.mrope_section, t.rope_theta,
            t.tie_word_embeddings, cfg4.image_token_id, cfg4.vision_start_token_id) == (
            2048, 36, 2, (16, 24, 24), 1e6, True, 151655, 151652)
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2_5_VLConfig.from_hf_config({**ref, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 23]}})


def test_full_size_eval_shape_param_count():
    cfg = Qwen2_5_VLConfig.from_hf_config(os.path.join(REFERENCE_CONFIGS, "qwen2_5_vl_3b_config.json"))
    abstract = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    assert abstract.lm_head is None  # tied
    assert count_params(abstract) == 3_754_622_976


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_text_logits(which, request):
    hf, path = request.getfixturevalue(which)
    model = load_hf_checkpoint(path)
    assert (model.lm_head is None) == (which == "tied")
    ids = np.random.RandomState(0).randint(0, 190, (2, 13))
    ref_logits, ref_hidden = hf_forward(hf, ids)
    out = model(ids)
    check(out.logits, ref_logits)  # tol 1e-4 * max(1, |ref|)
    check(out.hidden_states, ref_hidden)


def test_one_image_windows_and_rope_index(untied):
    hf, path = untied
    model = load_hf_checkpoint(path)
    pv, grid = image_inputs([(48, 32)])  # non-square: 12x8 patches -> 6x4 merged tokens
    assert grid.tolist() == [[1, 12, 8]]
    aux = prepare_vision_inputs(grid, model.cfg.vision)
    assert len(np.unique(aux.window_segment_ids)) == 6 and len(np.unique(aux.full_segment_ids)) == 1
    ids = np.array([[5, 6] + image_span(grid[0]) + [7, 8, 9, 10]])
    positions, deltas = get_rope_index(ids, model.cfg, grid)
    with torch.no_grad():
        ref_pos, ref_deltas = hf.model.get_rope_index(torch.tensor(ids), image_grid_thw=torch.tensor(grid),
                                                      mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    np.testing.assert_array_equal(positions, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy()[:, 0])
    ref_logits, ref_hidden = hf_forward(hf, ids, pv=pv, grid=grid)
    out = model(ids, pv, grid)
    check(out.logits, ref_logits)
    check(out.hidden_states, ref_hidden)


def test_two_images_and_padded_batch(tied):
    hf, path = tied
    assert (path / "model.safetensors.index.json").exists()  # sharded checkpoint with an index
    model = load_hf_checkpoint(path)
    pv, grid = image_inputs([(48, 32), (24, 40), (32, 56)])
    row0 = [3] + image_span(grid[0]) + [4, 5] + image_span(grid[1]) + [6]  # two images in one sequence
    row1 = [7, 8] + image_span(grid[2]) + [9, 10, 11]
    t = max(len(row0), len(row1))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    for r, row in enumerate((row0, row1)):  # left padding
        ids[r, t - len(row):] = row
        mask[r, t - len(row):] = 1
    positions, deltas = get_rope_index(ids, model.cfg, grid, mask)
    with torch.no_grad():
        ref_pos, ref_deltas = hf.model.get_rope_index(torch.tensor(ids), image_grid_thw=torch.tensor(grid),
                                                      attention_mask=torch.tensor(mask),
                                                      mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    np.testing.assert_array_equal(positions, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy()[:, 0])
    ref_logits, ref_hidden = hf_forward(hf, ids, mask, pv, grid)
    out = model(ids, pv, grid, attention_mask=mask)
    check(out.logits, ref_logits, mask.astype(bool))  # padding positions are not compared
    check(out.hidden_states, ref_hidden, mask.astype(bool))
    with pytest.raises(ValueError, match="image tokens"):
        model(ids[:, :-3], pv, grid, attention_mask=mask[:, :-3])  # cut the last image's tokens


def _load_all(folder):
    tensors = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, f)))
    return tensors


def _rename_to_5x(src, dst):
    """transformers 5.24's save_pretrained writes the 4.x key layout; this writes the 5.x one + a 4.x flat config."""
    os.makedirs(dst)
    tensors = _load_all(src)
    assert any(k.startswith("visual.") for k in tensors) and any(k.startswith("model.layers.") for k in tensors)
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    assert any(k.startswith("model.visual.") for k in renamed)
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    save_file(renamed, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    flat = {**cfg.pop("text_config"), **cfg}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": TEXT["rope_scaling"]["mrope_section"]}
    flat["rope_theta"] = flat.pop("rope_parameters")["rope_theta"]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(flat, f)  # 4.x flat config form
    return renamed


def test_5x_keys_4x_config_and_half_precision(untied, tmp_path):
    hf, path = untied
    _rename_to_5x(path, tmp_path / "v5")
    model = load_hf_checkpoint(tmp_path / "v5")
    pv, grid = image_inputs([(32, 48)])
    ids = np.array([[5] + image_span(grid[0]) + [7, 8]])
    ref_logits, _ = hf_forward(hf, ids, pv=pv, grid=grid)
    check(model(ids, pv, grid).logits, ref_logits)
    # a bf16 checkpoint loads (cast to float32) and matches the float32 reference built from the same bf16 weights
    hf16 = HFModel.from_pretrained(str(path), dtype=torch.bfloat16)
    hf16.save_pretrained(str(tmp_path / "bf16"))
    hf32 = HFModel.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32).eval()
    model16 = load_hf_checkpoint(tmp_path / "bf16")
    assert model16.language_model.embed_tokens.embedding[...].dtype == np.float32
    ids = np.random.RandomState(3).randint(0, 190, (1, 9))
    check(model16(ids).logits, hf_forward(hf32, ids)[0])


def test_got_vocab_rows_from_checkpoint(tied, tmp_path):
    """Checkpoints with added tokens (GoT adds 66) have more embedding rows than config.vocab_size."""
    hf, path = tied
    tensors = _load_all(path)
    key = "model.embed_tokens.weight"
    tensors[key] = np.concatenate([tensors[key], np.ones((5, tensors[key].shape[1]), np.float32)])
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors[key]  # tied: a stored copy of the embedding is accepted and ignored
    os.makedirs(tmp_path / "extra")
    save_file(tensors, str(tmp_path / "extra" / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "extra" / "config.json").write_text(f.read())
    model = load_hf_checkpoint(tmp_path / "extra")
    assert model.cfg.text.vocab_size == 216
    ids = np.random.RandomState(4).randint(0, 190, (1, 7))
    logits = np.asarray(model(ids).logits)
    check(logits[..., :211], hf_forward(hf, ids)[0])
    assert logits.shape[-1] == 216


def test_bad_checkpoints(untied, tmp_path):
    _, path = untied
    tensors = load_file(os.path.join(path, "model.safetensors"))
    config = (path / "config.json").read_text()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_hf_checkpoint(tmp_path / "nope")
    key = "model.layers.1.self_attn.k_proj.weight"
    for name, edit, pattern in [
            ("missing", lambda t: t.pop(key), r"missing tensor for 'language_model\.layers\.1\.self_attn\.k_proj\.kernel'"),
            ("shape", lambda t: t.__setitem__(key, np.zeros((12, 72), np.float32)),
             r"k_proj\.weight'.*\(12, 72\).*\(72, 2, 12\)"),
            ("extra", lambda t: t.__setitem__("model.bogus.weight", np.zeros(3, np.float32)),
             r"unexpected tensor 'model\.bogus\.weight'")]:
        bad = dict(tensors)
        edit(bad)
        os.makedirs(tmp_path / name)
        save_file(bad, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(config)
        with pytest.raises(CheckpointError, match=pattern):
            load_hf_checkpoint(tmp_path / name)


def test_sharded_load_same_logits(untied):
    hf, path = untied
    mesh = sharding.make_mesh((1, 4, 2))
    model = load_hf_checkpoint(path, mesh=mesh, rules=RULES)
    kernel = model.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec[0] == "fsdp"
    ids = np.random.RandomState(5).randint(0, 190, (2, 8))
    with sharding.use_mesh(mesh, RULES):
        out = model(ids)
    check(out.logits, hf_forward(hf, ids)[0])


def test_processing_helpers_expand_image_tokens():
    """Image processor + bundled test tokenizer: one <|image_pad|> per merged patch, left padding."""
    from got_jax.got.tokenizer import load_tokenizer
    from got_jax.models.qwen2_5_vl import chat_text, encode, make_image_processor

    tok = load_tokenizer()
    proc = make_image_processor(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4)
    prompt = chat_text(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "edit it"}]}])
    assert prompt.count("<|image_pad|>") == 1
    rng = np.random.RandomState(1)
    image = rng.randint(0, 256, (48, 32, 3), dtype=np.uint8)
    enc = encode(tok, [prompt, "short"], [image], image_processor=proc)
    pv, grid = image_inputs([(48, 32)])
    np.testing.assert_array_equal(enc["image_grid_thw"], grid)
    np.testing.assert_allclose(enc["pixel_values"], pv, rtol=0, atol=0)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"][0] == pad_id).sum()) == int(np.prod(grid[0])) // 4
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][:, -1].all()  # left padded
