r"""The VAE stage (``--config.stage=vae``): GoT's AutoencoderKL trained from random init, and ``vae_from``.

GoT keeps its VAE frozen; a GoT trained from scratch (the shapes demo) first needs one. The loss is
Stable Diffusion's autoencoder recipe (LDM ``LPIPSWithDiscriminator``) **without** the LPIPS and GAN terms:

    loss = rec(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)) / (H * W * 3),   z = mean + std * eps

* ``rec``: mean absolute error (``reconstruction="l1"``, SD's choice and the default: flat-colour shapes keep
  sharp edges under L1, where MSE blurs them) or mean squared error (``"mse"``), over all pixels, each pixel
  weighted ``1 + foreground_weight * [x is coloured]`` (coloured: neither white nor black, i.e. the darkest
  channel < 0.9 and the brightest > -0.9; ``foreground_weight`` 0, the default, is SD's plain mean). On the
  shapes world ~90% of the pixels are the white (images) or black (layout canvases) background, which a random
  decoder learns first; the objects' colours come late (at 600 steps green and yellow still decoded as orange).
  Weighting the coloured pixels puts the gradient where the colours are.
* ``KL``: diffusers ``DiagonalGaussianDistribution.kl()`` (``0.5 * sum(mean^2 + var - 1 - logvar)`` over the
  latent's h, w, c per image), averaged over the batch. SD sums the reconstruction over pixels too; dividing
  both terms by the pixel count ``H * W * 3`` keeps SD's ratio (``kl_weight`` 1e-6 in SD) with a per-pixel loss.
* ``eps`` is the only random draw (standard normal of the latent's shape, from the step key), so a test
  can feed PyTorch the same sample.

Batches are the GoT data pipeline's: the target images, plus the source images of editing batches, plus (with
``layout_canvases``) each example's first layout canvas -- the GoT stage encodes the plan's boxes painted on
black with this VAE, and a VAE that only ever saw white-background images does not keep their colours (the
first demo GoT painted every box blue).
``vae_from`` (GoT stage) reads ``<vae workdir>/vae_config.json`` (written by the VAE stage at the end, with
``scaling_factor = 1 / std`` of the posterior means) and the newest checkpoint's VAE weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from got_jax.got.layout import to_model_range

VAE_CONFIG = "vae_config.json"
# keys that may differ between the VAE stage's config and the GoT's (everything else is architecture)
NON_ARCH_KEYS = ("scaling_factor", "sample_size", "_class_name", "_diffusers_version", "force_upcast",
                 "shift_factor", "latents_mean", "latents_std", "_name_or_path")


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    reconstruction: str = "l1"  # l1 | mse
    kl_weight: float = 1e-6
    foreground_weight: float = 0.0  # extra weight of non-white pixels (0: SD's plain mean)

    def __post_init__(self):
        if self.reconstruction not in ("l1", "mse"):
            raise ValueError(f"config.vae.reconstruction must be 'l1' or 'mse', got {self.reconstruction!r}")
        if self.kl_weight < 0:
            raise ValueError(f"config.vae.kl_weight must be >= 0, got {self.kl_weight}")
        if self.foreground_weight < 0:
            raise ValueError(f"config.vae.foreground_weight must be >= 0, got {self.foreground_weight}")


def kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """diffusers ``DiagonalGaussianDistribution.kl()`` against N(0, I): per image (B,), summed over h, w, c."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def vae_loss(vae, images: jax.Array, eps: jax.Array, cfg: VAELossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, {"loss", "rec_loss", "kl"}) of images (B, H, W, 3) in [-1, 1]; ``eps`` (B, h, w, C) N(0, 1)."""
    post = vae.encode(images)
    z = post.mean + post.std * eps
    rec = vae.decode(z).astype(jnp.float32)
    x = images.astype(jnp.float32)
    diff = rec - x
    err = jnp.abs(diff) if cfg.reconstruction == "l1" else jnp.square(diff)
    if cfg.foreground_weight:
        coloured = (jnp.min(x, axis=-1, keepdims=True) < 0.9) & (jnp.max(x, axis=-1, keepdims=True) > -0.9)
        err = err * (1.0 + jnp.float32(cfg.foreground_weight) * coloured)
    r = jnp.mean(err)
    k = jnp.mean(kl(post.mean, post.logvar))
    total = r + jnp.float32(cfg.kl_weight) * k / np.prod(images.shape[1:])
    return total, {"loss": total, "rec_loss": r, "kl": k}


def train_loss(model, inputs, images, draws, schedule, cfg: VAELossConfig):
    """:class:`~got_jax.train.step.TrainStep`'s ``loss_fn`` signature around :func:`vae_loss`."""
    del inputs, schedule
    return vae_loss(model, images["image"], draws["eps"], cfg)


def draws_for(key, prepared, model, schedule, cfg) -> dict[str, jax.Array]:
    """``{"eps": (accum, B, h, w, C)}``: microbatch ``i`` from ``fold_in(key, i)``."""
    accum, b, h, w = prepared["images"]["image"].shape[:4]
    f = model.downscale
    shape = (b, h // f, w // f, model.cfg.latent_channels)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum))
    return {"eps": jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)}


