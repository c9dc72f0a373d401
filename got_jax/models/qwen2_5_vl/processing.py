"""Thin preprocessing helpers around transformers' Qwen2.5-VL image processor, processor and chat template.

Nothing here re-implements preprocessing: images go through transformers' ``Qwen2VLImageProcessorPil``
(numpy output), text through the tokenizer and its chat template; the only logic of our own is the
``<|image_pad|>`` expansion that ``Qwen2_5_VLProcessor`` does (one line). The results are numpy arrays ready for the model / ``generate``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def make_image_processor(*, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                         merge_size: int = 2, temporal_patch_size: int = 2):
    """transformers' Qwen2-VL image processor (PIL backend, numpy output) with the given sizes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size)


def preprocess_images(images: Sequence[Any], image_processor=None, **processor_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values (patches, patch_dim) float32, image_grid_thw (images, 3) int64)`` for ``images``.

    ``images`` are PIL images or uint8 (H, W, 3) arrays; ``processor_kwargs`` build an image processor
    with :func:`make_image_processor` when none is given.
    """
    if len(images) == 0:
        raise ValueError("preprocess_images: no images")
    proc = image_processor if image_processor is not None else make_image_processor(**processor_kwargs)
    out = proc(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def encode(tokenizer, texts: Sequence[str], images: Sequence[Any] | None = None, image_processor=None,
           image_token: str = "<|image_pad|>") -> dict[str, np.ndarray]:
    """Tokenises ``texts`` (chat-formatted, one ``image_token`` per image, images in order) left-padded.

    Each ``image_token`` is expanded to ``t*h*w / merge_size**2`` copies, as ``Qwen2_5_VLProcessor``
    does (that class itself needs torchvision for its video processor, so it is not used here).
    Returns numpy ``input_ids``, ``attention_mask`` and, with images, ``pixel_values`` and
    ``image_grid_thw``: exactly the arguments of the model call and of ``generate``.
    """
    texts = list(texts)
    out: dict[str, np.ndarray] = {}
    if images:
        proc = image_processor if image_processor is not None else make_image_processor()
        pv, grid = preprocess_images(images, proc)
        counts = (np.prod(grid, axis=-1) // proc.merge_size ** 2).tolist()
        if sum(t.count(image_token) for t in texts) != len(counts):
            raise ValueError(f"{sum(t.count(image_token) for t in texts)} {image_token} tokens in texts but "
                             f"{len(counts)} images")
        it = iter(counts)
        texts = [_expand(t, image_token, it) for t in texts]
        out.update(pixel_values=pv, image_grid_thw=grid)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, padding=True, return_tensors="np")
    finally:
        tokenizer.padding_side = old_side
    out["input_ids"] = np.asarray(enc["input_ids"], np.int32)
    out["attention_mask"] = np.asarray(enc["attention_mask"], np.int32)
    return out


def _expand(text: str, image_token: str, counts) -> str:
    parts = text.split(image_token)
    return parts[0] + "".join(image_token * next(counts) + p for p in parts[1:])


def chat_text(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt string of ``messages`` through the tokenizer's chat template (not tokenised)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
