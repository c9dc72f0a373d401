"""What ``train.py`` reports: clu metric writers, the parameter overview and sample-image summaries.

* :func:`make_writer` - TensorBoard events in ``<workdir>/tensorboard`` plus log lines (process 0 only
  writes events; the others only log).
* :func:`parameter_counts` / :func:`log_parameter_overview` - trainable vs frozen counts per GoT part and
  clu's per-tensor table of the trainable parameters.
* :func:`sample_summaries` - prompts through :class:`~got_jax.got.pipeline.GoTPipeline` on the current
  weights; per prompt one image summary ``samples/<i>`` = [generated image | image with the plan's boxes]
  above the prompt and the sampled GoT text rendered as text, plus a text summary of the chain.
"""

from __future__ import annotations

import logging
import os
import textwrap
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from got_jax.checkpoint.mapping import path_str

log = logging.getLogger(__name__)

PARTS = ("reasoner", "projector", "pooled_projector", "unet", "vae")


def make_writer(workdir: str):
    from clu import metric_writers  # noqa: PLC0415

    return metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                just_logging=jax.process_index() > 0, asynchronous=True)


def _count(state) -> int:
    return sum(int(np.prod(getattr(v, "shape", ()))) for v in jax.tree.leaves(state))


def parameter_counts(model: nnx.Module, trainable_filter, frozen_filter) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "frozen": n}}`` plus ``"total"`` (works on abstract models too)."""
    out = {}
    for name, flt in (("trainable", trainable_filter), ("frozen", frozen_filter)):
        pred = nnx.filterlib.to_predicate(flt)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if pred(path, var):
                part = str(path[0])
                out.setdefault(part, {"trainable": 0, "frozen": 0})
                out[part][name] += int(np.prod(var.get_value().shape))
    out["total"] = {k: sum(v[k] for p, v in out.items() if p != "total") for k in ("trainable", "frozen")}
    return out


def log_parameter_overview(model: nnx.Module, trainable_filter, frozen_filter, writer=None) -> dict:
    from clu import parameter_overview  # noqa: PLC0415

    counts = parameter_counts(model, trainable_filter, frozen_filter)
    for part, c in counts.items():
        log.info("parameters %-16s trainable %14s  frozen %14s", part, f"{c['trainable']:,}", f"{c['frozen']:,}")
    shapes = {path_str(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
              for p, v in nnx.to_flat_state(nnx.state(model, trainable_filter))}
    table = parameter_overview.get_parameter_overview(shapes, include_stats=False, max_lines=40)
    log.info("trainable parameters:\n%s", table)
    if writer is not None:
        writer.write_hparams({f"params/{p}/{k}": v for p, c in counts.items() for k, v in c.items()})
    return counts


def _text_panel(width: int, lines: Sequence[str], line_height: int = 11) -> Image.Image:
    wrapped = []
    chars = max(8, width // 6)
    for ln in lines:
        wrapped.extend(textwrap.wrap(ln, chars) or [""])
    img = Image.new("RGB", (width, line_height * len(wrapped) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, ln in enumerate(wrapped):
        draw.text((2, 2 + i * line_height), ln, fill=(0, 0, 0))
    return img


def sample_card(prompt: str, got_text: str, image: Image.Image, overlay: Image.Image, *, scale: int = 1) -> np.ndarray:
    """[image | overlay] above the prompt and GoT text: a uint8 (H, W, 3) array."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        overlay = overlay.resize((overlay.width * scale, overlay.height * scale), Image.NEAREST)
    top_w = image.width + overlay.width
    text = _text_panel(max(top_w, 256), [f"prompt: {prompt}", f"GoT: {got_text}"])
    card = Image.new("RGB", (max(top_w, text.width), image.height + text.height), (255, 255, 255))
    card.paste(image, (0, 0))
    card.paste(overlay, (image.width, 0))
    card.paste(text, (0, image.height))
    return np.asarray(card, np.uint8)


def sample_summaries(model, tokenizer, prompts: Sequence[str], *, step: int, writer, mesh=None, rules=None,
                     sample_kw: dict[str, Any] | None = None, scale: int = 1) -> list[np.ndarray]:
    """Samples ``prompts`` with the current weights and writes one image + one text summary per prompt."""
    from got_jax.got.pipeline import GoTPipeline  # noqa: PLC0415

    pipe = GoTPipeline(model, tokenizer, mesh=mesh, rules=rules)
    out = pipe(list(prompts), seed=list(range(len(prompts))), **(sample_kw or {}))
    cards = []
    for i, prompt in enumerate(prompts):
        cards.append(sample_card(prompt, out.got_texts[i], out.images[i], out.overlay(i), scale=scale))
    if writer is not None and jax.process_index() == 0:
        writer.write_images(step, {f"samples/{i}": c[None] for i, c in enumerate(cards)})
        writer.write_texts(step, {f"samples/{i}/got": f"{p}\n\n{t}" for i, (p, t) in
                                  enumerate(zip(prompts, out.got_texts))})
    return cards
