"""Tensor files and the declarative mapping: round trips and named errors."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file as torch_save_safetensors

from got_jax.checkpoint import (CONV2D, LINEAR, CheckpointError, MappingTable, Rule, export_state,
                                load_into_abstract, open_tensor_folder, write_safetensors)
from got_jax.checkpoint.tensor_io import open_safetensors


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(3, 5, rngs=rngs) for _ in range(2)])
        self.conv = nnx.Conv(3, 7, (3, 3), rngs=rngs)


TABLE = MappingTable([
    Rule("blocks.{i}.proj.weight", "layers.{i}.kernel", LINEAR),
    Rule("blocks.{i}.proj.bias", "layers.{i}.bias"),
    Rule("conv.weight", "conv.kernel", CONV2D),
    Rule("conv.bias", "conv.bias"),
], ignore=[r"\.inv_freq$"])


def _torch_sd(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.proj.weight": torch.randn(5, 3, generator=g) for i in range(2)}
    sd |= {f"blocks.{i}.proj.bias": torch.randn(5, generator=g) for i in range(2)}
    sd |= {"conv.weight": torch.randn(7, 3, 3, 3, generator=g), "conv.bias": torch.randn(7, generator=g),
           "rotary.inv_freq": torch.randn(4, generator=g)}
    return {k: v.to(dtype) for k, v in sd.items()}


def _abstract():
    return nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_load_and_export_roundtrip(tmp_path, dtype):
    sd = _torch_sd(dtype)
    torch_save_safetensors(sd, str(tmp_path / "model.safetensors"))
    model = load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE)
    np.testing.assert_array_equal(np.asarray(model.layers[1].kernel.get_value()),
                                  sd["blocks.1.proj.weight"].float().numpy().T)
    np.testing.assert_array_equal(np.asarray(model.conv.kernel.get_value()),
                                  sd["conv.weight"].float().numpy().transpose(2, 3, 1, 0))
    # export back: exact tensors (float32 model -> cast back to the source dtype)
    out = tmp_path / "out.safetensors"
    np_dtype = {torch.float32: np.float32, torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}[dtype]
    write_safetensors(str(out), export_state(model, TABLE, dtype=np_dtype))
    from safetensors.torch import load_file
    back = load_file(str(out))
    assert set(back) == set(sd) - {"rotary.inv_freq"}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


def test_sharded_index(tmp_path):
    sd = _torch_sd()
    keys = sorted(sd)
    a, b = {k: sd[k] for k in keys[:3]}, {k: sd[k] for k in keys[3:]}
    torch_save_safetensors(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    torch_save_safetensors(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    model = load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE)
    np.testing.assert_array_equal(np.asarray(model.conv.bias.get_value()), sd["conv.bias"].numpy())
    # an index that names a missing shard
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        open_tensor_folder(str(tmp_path))


def test_named_errors(tmp_path):
    sd = _torch_sd()
    missing = dict(sd)
    del missing["blocks.1.proj.bias"]
    torch_save_safetensors(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor for 'layers.1.bias'.*blocks.1.proj.bias"):
        load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE)
    bad = dict(sd)
    bad["conv.weight"] = torch.zeros(7, 3, 5, 5)
    torch_save_safetensors(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'conv.weight'.*\(7, 3, 5, 5\).*\(3, 3, 3, 7\)"):
        load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE)
    extra = dict(sd)
    extra["blocks.0.extra"] = torch.zeros(2)
    torch_save_safetensors(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks.0.extra'"):
        load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        open_tensor_folder(str(tmp_path / "nope"))
    # truncated file
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="truncated"):
        open_safetensors(str(tmp_path / "model.safetensors"))


def test_bin_reader(tmp_path):
    sd = _torch_sd(torch.bfloat16)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE)
    np.testing.assert_array_equal(np.asarray(model.layers[0].kernel.get_value()),
                                  sd["blocks.0.proj.weight"].float().numpy().T)


def test_sharded_placement(tmp_path):
    from got_jax import sharding

    torch_save_safetensors(_torch_sd(), str(tmp_path / "model.safetensors"))
    mesh = sharding.make_mesh((1, 8, 1)) if len(jax.devices()) == 8 else sharding.make_mesh()
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model = load_into_abstract(_abstract(), open_tensor_folder(str(tmp_path)), TABLE, shardings=lambda p, v: rep)
    assert model.conv.kernel.get_value().sharding == rep
