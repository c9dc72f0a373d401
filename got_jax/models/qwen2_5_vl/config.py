"""Frozen configs of the Qwen2.5-VL reasoner, built from a Hugging Face ``config.json``.

Both layouts of the file are accepted: transformers 4.x keeps the text sizes at the top level
(``rope_scaling: {"type": "mrope", "mrope_section": [...]}``, ``rope_theta``), 5.x nests them in
``text_config`` (``rope_parameters``). The vision sizes come from ``vision_config`` in both and are
parsed by :meth:`VisionConfig.from_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from got_jax.models.qwen2_5_vl.vision import VisionConfig


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Sizes of the Qwen2.5-VL language model (decoder with GQA, q/k/v bias, SwiGLU and M-RoPE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"TextConfig: hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"TextConfig: num_attention_heads {self.num_attention_heads} not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"TextConfig: head_dim {self.head_dim} must be even for rotary embeddings")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"TextConfig: mrope_section {self.mrope_section} must sum to head_dim/2 = "
                             f"{self.head_dim // 2}")
        if len(self.mrope_section) != 3:
            raise ValueError(f"TextConfig: mrope_section {self.mrope_section} must have 3 entries (t, h, w)")
        if self.hidden_act != "silu":
            raise ValueError(f"TextConfig: unsupported hidden_act {self.hidden_act!r} (only 'silu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """The whole reasoner: text decoder, optional vision tower and the special token ids."""

    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: tuple[int, ...] = (151645,)
    tokens_per_second: int = 2

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size if self.vision is not None else 2

    def with_vocab_size(self, vocab_size: int) -> "Qwen2_5_VLConfig":
        """The same config with ``vocab_size`` embedding rows (checkpoints with added tokens)."""
        return dataclasses.replace(self, text=dataclasses.replace(self.text, vocab_size=int(vocab_size)))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> "Qwen2_5_VLConfig":
        """From a transformers 4.x (flat) or 5.x (``text_config``) Qwen2.5-VL config dict or file/folder."""
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Qwen2.5-VL config not found: {path}")
            with open(path) as f:
                config = json.load(f)
        top = dict(config)
        text = dict(top.get("text_config") or top)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in text]
        if missing:
            raise ValueError(f"Qwen2.5-VL config lacks text keys {missing}")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or top.get("rope_scaling") or {})
        theta = rope.get("rope_theta", text.get("rope_theta", top.get("rope_theta", 1_000_000.0)))
        if rope.get("rope_type", "default") not in ("default", "mrope") or rope.get("type", "mrope") not in (
                "mrope", "default"):
            raise ValueError(f"Qwen2.5-VL config: unsupported rope scaling {rope}")
        if text.get("use_sliding_window", False):
            raise ValueError("Qwen2.5-VL config: use_sliding_window=True is not supported")
        tie = bool(top.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        tcfg = TextConfig(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]), num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=int(text["num_attention_heads"]),
            num_key_value_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            mrope_section=tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24))),
            hidden_act=str(text.get("hidden_act", "silu")), tie_word_embeddings=tie)
        vdict = top.get("vision_config")
        vision = VisionConfig.from_hf(vdict) if vdict else None
        eos = top.get("eos_token_id", text.get("eos_token_id", 151645))
        eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)

        def tok(name, default):
            return int(top.get(name, text.get(name, default)))

        return cls(text=tcfg, vision=vision, image_token_id=tok("image_token_id", 151655),
                   video_token_id=tok("video_token_id", 151656),
                   vision_start_token_id=tok("vision_start_token_id", 151652),
                   vision_end_token_id=tok("vision_end_token_id", 151653), eos_token_ids=eos,
                   tokens_per_second=int((vdict or {}).get("tokens_per_second", 2)))
