"""Qwen2.5-VL (the GoT reasoner) in Flax NNX: config, model, checkpoint loading, decoding, preprocessing."""

from got_jax.models.qwen2_5_vl.checkpoint import detect_layout, load_hf_checkpoint, mapping_table
from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig
from got_jax.models.qwen2_5_vl.generate import (GenerateOutput, Sampler, forward, forward_hidden, generate,
                                                sample_logits)
from got_jax.models.qwen2_5_vl.model import (KVCache, ModelOutput, Qwen2_5_VLForConditionalGeneration, count_params,
                                             get_rope_index, mrope_cos_sin)
from got_jax.models.qwen2_5_vl.processing import chat_text, encode, make_image_processor, preprocess_images
from got_jax.models.qwen2_5_vl.vision import VisionConfig

__all__ = [
    "Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "Qwen2_5_VLForConditionalGeneration", "ModelOutput", "KVCache",
    "get_rope_index", "mrope_cos_sin", "count_params", "load_hf_checkpoint", "mapping_table", "detect_layout",
    "Sampler", "GenerateOutput", "generate", "forward", "forward_hidden", "sample_logits",
    "make_image_processor", "preprocess_images", "encode", "chat_text",
]
