"""Trainable LoRA on the reasoner: layout and init, merge, dropout, PEFT export / import, merged .bin export.

A tiny random Qwen2.5-VL (tests/convert_helpers.py: hidden 20, 5 heads / 1 kv head of 4, mlp 23, 2 layers)
is built in transformers, saved in the 5.x layout and loaded with ``load_hf_checkpoint``; adapters get
random A and B so they change the outputs. Comparisons are float32 with
``max abs err <= 1e-4 * max(1, max |reference|)`` (``check_close``) against torch, ``1e-6`` (``_tight``) between
two of our models that compute the same thing, unless a test says otherwise.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert_helpers import check_close, qwen_logits, save_qwen, tiny_qwen
from configs.sharding_rules import RULES
from got_jax.checkpoint import CheckpointError
from got_jax.models.options import ModelOptions
from got_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, load_hf_checkpoint
from got_jax.models.qwen2_5_vl import lora

TEXT = dict(vocab_size=61, hidden_size=20, intermediate_size=23, num_hidden_layers=2, num_attention_heads=5,
            num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 0, 1]})
IDS = np.random.default_rng(0).integers(0, 50, (2, 9))


def _text_model(options=ModelOptions(), seed=0):
    cfg = Qwen2_5_VLConfig.from_hf_config({"text_config": TEXT})
    return Qwen2_5_VLForConditionalGeneration(cfg, options=options, rngs=nnx.Rngs(seed))


def _randomize_adapters(model, seed=0, scale=0.5):
    """Random A and B (B is zero at init, so adapters would not change anything)."""
    for i, (path, m) in enumerate(sorted(lora.lora_modules(model).items())):
        ka, kb = jax.random.split(jax.random.key(seed * 1000 + i))
        m.lora_a.set_value(scale * jax.random.normal(ka, m.lora_a.shape))
        m.lora_b.set_value(scale * jax.random.normal(kb, m.lora_b.shape))


def _tight(out, ref):
    """Same computation up to XLA's fusion choices (a zero adapter added, a skipped dropout): 1e-6 relative."""
    assert np.abs(out - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())


@nnx.jit
def _forward(model, ids, positions, mask):
    return model.forward(ids, positions, mask).logits


def _logits(model, ids=IDS):
    positions, _, mask, _ = model.prepare(ids)
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))


def test_adapter_layout_init_and_targets():
    """A (*in, r) PEFT-uniform with logical names in + lora_rank, B (r, *out) zeros; only the targets get one;
    rank 0 builds exactly the model without options."""
    r = 3
    m = _text_model(ModelOptions(lora_rank=r, lora_targets=("q", "o", "down_proj")))
    mods = lora.lora_modules(m)
    assert sorted({p.rsplit(".", 1)[1] for p in mods}) == ["down_proj", "o_proj", "q_proj"]
    assert len(mods) == 3 * TEXT["num_hidden_layers"]
    layer = m.language_model.layers[0]
    q, o = layer.self_attn.q_proj, layer.self_attn.o_proj
    assert q.lora_a.shape == (20, r) and q.lora_b.shape == (r, 5, 4)
    assert o.lora_a.shape == (5, 4, r) and o.lora_b.shape == (r, 20)
    assert q.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert q.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads", "kv")
    assert o.lora_a.get_metadata()["out_sharding"] == ("heads", "kv", "lora_rank")
    assert layer.self_attn.k_proj.lora_a is None and layer.mlp.up_proj.lora_a is None
    assert all(isinstance(x.lora_a, nnx.LoRAParam) for x in mods.values())
    assert all(float(jnp.abs(x.lora_b[...]).max()) == 0.0 for x in mods.values())
    # PEFT's kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in)); fan_in of o_proj is N*H = 20
    a = np.asarray(layer.mlp.down_proj.lora_a[...])
    bound = 1 / np.sqrt(23)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    a = np.asarray(o.lora_a[...])
    assert np.abs(a).max() <= 1 / np.sqrt(20)
    # no LoRA: no LoRAParam, same tree and values as the default build
    plain, none = _text_model(), _text_model(ModelOptions(lora_rank=0))
    assert not jax.tree.leaves(nnx.state(none, nnx.LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(plain)), nnx.to_pure_dict(nnx.state(none)))


