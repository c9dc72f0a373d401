"""convert/qwen2_5_vl.py: both HF key layouts -> Orbax folder -> our model matches PyTorch; export round trip."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_helpers import (assert_state_dicts_equal, check_close, jax_qwen, qwen_logits, save_qwen, tiny_qwen)
from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen
from configs.sharding_rules import RULES

from got_jax.convert import export_pytorch, qwen2_5_vl
from got_jax.checkpoint import CheckpointError
from got_jax import sharding
from got_jax.got.checkpoint import load_checkpoint, load_got_checkpoint


@pytest.mark.parametrize("layout,tied", [("4.x", True), ("5.x", False)])
def test_convert_load_export(tmp_path, layout, tied):
    hf = tiny_qwen(tied)
    save_qwen(hf, tmp_path / "qwen", layout)
    cfg = qwen2_5_vl.convert_qwen(str(tmp_path / "qwen"), str(tmp_path / "jax"), progress=False)
    assert cfg["reasoner"]["text_config"]["vocab_size"] == 61
    assert sorted(os.listdir(tmp_path / "jax" / "tokenizer")) == ["preprocessor_config.json", "tokenizer_config.json"]
    tree, cfg = load_checkpoint(str(tmp_path / "jax"))
    assert list(tree) == ["reasoner"]
    # sharded restore: every array lands in the sharding of its logical axis names
    mesh = sharding.make_mesh((1, 2, 4))
    sharded, _ = load_got_checkpoint(str(tmp_path / "jax"), mesh=mesh, rules=RULES, dtype=jnp.bfloat16)
    up = sharded["reasoner"]["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert up.dtype == jnp.bfloat16 and up.sharding.mesh.shape == mesh.shape
    assert up.sharding.spec == sharding.logical_to_spec(("embed", "mlp"), RULES, mesh=mesh, shape=up.shape)
    model = jax_qwen(cfg["reasoner"], tree["reasoner"])
    ids = np.random.RandomState(0).randint(0, 50, (2, 7))
    check_close(model(ids).logits, qwen_logits(hf, ids))
    # export -> transformers from_pretrained -> bit-identical weights
    export_pytorch.export(str(tmp_path / "jax"), str(tmp_path / "hf"), fmt="hf", layout=layout)
    back = HFQwen.from_pretrained(str(tmp_path / "hf" / "reasoner")).eval()
    assert_state_dicts_equal(back.state_dict(), hf.state_dict())


def test_cli_errors_write_nothing(tmp_path, capsys):
    hf = tiny_qwen(True)
    save_qwen(hf, tmp_path / "qwen", "4.x")
    with pytest.raises(SystemExit) as e:
        qwen2_5_vl.main(["--help"])
    assert e.value.code == 0 and "--qwen_dir" in capsys.readouterr().out
    assert qwen2_5_vl.main(["--qwen_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # a wrong shape
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "qwen" / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(23, 21)
    save_file(sd, str(tmp_path / "qwen" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\(23, 21\)"):
        qwen2_5_vl.convert_qwen(str(tmp_path / "qwen"), str(tmp_path / "o2"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["qwen"]
