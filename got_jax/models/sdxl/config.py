"""Frozen configs for the SDXL UNet and AutoencoderKL, read from diffusers ``config.json`` dicts."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_UNET_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
_UNET_UP = ("UpBlock2D", "CrossAttnUpBlock2D")


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config {name}={value} needs {n} entries (one per block)")
        return tuple(value)
    return (value,) * n


def _read(cfg: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return cfg
    path = os.fspath(cfg)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def _require(d: dict, key: str, allowed, what: str):
    if d.get(key, allowed[0]) not in allowed:
        raise ValueError(f"unsupported {what} option {key}={d.get(key)!r}; supported: {allowed}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """An SDXL-shaped ``UNet2DConditionModel`` (text_time added embedding, linear projections)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: int = 2048
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    addition_embed_type: str | None = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int = 128

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any] | str | os.PathLike) -> "UNetConfig":
        """From a diffusers UNet2DConditionModel config dict (or a folder / config.json path).

        Unsupported options (other block types, class embeddings, time_cond_proj, non-linear projection,
        scale-shift resnets, dual / only cross attention, ...) raise ``ValueError`` naming the option.
        """
        d = _read(cfg)
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, allowed in [("act_fn", ("silu",)), ("time_embedding_type", ("positional",)),
                             ("class_embed_type", (None,)), ("num_class_embeds", (None,)),
                             ("encoder_hid_dim", (None,)), ("encoder_hid_dim_type", (None,)),
                             ("time_cond_proj_dim", (None,)), ("timestep_post_act", (None,)),
                             ("time_embedding_act_fn", (None,)), ("time_embedding_dim", (None,)),
                             ("resnet_time_scale_shift", ("default",)), ("resnet_skip_time_act", (False,)),
                             ("dual_cross_attention", (False,)), ("only_cross_attention", (False,)),
                             ("center_input_sample", (False,)), ("cross_attention_norm", (None,)),
                             ("mid_block_type", ("UNetMidBlock2DCrossAttn",)), ("use_linear_projection", (True,)),
                             ("addition_embed_type", ("text_time", None)), ("upcast_attention", (None, False)),
                             ("class_embeddings_concat", (False,)), ("attention_type", ("default",)),
                             ("reverse_transformer_layers_per_block", (None,)),
                             ("mid_block_only_cross_attention", (None, False))]:
            _require(d, key, allowed, "UNet")
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _UNET_DOWN:
                raise ValueError(f"unsupported UNet down block type {t!r}; supported: {_UNET_DOWN}")
        for t in up:
            if t not in _UNET_UP:
                raise ValueError(f"unsupported UNet up block type {t!r}; supported: {_UNET_UP}")
        if len(down) != n or len(up) != n:
            raise ValueError(f"{len(down)} down / {len(up)} up block types for {n} block_out_channels")
        if not isinstance(d.get("layers_per_block", 2), int):
            raise ValueError(f"unsupported per-block layers_per_block={d['layers_per_block']!r}; use an int")
        cad = d.get("cross_attention_dim", cls.cross_attention_dim)
        if isinstance(cad, (list, tuple)):
            if len(set(cad)) != 1:
                raise ValueError(f"unsupported per-block cross_attention_dim={cad}")
            cad = cad[0]
        # diffusers quirk: attention_head_dim means number of heads when num_attention_heads is unset
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        return cls(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d["block_out_channels"]), down_block_types=down, up_block_types=up,
            layers_per_block=d.get("layers_per_block", 2),
            transformer_layers_per_block=_per_block(d.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            num_attention_heads=_per_block(heads, n, "attention_head_dim"), cross_attention_dim=cad,
            norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
            downsample_padding=d.get("downsample_padding", 1),
            mid_block_scale_factor=d.get("mid_block_scale_factor", 1.0),
            resnet_out_scale_factor=d.get("resnet_out_scale_factor", 1.0),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=d.get("addition_time_embed_dim") or 0,
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim") or 0,
            conv_in_kernel=d.get("conv_in_kernel", 3), conv_out_kernel=d.get("conv_out_kernel", 3),
            sample_size=d.get("sample_size", 128))


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A diffusers ``AutoencoderKL`` (DownEncoderBlock2D / UpDecoderBlock2D, mid attention, quant convs)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any] | str | os.PathLike) -> "VAEConfig":
        """From a diffusers AutoencoderKL config dict (or folder / config.json path)."""
        d = _read(cfg)
        for key, allowed in [("act_fn", ("silu",)), ("norm_type", ("group",))]:
            _require(d, key, allowed, "AutoencoderKL")
        for t in d.get("down_block_types", ()):
            if t != "DownEncoderBlock2D":
                raise ValueError(f"unsupported VAE down block type {t!r}; supported: ('DownEncoderBlock2D',)")
        for t in d.get("up_block_types", ()):
            if t != "UpDecoderBlock2D":
                raise ValueError(f"unsupported VAE up block type {t!r}; supported: ('UpDecoderBlock2D',)")
        ss = d.get("sample_size", 1024)
        ss = ss[0] if isinstance(ss, (list, tuple)) else ss
        return cls(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                   latent_channels=d.get("latent_channels", 4), block_out_channels=tuple(d["block_out_channels"]),
                   layers_per_block=d.get("layers_per_block", 2), norm_num_groups=d.get("norm_num_groups", 32),
                   sample_size=ss, scaling_factor=d.get("scaling_factor", 0.18215),
                   shift_factor=d.get("shift_factor"), use_quant_conv=d.get("use_quant_conv", True),
                   use_post_quant_conv=d.get("use_post_quant_conv", True),
                   mid_block_add_attention=d.get("mid_block_add_attention", True))