@pytest.mark.parametrize("rslora", [False, True])
def test_fresh_adapters_are_identity_and_merge_equals_unmerged(rslora):
    """add_lora on a base model changes nothing until trained; merge_lora folds scale * A @ B into the kernels
    (scale = alpha / r, or alpha / sqrt(r) with rsLoRA) with the same logits as the unmerged model."""
    base = _text_model(seed=1)
    opts = ModelOptions(lora_rank=4, lora_alpha=6.0, use_rslora=rslora)
    m = lora.add_lora(base, opts, jax.random.key(0))
    _tight(_logits(m), _logits(base))
    _randomize_adapters(m)
    out = _logits(m)
    assert np.abs(out - _logits(base)).max() > 0.1  # the adapters matter
    merged = lora.merge_lora(m)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    check_close(_logits(merged), out)
    q = m.language_model.layers[1].self_attn.q_proj
    scale = 6.0 / (np.sqrt(4) if rslora else 4)
    want = np.asarray(q.kernel[...]) + scale * np.einsum("dr,rnh->dnh", q.lora_a[...], q.lora_b[...])
    np.testing.assert_allclose(np.asarray(merged.language_model.layers[1].self_attn.q_proj.kernel[...]), want,
                               rtol=1e-6, atol=1e-6)
    # the adapted model is untouched by merging
    assert np.abs(np.asarray(q.kernel[...]) - want).max() > 1e-3


def test_lora_dropout_only_on_adapter_input_and_off_in_eval():
    """Dropout acts on the adapter's input: with B = 0 it changes nothing; with trained adapters it is random in
    train mode and the identity after ``model.eval()`` (equal to the same weights with dropout 0)."""
    m = _text_model(ModelOptions(lora_rank=2, lora_dropout=0.5), seed=2)
    ref = _logits(m)
    np.testing.assert_array_equal(_logits(m), ref)  # B = 0
    _randomize_adapters(m, seed=3)
    a, b = _logits(m), _logits(m)
    assert np.abs(a - b).max() > 1e-3
    m.eval()
    no_drop = _text_model(ModelOptions(lora_rank=2, lora_dropout=0.0), seed=2)
    nnx.update(no_drop, nnx.state(m, nnx.Param))
    _tight(_logits(m), _logits(no_drop))


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen5")
    hf = tiny_qwen(tied=False, seed=4)
    save_qwen(hf, path, "5.x")
    return hf, load_hf_checkpoint(path)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_loads_in_peft_with_same_logits(tmp_path, hf_and_ours, rslora):
    """save_peft_adapter -> peft.PeftModel.from_pretrained on transformers' model: same logits as ours, different
    from the base model's (the adapter really loaded: keys carry the base_model.model. prefix)."""
    peft = pytest.importorskip("peft")
    hf, base = hf_and_ours
    opts = ModelOptions(lora_rank=3, lora_alpha=5.0, use_rslora=rslora, lora_targets=("q", "k", "o", "gate", "down"))
    ours = lora.add_lora(base, opts, jax.random.key(1))
    _randomize_adapters(ours, seed=5)
    lora.save_peft_adapter(ours, tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["r"] == 3
    sd = lora.peft_state_dict(ours)
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in sd)
    base_logits = qwen_logits(hf, IDS)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    wrapped = [n for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and not n.endswith("lora_A")]
    assert len(wrapped) == len(lora.lora_modules(ours)) and not any("visual" in n for n in wrapped)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(IDS)).logits.numpy()
    pm.unload()  # give the module-scoped transformers model its plain Linears back
    assert np.abs(theirs - base_logits).max() > 0.1
    check_close(_logits(ours), theirs)