def prepare_images(batch, grad_accum: int = 1, layout_canvases: bool = False) -> dict[str, Any]:
    """A GoT pipeline batch -> ``{"inputs": {}, "images": {"image": (accum, B', H, W, 3)}}``: the target images,
    then (editing batches) the source images, then (``layout_canvases``) each example's first layout canvas in
    [-1, 1] (B' = B, 2B or 3B)."""
    if "target_image" not in batch:
        raise KeyError(f"VAE stage: batch has no 'target_image' (keys {sorted(batch)})")
    x = np.asarray(batch["target_image"], np.float32)
    if "has_source_image" in batch and np.asarray(batch["has_source_image"]).any():
        x = np.concatenate([x, np.asarray(batch["reference_image"], np.float32)])
    if layout_canvases:
        if "layout_canvases" not in batch:
            raise KeyError(f"VAE stage with vae.layout_canvases: batch has no 'layout_canvases' (keys {sorted(batch)})")
        c = np.asarray(batch["layout_canvases"])[:, 0]
        x = np.concatenate([x, to_model_range(c) if c.dtype == np.uint8 else c.astype(np.float32)])
    if x.shape[0] % grad_accum:
        raise ValueError(f"VAE stage: {x.shape[0]} images are not divisible by grad_accum={grad_accum}")
    return {"inputs": {}, "images": {"image": x.reshape((grad_accum, -1) + x.shape[1:])}}


def random_vae(vae_cfg: dict, seed: int, options):
    """AutoencoderKL with host-drawn random weights (:func:`got_jax.got.demo.host_random_init`)."""
    from got_jax.got.demo import host_random_init  # noqa: PLC0415
    from got_jax.models.sdxl import AutoencoderKL, VAEConfig  # noqa: PLC0415

    cfg = VAEConfig.from_diffusers(vae_cfg)
    return host_random_init(lambda: AutoencoderKL(cfg, options=options, rngs=nnx.Rngs(0)), seed)


# --------------------------------------------------------------------------------------------------
# vae_from
# --------------------------------------------------------------------------------------------------


def read_vae_config(vae_from: str) -> dict:
    from got_jax.train.setup import ConfigError  # noqa: PLC0415

    path = os.path.join(vae_from, VAE_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"--config.model.vae_from={vae_from!r}: no {VAE_CONFIG} (not a finished VAE-stage workdir: "
                          "python train.py --config configs/demo_shapes.py --config.stage=vae --workdir ...)")
    with open(path) as f:
        return json.load(f)


def check_vae_config(stored: dict, got_vae: dict, vae_from: str) -> None:
    """ConfigError naming every architecture key where the VAE stage and the GoT's VAE config differ."""
    from got_jax.train.setup import ConfigError  # noqa: PLC0415

    keys = sorted((set(stored) | set(got_vae)) - set(NON_ARCH_KEYS))
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    diff = [f"{k}: VAE stage {stored.get(k)!r} vs GoT {got_vae.get(k)!r}" for k in keys
            if norm(stored.get(k)) != norm(got_vae.get(k))]
    if diff:
        raise ConfigError(f"--config.model.vae_from={vae_from!r}: the VAE stage's config does not match the GoT's VAE "
                          f"config ({'; '.join(diff)}); train the VAE with the same model settings")


def load_vae_into(model, vae_from: str, got_vae: dict) -> None:
    """Copies the newest VAE-stage checkpoint's VAE weights of ``vae_from`` into ``model.vae`` (in place)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    from got_jax.checkpoint.mapping import path_str  # noqa: PLC0415
    from got_jax.train import checkpointing as ckpt  # noqa: PLC0415
    from got_jax.train.setup import ConfigError  # noqa: PLC0415

    check_vae_config(read_vae_config(vae_from), got_vae, vae_from)
    mgr = ckpt.make_manager(vae_from, save_every=1, keep=1, keep_every=0, async_save=False)
    try:
        step = mgr.latest_step()
        if step is None:
            raise ConfigError(f"--config.model.vae_from={vae_from!r}: no checkpoint in {mgr.directory}")
        flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model.vae, nnx.Param))}
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {f"model.{k}": jax.ShapeDtypeStruct(v.get_value().shape, jnp.float32, sharding=dev)
                  for k, v in flat.items()}
        try:
            out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--config.model.vae_from={vae_from!r}: checkpoint step {step} does not hold this VAE "
                              f"({type(e).__name__}: {e})") from None
    finally:
        mgr.close()
    got = out["state"]
    missing = sorted(set(target) - set(got))
    if missing:
        raise ConfigError(f"--config.model.vae_from={vae_from!r}: checkpoint step {step} lacks {missing[:3]}")
    for k, var in flat.items():
        var.set_value(jnp.asarray(got[f"model.{k}"], var.get_value().dtype))
