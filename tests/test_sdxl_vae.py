"""AutoencoderKL parity with diffusers 0.42.1 (encode mean / mode, decode, tiled decode, param count)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from got_jax.checkpoint import CheckpointError
from got_jax.models.sdxl import AutoencoderKL, VAEConfig, load_diffusers_checkpoint

REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")

diffusers = pytest.importorskip("diffusers")

REF = os.path.join(REFERENCE_CONFIGS, "sdxl_vae_config.json")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(24, 40),
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.13025).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("vae")
    m.save_pretrained(path)
    return m, path, load_diffusers_checkpoint(path, "vae")


def _close(got, ref, tol=1e-4):
    err, scale = float(np.abs(np.asarray(got) - ref).max()), float(np.abs(ref).max())
    assert err <= tol * max(1.0, scale), (err, scale)


def test_encode_matches_diffusers(saved):
    tm, _, model = saved
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = tm.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    ours = nnx.jit(lambda m, x: m.encode(x))(model, x)
    _close(ours.mean, post.mean.numpy().transpose(0, 2, 3, 1))
    _close(ours.mode(), post.mode().numpy().transpose(0, 2, 3, 1))
    _close(ours.logvar, post.logvar.numpy().transpose(0, 2, 3, 1))
    s1, s2 = ours.sample(jax.random.key(0)), ours.sample(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert model.cfg.scaling_factor == 0.13025


def test_decode_and_tiled_decode_match_diffusers(saved):
    tm, _, model = saved
    z = np.random.default_rng(1).standard_normal((1, 12, 12, 4)).astype(np.float32)
    zt = torch.from_numpy(z.transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = tm.decode(zt).sample.numpy().transpose(0, 2, 3, 1)
        tm.enable_tiling()
        ref_tiled = tm.decode(zt).sample.numpy().transpose(0, 2, 3, 1)
        tm.disable_tiling()
    _close(nnx.jit(lambda m, z: m.decode(z))(model, z), ref)
    tiled = model.tiled_decode(z)
    assert tiled.shape == ref_tiled.shape
    _close(tiled, ref_tiled)


def test_param_count_matches_diffusers_sdxl_vae():
    d = json.load(open(REF))
    with torch.device("meta"):
        ref = sum(p.numel() for p in diffusers.AutoencoderKL.from_config(d).parameters())
    abstract = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_diffusers(d), rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == ref


def test_bad_vae_checkpoint(saved, tmp_path):
    _, path, _ = saved
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    sd["decoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(40, 39)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.mid_block.attentions.0.to_q.weight"):
        load_diffusers_checkpoint(tmp_path, "vae")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind"):
        load_diffusers_checkpoint(path, "vqvae")