def test_load_peft_adapter_from_peft_model(hf_and_ours):
    """An adapter trained in PEFT (random lora_B) loads into ours (load_peft_adapter) with the same logits;
    a missing key is named."""
    peft = pytest.importorskip("peft")
    hf, base = hf_and_ours
    opts = ModelOptions(lora_rank=2, lora_alpha=7.0)
    cfg = peft.LoraConfig(r=2, lora_alpha=7.0, target_modules=lora.peft_target_regex(opts.lora_targets))
    pm = peft.get_peft_model(hf, cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
        theirs = pm(input_ids=torch.tensor(IDS)).logits.numpy()
    sd = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    pm.unload()
    ours = lora.load_peft_adapter(lora.add_lora(base, opts, jax.random.key(0)), sd)
    check_close(_logits(ours), theirs)
    sd.pop(sorted(sd)[0])
    with pytest.raises(CheckpointError, match="no tensor for adapter"):
        lora.load_peft_adapter(lora.add_lora(base, opts, jax.random.key(0)), sd)


def test_merged_got_exports_in_got6b_bin_layout(tmp_path):
    """A tiny GoT with trained adapters, merged and written as a converted folder, exports through
    convert/export_pytorch.py (got_bin) with mllm.* weights = W + scale * B @ A in PEFT's convention."""
    from convert.export_pytorch import export
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder
    from got_jax.checkpoint import export_state
    from got_jax.got.demo import demo_config, random_model
    from got_jax.models.qwen2_5_vl.checkpoint import mapping_table
    from got_jax.train.trainable import base_weights

    config = demo_config()
    opts = ModelOptions(lora_rank=2, lora_alpha=4.0, lora_targets=("q", "down"))
    got = lora.add_lora(random_model(config, 0), opts, jax.random.key(2))
    _randomize_adapters(got, seed=7)
    merged = lora.merge_lora(got)
    write_checkpoint_folder(str(tmp_path / "ckpt"), dict(config, param_dtype="float32"), pure_tree(merged))
    export(str(tmp_path / "ckpt"), str(tmp_path / "bin"), fmt="got_bin")
    sd = torch.load(os.path.join(tmp_path, "bin", "pytorch_model.bin"), weights_only=True)
    peft_sd = lora.peft_state_dict(got.reasoner)
    table = mapping_table(got.config.reasoner, "4.x")
    base_sd = {k: t() for k, t in export_state(nnx.state(got.reasoner, base_weights()), table)}
    checked = 0
    for key in peft_sd:
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model.model.language_model."):-len(".lora_A.weight")]
        a, b = peft_sd[key], peft_sd[key.replace("lora_A", "lora_B")]
        want = base_sd[f"model.{module}.weight"] + 2.0 * b @ a
        np.testing.assert_allclose(sd[f"mllm.model.{module}.weight"].numpy(), want, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 2 * 2
    # untouched weights pass through
    np.testing.assert_array_equal(sd["mllm.model.layers.0.self_attn.k_proj.weight"].numpy(),
                                  base_sd["model.layers.0.self_attn.k_proj.weight"])


def test_from_checkpoint_with_lora_options_starts_at_the_base_model(tmp_path):
    """GoT.from_checkpoint(options with LoRA) on a converted folder (which holds no adapters): adapters are
    created fresh (A uniform, B zero, RNG state set), so logits equal the base model's; sharded on a
    (data 2, fsdp 2, tensor 2) mesh every adapter is placed by its logical names."""
    from got_jax import sharding
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder
    from got_jax.got.demo import demo_config, random_model
    from got_jax.got.model import GoT

    config = demo_config()
    base = random_model(config, 1)
    write_checkpoint_folder(str(tmp_path / "ckpt"), dict(config, param_dtype="float32"), pure_tree(base))
    opts = ModelOptions(lora_rank=2, lora_dropout=0.1, lora_targets=("q", "o", "up"))
    mesh = sharding.make_mesh((2, 2, 2))
    got = GoT.from_checkpoint(str(tmp_path / "ckpt"), options=opts, mesh=mesh, rules=RULES)
    assert not [x for x in jax.tree.leaves(nnx.state(got)) if isinstance(x, jax.ShapeDtypeStruct)]
    mods = lora.lora_modules(got.reasoner)
    assert len(mods) == 3 * 2
    for m in mods.values():
        assert float(jnp.abs(m.lora_b[...]).max()) == 0.0 and float(jnp.abs(m.lora_a[...]).max()) > 0.0
        for var in (m.lora_a, m.lora_b):
            assert var[...].sharding == sharding.variable_sharding(var, mesh, RULES)
    ids = np.random.default_rng(1).integers(0, 300, (1, 7))
    check_close(_logits(got.reasoner, ids), _logits(base.reasoner, ids))  # sharded matmuls: reduction order
