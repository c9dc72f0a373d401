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


def torch_loss(tm, x, eps, reconstruction, kl_weight, foreground_weight=0.0):
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    post = tm.encode(xt).latent_dist
    z = post.mean + post.std * torch.from_numpy(eps.transpose(0, 3, 1, 2))
    rec = tm.decode(z).sample
    err = (rec - xt).abs() if reconstruction == "l1" else (rec - xt) ** 2
    # the recipe's pixel weight: 1 + w for coloured pixels (darkest channel < 0.9: not white; brightest > -0.9:
    # not black)
    coloured = (xt.amin(dim=1, keepdim=True) < 0.9) & (xt.amax(dim=1, keepdim=True) > -0.9)
    weight = 1.0 + foreground_weight * coloured.float()
    r = (err * weight).mean()
    kl = post.kl().mean()
    return r + kl_weight * kl / (H * W * 3), r, kl


def _white_and_black(x):
    x = x.copy()
    x[:, 4:10] = 1.0
    x[:, 10:] = -1.0
    coloured = (x.min(-1) < 0.9) & (x.max(-1) > -0.9)
    assert 0.2 < coloured.mean() < 0.3  # rows 0..3 (random) only
    return x


@pytest.mark.parametrize("reconstruction,foreground_weight", [("l1", 0.0), ("mse", 0.0), ("l1", 4.0)])
def test_vae_loss_matches_diffusers(pair, reconstruction, foreground_weight):
    tm, model, x, eps = pair
    if foreground_weight:  # coloured rows, then white (the images' background), then black (the canvases')
        x = _white_and_black(x)
    cfg = V.VAELossConfig(reconstruction=reconstruction, kl_weight=KL_WEIGHT, foreground_weight=foreground_weight)
    with torch.no_grad():
        total, r, kl = torch_loss(tm, x, eps, reconstruction, KL_WEIGHT, foreground_weight)
        if foreground_weight:
            assert float(r) > 1.05 * float(torch_loss(tm, x, eps, reconstruction, KL_WEIGHT)[1])  # it weighs
    ours, m = nnx.jit(lambda mdl, x, e: V.vae_loss(mdl, x, e, cfg))(model, x, eps)
    np.testing.assert_allclose(float(m["rec_loss"]), float(r), rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), float(kl), rtol=1e-5)
    np.testing.assert_allclose(float(ours), float(total), rtol=1e-5)
    assert float(KL_WEIGHT * kl / (H * W * 3)) > 0.1 * float(r)  # both terms matter in this test


@pytest.mark.parametrize("foreground_weight", [0.0, 4.0])
def test_vae_loss_gradients_match_torch_autograd(pair, foreground_weight):
    tm, model, x, eps = pair
    if foreground_weight:
        x = _white_and_black(x)
    cfg = V.VAELossConfig(reconstruction="l1", kl_weight=KL_WEIGHT, foreground_weight=foreground_weight)
    tm.zero_grad()
    torch_loss(tm, x, eps, "l1", KL_WEIGHT, foreground_weight)[0].backward()
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


def test_prepare_images_appends_the_first_layout_canvas():
    """vae.layout_canvases: the first canvas of each example (uint8 boxes on black) joins as [-1, 1] images,
    after the targets and the editing sources; without the flag the canvases are not used."""
    rng = np.random.default_rng(0)
    t, r = rng.uniform(-1, 1, (2, 8, 8, 3)), rng.uniform(-1, 1, (2, 8, 8, 3))
    canv = np.zeros((2, 3, 8, 8, 3), np.uint8)
    canv[0, 0, 2:5, 2:5] = (255, 165, 0)
    canv[1, 1] = 255  # not the first canvas: unused
    batch = {"target_image": t, "reference_image": r, "has_source_image": np.ones(2, bool), "layout_canvases": canv}
    got = V.prepare_images(batch, 1, layout_canvases=True)["images"]["image"][0]
    assert got.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(got[:4], np.concatenate([t, r]).astype(np.float32))
    np.testing.assert_allclose(got[4, 3, 3], [1.0, 165 / 255 * 2 - 1, -1.0], rtol=0, atol=1e-6)
    assert (got[4, 0, 0] == -1).all() and (got[5] == -1).all()
    assert V.prepare_images(batch, 1)["images"]["image"].shape == (1, 4, 8, 8, 3)
    with pytest.raises(KeyError, match="layout_canvases"):
        V.prepare_images({"target_image": t}, 1, layout_canvases=True)


def test_vae_config_mismatch_names_the_key(tmp_path):
    from got_jax.train.setup import ConfigError

    stored = {"block_out_channels": [16, 16, 32], "latent_channels": 4, "scaling_factor": 1.3}
    V.check_vae_config(stored, dict(stored, scaling_factor=0.13), str(tmp_path))  # scaling factor may differ
    with pytest.raises(ConfigError, match=r"block_out_channels: VAE stage \[16, 16, 32\] vs GoT \[16, 16\]"):
        V.check_vae_config(stored, dict(stored, block_out_channels=[16, 16]), str(tmp_path))
    with pytest.raises(ConfigError, match="no vae_config.json"):
        V.read_vae_config(str(tmp_path))
