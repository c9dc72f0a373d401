"""convert/sdxl.py: diffusers UNet (sharded) + VAE (fp16 variant) -> Orbax -> our models match diffusers;
export -> diffusers from_pretrained -> bit-identical tensors."""

import os

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_helpers import (SCHEDULER, assert_state_dicts_equal, check_close, save_sdxl, tiny_unet, tiny_vae,
                             torch_unet_out, unet_inputs, with_params)
from flax import nnx

from got_jax.convert import export_pytorch, sdxl
from got_jax.checkpoint import CheckpointError
from got_jax.got.checkpoint import load_got_checkpoint
from got_jax.models.sdxl import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig


def test_convert_load_export(tmp_path):
    unet, vae = tiny_unet(), tiny_vae()
    save_sdxl(tmp_path / "sdxl", unet, vae, vae_fp16=True, unet_shard="40KB")
    assert os.path.isfile(tmp_path / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors.index.json")
    vae_fp16 = {k: v.clone() for k, v in vae.half().state_dict().items()}
    vae.float()  # the reference is the fp16 weights in float32
    cfg = sdxl.convert_sdxl(str(tmp_path / "sdxl"), str(tmp_path / "jax"), progress=False)
    assert cfg["scheduler"] == SCHEDULER and cfg["parts"] == ["unet", "vae"]
    tree, cfg = load_got_checkpoint(str(tmp_path / "jax"))
    jax_unet = with_params(lambda: UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]), rngs=nnx.Rngs(0)),
                           tree["unet"])
    x = unet_inputs(4)
    check_close(jax_unet(jnp.asarray(x["sample"]), x["t"], jnp.asarray(x["ctx"]), jnp.asarray(x["text"]),
                         jnp.asarray(x["tid"])), torch_unet_out(unet, x))
    jax_vae = with_params(lambda: AutoencoderKL(VAEConfig.from_diffusers(cfg["vae"]), rngs=nnx.Rngs(0)), tree["vae"])
    img = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = vae(torch.from_numpy(img.transpose(0, 3, 1, 2)), sample_posterior=False).sample.numpy()
    check_close(jax_vae.decode(jax_vae.encode(jnp.asarray(img)).mode()), ref.transpose(0, 2, 3, 1))
    # export -> diffusers from_pretrained -> bit-identical
    export_pytorch.export(str(tmp_path / "jax"), str(tmp_path / "hf"), fmt="hf")
    back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "hf"), subfolder="unet")
    assert_state_dicts_equal(back.state_dict(), unet.state_dict())
    export_pytorch.export(str(tmp_path / "jax"), str(tmp_path / "hf16"), fmt="hf", dtype="float16")
    back = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "hf16"), subfolder="vae", torch_dtype=torch.float16)
    assert_state_dicts_equal(back.state_dict(), vae_fp16)
    assert diffusers.EulerDiscreteScheduler.from_pretrained(str(tmp_path / "hf"), subfolder="scheduler")


def test_errors_write_nothing(tmp_path, capsys):
    save_sdxl(tmp_path / "sdxl", tiny_unet(), tiny_vae())
    with pytest.raises(CheckpointError, match="no unet/ folder"):
        sdxl.convert_sdxl(str(tmp_path / "sdxl" / "unet"), str(tmp_path / "o"), progress=False)
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    del sd["decoder.conv_out.bias"]
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"missing tensor for 'decoder\.conv_out\.bias'"):
        sdxl.convert_sdxl(str(tmp_path / "sdxl"), str(tmp_path / "o"), progress=False)
    assert sdxl.main(["--sdxl_dir", str(tmp_path / "sdxl"), "--out", str(tmp_path / "o"), "--parts", "text"]) == 2
    assert "--parts must name unet and/or vae" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["sdxl"]
