"""Converter building blocks: lazy LoRA merging, Orbax save/restore (sharded, atomic), GoT key splitting."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from configs.sharding_rules import RULES

from got_jax import sharding
from got_jax.checkpoint import CheckpointError, TensorSource, open_tensor_folder
from got_jax.checkpoint.got_layout import embedding_rows, split_got, with_vocab_size
from got_jax.checkpoint.lora import has_lora, lora_scaling, merge_lora
from got_jax.checkpoint.orbax_io import atomic_dir, load_checkpoint, pure_tree, restore_params, save_params

REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")


def _src(d: dict) -> TensorSource:
    return TensorSource({k: (v.shape, v.dtype, "mem", lambda v=v: v) for k, v in d.items()}, "test")


def _rand(*shape, seed=0):
    return np.random.RandomState(seed + sum(shape)).randn(*shape).astype(np.float32)


@pytest.mark.parametrize("style", ["peft_wrapped", "adapter_only"])
def test_merge_lora_matches_formula(style):
    w, b, a, bb = _rand(7, 5), _rand(7), _rand(3, 5, seed=1), _rand(7, 3, seed=2)
    if style == "peft_wrapped":
        keys = {"base_model.model.m.q.base_layer.weight": w, "base_model.model.m.q.base_layer.bias": b,
                "base_model.model.m.q.lora_A.default.weight": a, "base_model.model.m.q.lora_B.default.weight": bb,
                "base_model.model.m.e.original_module.weight": _rand(4, 2),
                "base_model.model.m.e.modules_to_save.default.weight": _rand(4, 2, seed=9)}
    else:
        keys = {"m.q.weight": w, "m.q.bias": b, "m.q.lora_A.weight": a, "m.q.lora_B.weight": bb,
                "m.e.weight": _rand(4, 2, seed=9)}
    src = _src(keys)
    assert has_lora(src)
    merged = merge_lora(src, adapter_config={"r": 3, "lora_alpha": 6})
    assert sorted(merged.keys()) == ["m.e.weight", "m.q.bias", "m.q.weight"]
    np.testing.assert_allclose(merged.get("m.q.weight"), w + 2.0 * bb @ a, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged.get("m.q.bias"), b)
    np.testing.assert_array_equal(merged.get("m.e.weight"), _rand(4, 2, seed=9))  # trained copy wins


def test_merge_lora_is_lazy():
    calls = []
    w, a, b = _rand(4, 4), _rand(2, 4), _rand(4, 2)

    def entry(name, v):
        return (v.shape, v.dtype, "mem", lambda: calls.append(name) or v)

    src = TensorSource({"x.base_layer.weight": entry("w", w), "x.lora_A.default.weight": entry("a", a),
                        "x.lora_B.default.weight": entry("b", b)}, "lazy")
    merged = merge_lora(src, alpha=2.0)
    assert calls == [] and merged.shape("x.weight") == (4, 4)
    merged.get("x.weight")
    assert sorted(calls) == ["a", "b", "w"]


def test_lora_errors():
    with pytest.raises(CheckpointError, match="no base weight"):
        merge_lora(_src({"m.q.lora_A.default.weight": _rand(2, 3), "m.q.lora_B.default.weight": _rand(4, 2)}), alpha=1)
    with pytest.raises(CheckpointError, match="no lora_B partner"):
        merge_lora(_src({"m.q.weight": _rand(4, 3), "m.q.lora_A.default.weight": _rand(2, 3)}), alpha=1)
    with pytest.raises(CheckpointError, match=r"do not fit base weight \(4, 5\)"):
        merge_lora(_src({"m.q.weight": _rand(4, 5), "m.q.lora_A.weight": _rand(2, 3), "m.q.lora_B.weight": _rand(4, 2)}),
                   alpha=1)
    with pytest.raises(CheckpointError, match="no alpha"):
        merge_lora(_src({"m.q.weight": _rand(4, 3), "m.q.lora_A.weight": _rand(2, 3), "m.q.lora_B.weight": _rand(4, 2)}))
    with pytest.raises(CheckpointError, match="r=8, tensors have rank 2"):
        lora_scaling("m.q", 2, {"r": 8, "lora_alpha": 16})
    assert lora_scaling("m.q_proj", 4, {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4},
                                        "alpha_pattern": {"q_proj": 2}}) == 0.5
    assert lora_scaling("m.q", 4, {"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0


class _Net(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(1.0)
        self.a = nnx.Linear(8, 16, kernel_init=sharding.param_init(init, "embed", "mlp"),
                            bias_init=sharding.param_init(init, "mlp"), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 8, kernel_init=sharding.param_init(init, "mlp", "embed"),
                                           bias_init=sharding.param_init(init, "embed"), rngs=rngs)
                                for _ in range(2)])


def test_orbax_roundtrip_sharded_and_atomic(tmp_path):
    net = _Net(nnx.Rngs(1))
    tree = {"net": pure_tree(net), "proj": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    save_params(str(tmp_path / "p"), tree)
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(str(tmp_path / "p"), tree)
    back = restore_params(str(tmp_path / "p"))  # as stored
    np.testing.assert_array_equal(np.asarray(back["proj"]["kernel"]), np.asarray(tree["proj"]["kernel"]))
    # sharded restore from the abstract state's logical names
    mesh = sharding.make_mesh((1, 4, 2))
    abstract = nnx.state(nnx.eval_shape(lambda: _Net(nnx.Rngs(0))))
    shards = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, RULES))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    got = restore_params(str(tmp_path / "p"), {"net": nnx.to_pure_dict(abstract), "proj": tree["proj"]},
                         {"net": shards, "proj": {"kernel": rep, "bias": rep}}, dtype=jnp.bfloat16)
    k = got["net"]["a"]["kernel"]
    assert k.dtype == jnp.bfloat16 and k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(k, np.float32),
                                  np.asarray(net.a.kernel[...].astype(jnp.bfloat16), np.float32))
    # a failing write leaves nothing behind
    with pytest.raises(RuntimeError):
        with atomic_dir(str(tmp_path / "q")) as tmp:
            open(os.path.join(tmp, "x"), "w").close()
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_load_checkpoint_subset(tmp_path):
    from got_jax.checkpoint.orbax_io import write_checkpoint_folder

    nets = {"a": _Net(nnx.Rngs(1)), "b": _Net(nnx.Rngs(2))}
    write_checkpoint_folder(str(tmp_path / "c"), {"x": 1}, {k: pure_tree(v) for k, v in nets.items()})
    builders = {k: (lambda cfg: nnx.eval_shape(lambda: _Net(nnx.Rngs(0)))) for k in nets}
    mesh = sharding.make_mesh()
    tree, cfg = load_checkpoint(str(tmp_path / "c"), parts=builders, only=("b",), mesh=mesh, rules=RULES)
    assert cfg["x"] == 1 and cfg["parts"] == ["a", "b"] and list(tree) == ["b"]
    np.testing.assert_array_equal(np.asarray(tree["b"]["layers"][1]["kernel"]),
                                  np.asarray(nets["b"].layers[1].kernel[...]))
    with pytest.raises(CheckpointError, match="not a converted got-jax folder"):
        load_checkpoint(str(tmp_path / "nope"), parts=builders)


def test_split_got(tmp_path):
    sd = {"mllm.model.embed_tokens.weight": torch.zeros(9, 4), "mllm.model.layers.0.q.base_layer.weight": torch.ones(3, 4),
          "mllm.model.layers.0.q.lora_A.default.weight": torch.ones(2, 4),
          "mllm.model.layers.0.q.lora_B.default.weight": torch.ones(3, 2),
          "output_projector.projector.weight": torch.zeros(4, 4), "output_projector.projector.bias": torch.zeros(4),
          "output_projector_add.projector.weight": torch.zeros(5, 4),
          "output_projector_add.projector.bias": torch.zeros(5), "unet.conv_in.weight": torch.zeros(2, 12, 3, 3)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    parts = split_got(open_tensor_folder(str(tmp_path)), lora_alpha=4.0)
    assert sorted(parts) == ["pooled_projector", "projector", "reasoner", "unet"]
    np.testing.assert_array_equal(parts["reasoner"].get("model.layers.0.q.weight"), np.full((3, 4), 5.0, np.float32))
    assert embedding_rows(parts["reasoner"]) == 9
    assert with_vocab_size({"vocab_size": 3, "text_config": {"vocab_size": 3}}, 9) == {
        "vocab_size": 9, "text_config": {"vocab_size": 9}}
    save_file({**sd, "text_encoder.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'text_encoder.x'"):
        split_got(open_tensor_folder(str(tmp_path)), lora_alpha=4.0)
    save_file({k: v for k, v in sd.items() if not k.startswith("unet.")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no unet.. tensors"):
        split_got(open_tensor_folder(str(tmp_path)), lora_alpha=4.0)


def test_full_size_got_tree_layout():
    """The documented params tree at GoT-6B sizes (abstract: no memory)."""
    import json

    from got_jax.got.checkpoint import part_builders

    ref = REFERENCE_CONFIGS + "/"
    load = lambda name: json.load(open(ref + name))  # noqa: E731
    cfg = {"reasoner": with_vocab_size(load("qwen2_5_vl_3b_config.json"), 151665 + 66),
           "unet": {**load("sdxl_base_unet_config.json"), "in_channels": 12}, "vae": load("sdxl_vae_config.json"),
           "projectors": {"projector": {"in_features": 2048, "out_features": 2048},
                          "pooled_projector": {"in_features": 2048, "out_features": 1280}}}
    builders = part_builders()
    assert sorted(builders) == sorted(["reasoner", "projector", "pooled_projector", "unet", "vae"])
    # (the family tests check their full-size trees; building them here again costs ~15 s)
    shapes = {name: jax.tree.map(lambda x: x.shape, pure_tree(builders[name](cfg)))
              for name in ("projector", "pooled_projector")}
    assert shapes["projector"] == {"kernel": (2048, 2048), "bias": (2048,)}
    assert shapes["pooled_projector"] == {"kernel": (2048, 1280), "bias": (1280,)}
