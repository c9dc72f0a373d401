r"""A picture of what a shapes-trained GoT does: per prompt, the prompt, the plan over the image and the image.

    python -m got_jax.eval.sheet --out docs/demo_shapes.png [--ckpt DIR] [--per_task 2] [--steps 50]

Rows: ``per_task`` held-out shapes-GenEval prompts of each of GenEval's six tasks (text to image, the same
prompts and seeds as ``python -m got_jax.eval.shapes``), then one editing example of each kind (recolour, move,
add, remove) on a scene of an rng stream training never uses (seed :data:`EDIT_SEED`), with the source image
first. Each tile: the image enlarged (nearest), the same image with the plan's boxes, and below them the
prompt and the plan's objects (``phrase (colour) box``). Without ``--ckpt``: the shipped demo GoT. The text-to-image
rows use the shapes-GenEval's guidance scales (the checkpoint's ``sampling_defaults``, else the paper's); the edits
the paper's editing values (g 4.0, c 3.0, i 1.5).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from got_jax.data import shapes
from got_jax.got.layout import draw_overlay
from got_jax.got.text import parse_got
from got_jax.sampling.runner import atomic_write

EDIT_SEED = 7_777  # editing scenes for the picture: not the training data's seed (0) nor its rng streams' use
ZOOM = 3
TEXT_H = 70


def _plan_lines(got_text: str) -> list[str]:
    boxes = parse_got(got_text)
    if not boxes:
        return ["plan: (no boxes)"]
    return [f"{b.phrase or '?'} ({b.color or '-'}) ({b.x1},{b.y1}),({b.x2},{b.y2})" for b in boxes[:4]]


def tile(prompt: str, image: Image.Image, got_text: str, source: Image.Image | None = None) -> Image.Image:
    """[source |] image | image with the plan's boxes, above the prompt and the plan's objects."""
    side = image.width * ZOOM
    big = image.convert("RGB").resize((side, side), Image.NEAREST)
    panels = ([source.convert("RGB").resize((side, side), Image.NEAREST)] if source is not None else [])
    panels += [big, draw_overlay(big, parse_got(got_text))]
    out = Image.new("RGB", (len(panels) * (side + 2), side + TEXT_H), (255, 255, 255))
    for i, p in enumerate(panels):
        out.paste(p, (i * (side + 2), 0))
    draw = ImageDraw.Draw(out)
    width = max(20, out.width // 6)
    lines = textwrap.wrap(("edit: " if source is not None else "") + prompt, width)[:2] + _plan_lines(got_text)
    for k, line in enumerate(lines[:6]):
        draw.text((2, side + 2 + 11 * k), line[: width + 10], fill=(0, 0, 0))
    return out


def grid(tiles: list[Image.Image], columns: int) -> Image.Image:
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (w + 6), rows * (h + 6)), (230, 230, 230))
    for n, t in enumerate(tiles):
        r, c = divmod(n, columns)
        sheet.paste(t, (c * (w + 6), r * (h + 6)))
    return sheet


def make_sheet(pipe, *, per_task: int = 2, size: int = 64, steps: int = 50, seed: int = 0,
               max_new_tokens: int = 256, guidance: dict | None = None) -> Image.Image:
    """The picture (see the module docstring) from a loaded :class:`~got_jax.got.pipeline.GoTPipeline`; the text-to-
    image rows with ``guidance`` (the scales of :func:`got_jax.eval.shapes.guidance`; None: the paper's)."""
    from got_jax.eval import shapes as ev  # noqa: PLC0415

    settings = ev.Settings(prompts_per_task=per_task, images_per_prompt=1, size=size, steps=steps, seed=seed,
                           max_new_tokens=max_new_tokens, batch_size=len(shapes.TASKS) * per_task,
                           **(guidance or {}))
    jobs = ev.eval_jobs(settings)
    t2i = [tile(f"[{j['task']}] {j['prompt']}", im, got) for j, (im, got) in
           zip(jobs, ev.sample_jobs(pipe, jobs, settings, log=lambda *a: None))]
    edits = [shapes.editing_example(EDIT_SEED, i, size) for i in range(len(shapes.EDITS))]
    sources = [Image.fromarray(e["source_image"]) for e in edits]
    res = pipe([e["instruction"] for e in edits], images=sources, seed=[seed + i for i in range(len(edits))],
               height=size, width=size, num_inference_steps=steps, guidance_scale=4.0, layout_guidance_scale=3.0,
               image_guidance_scale=1.5, max_new_tokens=max_new_tokens, temperature=0.0)
    edit_tiles = [tile(e["instruction"], im, got, source=src)
                  for e, im, got, src in zip(edits, res.images, res.got_texts, sources)]
    top = grid(t2i, columns=2 * per_task if per_task > 1 else len(shapes.TASKS))
    bottom = grid(edit_tiles, columns=len(edit_tiles))
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height + 8), (255, 255, 255))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + 8))
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--ckpt", default=None, help="converted GoT folder; default: the shipped demo GoT")
    p.add_argument("--per_task", type=int, default=2, help="held-out prompts per GenEval task")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.per_task < 1:
        p.error(f"--per_task {a.per_task}: must be >= 1")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from got_jax.eval import shapes as ev  # noqa: PLC0415
    from got_jax.got.demo import DEMO_DIR  # noqa: PLC0415

    ckpt = a.ckpt or DEMO_DIR
    defaults = ev._check_folder(p, ckpt, a.size)
    pipe = ev.load_pipeline(ckpt)
    sheet = make_sheet(pipe, per_task=a.per_task, size=a.size, steps=a.steps, seed=a.seed,
                       max_new_tokens=a.max_new_tokens, guidance=ev.guidance(defaults))
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    print(f"wrote {out} ({sheet.width}x{sheet.height})")
    return out


if __name__ == "__main__":
    from got_jax.cli import fewer_gc_passes

    fewer_gc_passes()
    main()
