"""One training batch -> the reasoner's teacher-forced inputs (host side, numpy, static shapes).

The Grain pipeline (:mod:`got_jax.data.pipeline`) yields, per example, one token row that holds
the chat prompt, the ground-truth GoT text, ``<|im_gen_start|>`` and the 64 ``<|im_gen_NNNN|>``
query tokens, right-padded to ``max_text_len``; ``loss_mask`` marks the answer (GoT text and
``<|im_gen_start|>``), ``query_mask`` the query tokens. :func:`reasoner_inputs` turns such a batch
into what one reasoner forward needs, so the LM loss and the query-token hidden states come from
the same pass (the query tokens follow the ground-truth text, as at sampling):

==================  =======  ============  =====================================================
field               dtype    shape         meaning
==================  =======  ============  =====================================================
input_ids           int32    (B, L)        the token rows
attention_mask      bool     (B, L)        real tokens
positions           int32    (3, B, L)     M-RoPE (t, h, w) positions (image tokens of edits get
                                           their grid coordinates; padding 0)
mm_token_type_ids   int32    (B, L)        1 at ``<|image_pad|>`` tokens (what transformers 5.x
                                           needs to place images in M-RoPE)
target_ids          int32    (B, L)        ``input_ids[t + 1]``: the token the logits at ``t``
                                           predict (0 past the end)
target_mask         bool     (B, L)        ``loss_mask[t + 1]``: answer tokens only (prompt,
                                           image, query and padding tokens masked)
query_index         int32    (B, Q)        positions of the Q query tokens in each row
pixel_values        float32  (B*P, 1176)   every example's real patches, in batch order, zero-
                                           padded to ``B * P`` rows; None without images
vision_aux          VisionAux              window / rotary tables for those patches (padded to
                                           ``B * P``); None without images
==================  =======  ============  =====================================================

Shapes depend only on the batch's static shapes (B, L, P) and on whether it holds images, so one
compiled step serves every T2I batch and one every editing batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import numpy as np

from got_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from got_jax.models.qwen2_5_vl.model import get_rope_index
from got_jax.models.qwen2_5_vl.vision import prepare_vision_inputs


@flax.struct.dataclass
class ReasonerInputs:
    """Teacher-forced reasoner inputs of a batch (see the module docstring); a jit-able pytree."""

    input_ids: Any
    attention_mask: Any
    positions: Any
    mm_token_type_ids: Any
    target_ids: Any
    target_mask: Any
    query_index: Any
    pixel_values: Any = None
    vision_aux: Any = None


def _get(batch: Mapping[str, Any], key: str, ndim: int) -> np.ndarray:
    if key not in batch:
        raise KeyError(f"training batch has no {key!r} (keys: {sorted(batch)}); see got_jax/data/pipeline.py")
    arr = np.asarray(batch[key])
    if arr.ndim != ndim:
        raise ValueError(f"training batch {key!r} must have {ndim} dims, got shape {arr.shape}")
    return arr


def reasoner_inputs(batch: Mapping[str, Any], cfg: Qwen2_5_VLConfig, num_query_tokens: int = 64) -> ReasonerInputs:
    """The reasoner inputs of a pipeline batch (numpy; see the module docstring).

    Needs ``input_ids``, ``attention_mask``, ``loss_mask`` (or HF ``labels`` with -100), ``query_mask``
    and, for editing, ``pixel_values`` (B, P, patch_dim) + ``image_grid_thw`` (B, 3) ((0, 0, 0) for
    rows without an image). Raises naming the key when a field is missing or inconsistent.
    """
    ids = _get(batch, "input_ids", 2).astype(np.int32)
    b, length = ids.shape
    mask = _get(batch, "attention_mask", 2).astype(bool)
    if "loss_mask" in batch:
        loss_mask = _get(batch, "loss_mask", 2).astype(bool)
    else:
        loss_mask = _get(batch, "labels", 2) != -100
    query = _get(batch, "query_mask", 2).astype(bool)
    for key, arr in (("attention_mask", mask), ("loss_mask", loss_mask), ("query_mask", query)):
        if arr.shape != ids.shape:
            raise ValueError(f"training batch {key!r} has shape {arr.shape}, input_ids {ids.shape}")
    if (loss_mask & ~mask).any() or (query & ~mask).any():
        raise ValueError("training batch: loss_mask / query_mask mark padding tokens (attention_mask 0)")
    counts = query.sum(axis=1)
    if (counts != num_query_tokens).any():
        raise ValueError(f"training batch 'query_mask': every row needs {num_query_tokens} query tokens, rows have "
                         f"{counts.tolist()}")
    query_index = np.stack([np.nonzero(row)[0] for row in query]).astype(np.int32)

    grids = np.zeros((b, 3), np.int32)
    if "image_grid_thw" in batch:
        grids = _get(batch, "image_grid_thw", 2).astype(np.int32)
        if grids.shape != (b, 3):
            raise ValueError(f"training batch 'image_grid_thw' must be ({b}, 3), got {grids.shape}")
    has_image = grids.prod(axis=1) > 0
    image_grids = grids[has_image] if has_image.any() else None
    positions, _ = get_rope_index(ids, cfg, image_grids, mask)

    pixel_values = aux = None
    if has_image.any():
        pv = _get(batch, "pixel_values", 3)
        if pv.shape[0] != b:
            raise ValueError(f"training batch 'pixel_values' has {pv.shape[0]} rows, input_ids {b}")
        per_row = grids.prod(axis=1)
        if (per_row > pv.shape[1]).any():
            raise ValueError(f"training batch 'image_grid_thw' needs {int(per_row.max())} patches, 'pixel_values' "
                             f"holds {pv.shape[1]} per example")
        rows = [pv[i, :per_row[i]] for i in range(b) if has_image[i]]
        real = np.concatenate(rows).astype(np.float32)
        pixel_values = np.zeros((b * pv.shape[1], pv.shape[2]), np.float32)
        pixel_values[: len(real)] = real
        if cfg.vision is None:
            raise ValueError("training batch has images but the reasoner config has no vision tower")
        aux = prepare_vision_inputs(image_grids, cfg.vision, pad_to=b * pv.shape[1])

    target_ids = np.zeros_like(ids)
    target_ids[:, :-1] = ids[:, 1:]
    target_mask = np.zeros_like(loss_mask)
    target_mask[:, :-1] = loss_mask[:, 1:]
    return ReasonerInputs(
        input_ids=ids, attention_mask=mask, positions=positions,
        mm_token_type_ids=(ids == cfg.image_token_id).astype(np.int32), target_ids=target_ids,
        target_mask=target_mask, query_index=query_index, pixel_values=pixel_values, vision_aux=aux)


def drop_chain(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``no_chain`` ablation of a pipeline batch (numpy): the reasoning chain removed.

    Each row ``[prompt][GoT text][<|im_gen_start|>][64 queries][pad]`` becomes
    ``[prompt][<|im_gen_start|>][64 queries][pad]`` (shifted left, padded with the row's own pad id), so the
    query tokens follow the prompt directly, as :class:`~got_jax.got.pipeline.GoTPipeline` builds them with
    ``no_chain=True``. No token is an answer any more (``loss_mask`` / ``labels`` empty: no LM loss), and the
    layout input becomes what sampling without a plan gives: one all-black canvas (``layout_mask`` = first
    canvas only). Image fields, dropout draws and everything else are unchanged.
    """
    ids = _get(batch, "input_ids", 2)
    mask = _get(batch, "attention_mask", 2).astype(bool)
    loss = (_get(batch, "loss_mask", 2).astype(bool) if "loss_mask" in batch
            else _get(batch, "labels", 2) != -100)
    query = _get(batch, "query_mask", 2).astype(bool)
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    b, length = ids.shape
    new_ids = np.zeros_like(ids)
    new_mask = np.zeros_like(np.asarray(batch["attention_mask"]))
    new_query = np.zeros_like(query)
    for i in range(b):
        ans = np.nonzero(loss[i])[0]
        if len(ans) == 0:
            raise ValueError(f"drop_chain: row {i} has no answer tokens (already without a chain?)")
        keep = mask[i].copy()
        keep[ans[:-1]] = False  # the chain goes; its last answer token, <|im_gen_start|>, stays
        row = ids[i][keep]
        pad = ids[i][~mask[i]][0] if (~mask[i]).any() else ids[i][-1]
        new_ids[i] = pad
        new_ids[i, :len(row)] = row
        new_mask[i, :len(row)] = 1
        new_query[i, :len(row)] = query[i][keep]
    out["input_ids"], out["attention_mask"], out["query_mask"] = new_ids, new_mask, new_query
    out["loss_mask"] = np.zeros_like(loss)
    if "labels" in out:
        out["labels"] = np.full_like(ids, -100)
    if "layout_canvases" in out:
        out["layout_canvases"] = np.zeros_like(out["layout_canvases"])
        lm = np.zeros_like(np.asarray(out["layout_mask"]), dtype=bool)
        lm[:, 0] = True
        out["layout_mask"] = lm
    return out
