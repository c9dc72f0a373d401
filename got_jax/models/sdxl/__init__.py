"""SDXL UNet (12-channel GoT input) and AutoencoderKL in Flax NNX, NHWC, numerically matching diffusers."""

from got_jax.models.sdxl.checkpoint import load_diffusers_checkpoint, unet_table, vae_table
from got_jax.models.sdxl.config import UNetConfig, VAEConfig
from got_jax.models.sdxl.layers import ATTENTION_FNS, get_attention, register_attention
from got_jax.models.sdxl.unet import UNet2DConditionModel
from got_jax.models.sdxl.vae import AutoencoderKL, DiagonalGaussian

__all__ = ["UNetConfig", "VAEConfig", "UNet2DConditionModel", "AutoencoderKL", "DiagonalGaussian",
           "load_diffusers_checkpoint", "unet_table", "vae_table", "register_attention", "get_attention",
           "ATTENTION_FNS"]
