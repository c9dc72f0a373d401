"""The VAE stage's loss (got_jax/train/vae.py) against diffusers' AutoencoderKL on the same weights and noise.

Reference (written here, float32): ``post = vae.encode(x).latent_dist``; ``z = post.mean + post.std * eps``
with the very same ``eps``; ``rec = vae.decode(z).sample``; reconstruction ``mean |rec - x|`` (l1) or
``mean (rec - x)^2`` (mse); ``kl = post.kl().mean()`` (diffusers ``DiagonalGaussianDistribution.kl``); total
``rec + kl_weight * kl / (H * W * 3)``. Gradients: torch autograd of the total against ``jax.grad`` of ours
for every parameter (mapped through the converter's VAE table). Tolerances: loss terms rtol 1e-5,
gradients 1e-4 x the largest gradient of the tensor (or 1e-8 x the model's largest, for the ~0 gradients of
conv biases that a GroupNorm follows) (float32, highest matmul precision).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from got_jax.checkpoint.mapping import path_str
from got_jax.models import sdxl
from got_jax.models.sdxl import load_diffusers_checkpoint
from got_jax.train import vae as V

diffusers = pytest.importorskip("diffusers")

H = W = 16
KL_WEIGHT = 300.0  # large, so the KL term shapes the gradients the test compares (SD uses 1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    tm = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 layers_per_block=1, norm_num_groups=4, sample_size=H).float().train()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("vae")
    tm.save_pretrained(path)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
    eps = rng.standard_normal((2, H // 2, W // 2, 4)).astype(np.float32)
    return tm, load_diffusers_checkpoint(path, "vae"), x, eps


def torch_loss(tm, x, eps, reconstruction, kl_weight):
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    post = tm.encode(xt).latent_dist
    z = post.mean + post.std * torch.from_numpy(eps.transpose(0, 3, 1, 2))
    rec = tm.decode(z).sample
    r = (rec - xt).abs().mean() if reconstruction == "l1" else ((rec - xt) ** 2).mean()
    kl = post.kl().mean()
    return r + kl_weight * kl / (H * W * 3), r, kl


@pytest.mark.parametrize("reconstruction", ["l1", "mse"])
def test_vae_loss_matches_diffusers(pair, reconstruction):
    tm, model, x, eps = pair
    cfg = V.VAELossConfig(reconstruction=reconstruction, kl_weight=KL_WEIGHT)
    with torch.no_grad():
        total, r, kl = torch_loss(tm, x, eps, reconstruction, KL_WEIGHT)
    ours, m = nnx.jit(lambda mdl, x, e: V.vae_loss(mdl, x, e, cfg))(model, x, eps)
    np.testing.assert_allclose(float(m["rec_loss"]), float(r), rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), float(kl), rtol=1e-5)
    np.testing.assert_allclose(float(ours), float(total), rtol=1e-5)
    assert float(KL_WEIGHT * kl / (H * W * 3)) > 0.1 * float(r)  # both terms matter in this test


def test_vae_loss_gradients_match_torch_autograd(pair):
    tm, model, x, eps = pair
    cfg = V.VAELossConfig(reconstruction="l1", kl_weight=KL_WEIGHT)
    tm.zero_grad()
    torch_loss(tm, x, eps, "l1", KL_WEIGHT)[0].backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return V.vae_loss(nnx.merge(graphdef, p, rest), jnp.asarray(x), jnp.asarray(eps), cfg)[0]

    grads = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(jax.jit(jax.grad(f))(params))}
    top = max(float(np.abs(g).max()) for g in grads.values())
    table = sdxl.vae_table()
    seen = set()
    for name, p in tm.named_parameters():
        hit = table.to_jax(name)
        assert hit is not None, name
        path, hook = hit
        ref = np.asarray(hook.to_jax(p.grad.numpy()))
        got = grads[path]
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        scale = max(float(np.abs(ref).max()), 1e-4 * top)  # conv biases before a GroupNorm: ~0 gradients
        assert float(np.abs(got - ref).max()) <= 1e-4 * scale, (name, float(np.abs(got - ref).max()), scale)
        seen.add(path)
    assert seen == set(grads)
    assert np.abs(grads["encoder.conv_out.kernel"]).max() > 0  # the KL and reconstruction reach the encoder


def test_prepare_images_takes_editing_sources_too():
    rng = np.random.default_rng(0)
    t, r = rng.uniform(-1, 1, (2, 8, 8, 3)), rng.uniform(-1, 1, (2, 8, 8, 3))
    gen = V.prepare_images({"target_image": t, "reference_image": r, "has_source_image": np.zeros(2, bool)}, 1)
    np.testing.assert_array_equal(gen["images"]["image"][0], t.astype(np.float32))
    edit = V.prepare_images({"target_image": t, "reference_image": r, "has_source_image": np.ones(2, bool)}, 2)
    assert edit["images"]["image"].shape == (2, 2, 8, 8, 3)
    np.testing.assert_array_equal(edit["images"]["image"].reshape(4, 8, 8, 3), np.concatenate([t, r]).astype(np.float32))


def test_vae_config_mismatch_names_the_key(tmp_path):
    from got_jax.train.setup import ConfigError

    stored = {"block_out_channels": [16, 16, 32], "latent_channels": 4, "scaling_factor": 1.3}
    V.check_vae_config(stored, dict(stored, scaling_factor=0.13), str(tmp_path))  # scaling factor may differ
    with pytest.raises(ConfigError, match=r"block_out_channels: VAE stage \[16, 16, 32\] vs GoT \[16, 16\]"):
        V.check_vae_config(stored, dict(stored, block_out_channels=[16, 16]), str(tmp_path))
    with pytest.raises(ConfigError, match="no vae_config.json"):
        V.read_vae_config(str(tmp_path))
