r"""Shapes-GenEval: GenEval's six tasks on the synthetic shapes world, for a GoT checkpoint.

    python -m got_jax.eval.shapes --out DIR [--ckpt DIR] [--prompts_per_task 12] [--images_per_prompt 4] \
        [--size 64] [--steps 50] [--no_layout]

Without ``--ckpt`` it evaluates the demo GoT shipped in the package (``got_jax/assets/demo``).

Prompts (:func:`got_jax.data.shapes.eval_prompts`, GenEval's phrasing): position and colour attribution use
the held-out combinations that training never sees; single object, two objects, counting and colours use
scenes of an rng stream training never uses (``--combos train``, a diagnostic: position and colour attribution
from the combinations training may realise instead, so the gap shows what compositional generalisation costs).
Every prompt is sampled ``images_per_prompt`` times with fixed
seeds (``seed + 10000 * task + images_per_prompt * prompt + k``) through :class:`GoTPipeline` (the converted
folder ``--ckpt`` loaded as ``sample.py --ckpt`` does), in batches of a fixed size (the last one padded), so
the compiled programs see one shape.

Scoring (:mod:`got_jax.eval.geneval`): each image goes through the palette detector
(:mod:`got_jax.eval.detect`); each generated GoT plan is read with :func:`got_jax.got.text.parse_got` into
the same detections (class from the box phrase, colour from the box's colour). Both are scored by GenEval's
rules against the prompt's metadata (a plan whose object boxes overlap fails: :func:`score_plan`), so plan
accuracy and image accuracy sit side by side: a wrong plan drawn faithfully fails both; a right plan drawn
wrongly fails the image only. Position follows GenEval
(shapes and relation; colours in a position prompt are not scored). Two more scores ask whether the image draws
its own plan, whatever the prompt, and are not defined for a model that writes no chain (``no_chain``):
``draws`` (:func:`draws_plan`), strict: the image's objects are the plan's, one to one, each with its planned shape
and colour and its centre in its planned box (a plan's shapes drawn swapped between its boxes fail); ``follows``
(:func:`follows_plan`), lenient: the plan's first coloured box is painted in its object's colour, which measures the
spatial guidance even where the shape detector rejects the objects. A fifth, the **VAE ceiling**, needs no sampling:
each prompt's ground-truth scene rendered, passed through the checkpoint's VAE (encode, decode) and scored like
an image (:func:`vae_round_trips`). No UNet can score above it, so it tells what the VAE loses from what the
UNet and the plan lose.

Writes ``DIR/results.json`` (settings, per-task and overall accuracies, every sample with its reasons, every
VAE round trip),
``DIR/images/{task}_{prompt:03d}_{k}.png`` and ``DIR/failures.png`` (a contact sheet of the failed samples:
image with the plan's boxes, prompt, reasons), and prints the table. ``--no_layout`` samples with zeroed
layout latents (the paper's "no spatial guidance" ablation). A folder exported from an ablation run
(``configs/demo_shapes.py``'s ``ablation.*``) records its ``sampling_defaults`` in config.json and is sampled
with them (``zero_layout``: as ``--no_layout``; ``no_chain``: no chain is generated, so its plan accuracy is 0), and
so are the guidance scales an export records there (``configs/demo_shapes.py``'s ``sample.*_guidance_scale``);
``--guidance_scale`` / ``--layout_guidance_scale`` / ``--image_guidance_scale`` override them, and a folder
without them is sampled with the paper's T2I values (g 7.5, c 4.0, i 1.0).

``python -m got_jax.eval.shapes --out DIR --rescore`` scores the samples already in ``DIR`` again (results.json's
GoT texts, the PNGs in ``images/``) with today's scorers, without a model: :func:`rescore`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from got_jax.data import shapes
from got_jax.eval import detect, geneval
from got_jax.got.layout import draw_overlay, render_layout_canvases
from got_jax.got.pipeline import GUIDANCE_SCALES as GUIDANCE
from got_jax.got.text import parse_got
from got_jax.sampling.runner import atomic_write

_SHAPE_WORD = re.compile(r"\b(" + "|".join(shapes.SHAPES) + r")s?\b")
_COLOR_WORD = re.compile(r"\b(" + "|".join(shapes.COLORS) + r")\b")
TILE = 192  # contact-sheet image side (images are upscaled, nearest)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the images are sampled (stored in results.json)."""

    prompts_per_task: int = 12
    images_per_prompt: int = 4
    size: int = 64
    steps: int = 50
    guidance_scale: float = 7.5
    layout_guidance_scale: float = 4.0
    image_guidance_scale: float = 1.0
    scheduler: str = "ddpm"
    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 8
    seed: int = 0
    no_layout: bool = False
    no_chain: bool = False
    tasks: tuple[str, ...] = shapes.TASKS
    combos: str = "held_out"  # "train": position / colour-attribution prompts from seen combinations (diagnostic)


# ------------------------------------------------------------------------------------ scoring


def plan_detections(got_text: str) -> list[geneval.Detection]:
    """The objects a GoT plan states: one per box whose phrase names a shape; colour: :func:`box_color`; box in
    0..1000 units."""
    out = []
    for b in parse_got(got_text):
        phrase = b.phrase or ""
        m = _SHAPE_WORD.search(phrase)
        if m is None:
            continue
        color = box_color(b)
        out.append(geneval.Detection(m.group(1), color, tuple(float(v) for v in b.coords),
                                     float((b.x2 - b.x1) * (b.y2 - b.y1))))
    return out


def box_color(box) -> str | None:
    """The object colour a plan's box states: its colour tag when that is an object colour (the shapes data's
    ``paint="color"``), else a colour word of its phrase, else the colour a kind paint names
    (:data:`got_jax.data.shapes.KIND_PAINTS`), else None."""
    if box.color in shapes.COLORS:
        return box.color
    c = _COLOR_WORD.search(box.phrase or "")
    if c:
        return c.group(1)
    kind = shapes.PAINT_KINDS.get(box.color)
    return kind[0] if kind else None


def score_image(image, metadata) -> tuple[bool, str, list[geneval.Detection]]:
    """(correct, reason, detections) of one image against a prompt's GenEval metadata."""
    dets = detect.detect(image)
    ok, reason = geneval.evaluate(geneval.by_class(dets), metadata)
    return ok, reason, dets


def overlapping_boxes(dets: Sequence[geneval.Detection]) -> tuple[int, int] | None:
    """The first pair (i, j) of detections whose boxes overlap (positive intersection area), else None."""
    for i in range(len(dets)):
        for j in range(i + 1, len(dets)):
            a, b = dets[i].box, dets[j].box
            if min(a[2], b[2]) - max(a[0], b[0]) > 0 and min(a[3], b[3]) - max(a[1], b[1]) > 0:
                return i, j
    return None


def score_plan(got_text: str, metadata) -> tuple[bool, str]:
    """(correct, reason) of a generated GoT plan: object count, colours and box-centre relations, by the same
    rules as the images; and its objects' boxes must not overlap (two objects planned in one place cannot be
    drawn, nor detected, as two: the training scenes keep every object in its own grid cell)."""
    dets = plan_detections(got_text)
    pair = overlapping_boxes(dets)
    if pair is not None:
        i, j = pair
        return False, (f"plan boxes {i + 1} ({dets[i].cls}) and {j + 1} ({dets[j].cls}) overlap: "
                       f"{tuple(int(v) for v in dets[i].box)} and {tuple(int(v) for v in dets[j].box)}")
    return geneval.evaluate(geneval.by_class(dets), metadata)


def follows_plan(image, got_text: str) -> bool:
    """Whether ``image`` paints the plan's first coloured box in its object's colour (:func:`box_color`): inside the
    box (as the layout renderer paints it) at least 20% of the pixels take a palette colour
    (:func:`got_jax.eval.detect.segment`), and the most frequent one is the box's. False when the plan has no box
    with a colour tag and an object colour."""
    boxes = [b for b in parse_got(got_text) if b.color]
    color = box_color(boxes[0]) if boxes else None
    if color is None:
        return False
    a = _rgb(image)
    inside = render_layout_canvases(boxes[:1], *a.shape[:2]).any(-1)[0]
    seg = detect.segment(a)[inside]
    coloured = seg[(seg >= 0) & (seg < len(shapes.COLORS))]
    if coloured.size < 0.2 * max(seg.size, 1):
        return False
    return shapes.COLORS[int(np.bincount(coloured, minlength=len(shapes.COLORS)).argmax())] == color


def _rgb(image) -> np.ndarray:
    """A PIL image or an array as an RGB array."""
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)


def _centre_in(det: geneval.Detection, box) -> bool:
    """Whether a detection's centre lies in ``box`` (both in the same units)."""
    x1, y1, x2, y2 = box
    return x1 <= (det.box[0] + det.box[2]) / 2 <= x2 and y1 <= (det.box[1] + det.box[3]) / 2 <= y2


def match_plan(image, got_text: str) -> tuple[list[geneval.Detection], list[geneval.Detection], list[int | None]]:
    """The plan's objects (:func:`plan_detections`), the image's detections (:func:`got_jax.eval.detect.detect`,
    boxes converted to the plan's 0..1000 units) and, per planned object in order, the index of the detection it is
    paired with (None if none): a detection of the planned shape and colour whose centre lies in the planned box,
    each detection used once."""
    planned = plan_detections(got_text)
    a = _rgb(image)
    h, w = a.shape[:2]
    found = [dataclasses.replace(d, box=(1000 * d.box[0] / w, 1000 * d.box[1] / h, 1000 * d.box[2] / w,
                                         1000 * d.box[3] / h)) for d in detect.detect(a)]
    unused, matches = list(range(len(found))), []
    for p in planned:
        hit = next((i for i in unused if found[i].cls == p.cls and found[i].color == p.color
                    and _centre_in(found[i], p.box)), None)
        matches.append(hit)
        if hit is not None:
            unused.remove(hit)
    return planned, found, matches


def draws_plan(image, got_text: str) -> tuple[bool, str]:
    """Whether ``image`` draws exactly the objects its own plan states (whatever the prompt), and why not: the
    image's detections and the plan's objects pair up one to one (:func:`match_plan`: shape from the box phrase,
    colour from :func:`box_color`, the detection's centre in the planned box). A shape drawn in another object's box
    (the plan's shapes swapped between its boxes), a missing, extra or recoloured object fails. A plan with no
    such object fails. This is the strict form of :func:`follows_plan` (which checks the first box's colour):
    it asks whether the UNet binds each planned shape to its box."""
    planned, found, matches = match_plan(image, got_text)
    if not planned:
        return False, "the plan states no object with a shape"
    unused = [i for i in range(len(found)) if i not in matches]
    for n, (p, hit) in enumerate(zip(planned, matches), 1):
        if hit is None:
            inside = [f"{found[i].color} {found[i].cls}" for i in unused if _centre_in(found[i], p.box)]
            return False, (f"planned object {n} ({p.color} {p.cls}): "
                           + (f"its box holds {', '.join(inside)}" if inside else "nothing drawn in its box"))
    if unused:
        return False, "drawn but not planned: " + ", ".join(f"{found[i].color} {found[i].cls}" for i in unused)
    return True, ""


def vae_round_trips(pipe, settings: Settings, batch_size: int = 8) -> list[dict]:
    """The VAE's ceiling: every evaluation prompt's ground-truth scene (:func:`got_jax.data.shapes.eval_prompts`)
    rendered, encoded and decoded by the checkpoint's VAE (``encode_mode`` then ``decode``, as the GoT stage
    encodes its targets and the pipeline decodes its samples), and scored like a sampled image. A UNet that
    reproduced the ground-truth latents exactly would score this; image accuracy above it is impossible, so it
    separates what the VAE loses from what the UNet and the plan lose. One record per prompt:
    ``{"task", "index", "correct", "reason"}``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from got_jax.got.layout import to_model_range  # noqa: PLC0415

    graphdef, state = nnx.split(pipe.model)  # weights as arguments, not constants baked into the program (as paint)

    @jax.jit
    def round_trip(state, x):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode_mode(x) * model.config.vae.scaling_factor)

    prompts = [p for t in settings.tasks
               for p in shapes.eval_prompts(t, settings.prompts_per_task, settings.size, settings.combos)]
    renders = np.stack([shapes.render(p["objects"], settings.size) for p in prompts])
    out = []
    for start in range(0, len(renders), batch_size):
        chunk = renders[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        dec = np.asarray(round_trip(state, jnp.asarray(to_model_range(padded))))[:len(chunk)]
        out.extend((dec * 255).astype(np.uint8))
    records = []
    for p, img in zip(prompts, out, strict=True):
        ok, reason, _ = score_image(img, p["metadata"])
        records.append({"task": p["task"], "index": p["index"], "correct": bool(ok), "reason": reason})
    return records


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(samples: Sequence[dict], tasks: Sequence[str], round_trips: Sequence[dict] | None = None) -> dict:
    """Per-task image / plan accuracy and plan-following rates (means over images) and their overall (GenEval's
    mean over tasks). ``draws`` / ``follows`` are None where no sample has one (a model without a chain);
    ``vae_ceiling`` (the accuracy of :func:`vae_round_trips`' records, per task) is None without them."""
    per = {}
    for t in tasks:
        rows = [s for s in samples if s["task"] == t]
        if not rows:
            raise ValueError(f"no samples for task {t!r}")
        per[t] = {"prompts": len({s["index"] for s in rows}), "images": len(rows),
                  "image_accuracy": float(np.mean([s["correct"] for s in rows])),
                  "plan_accuracy": float(np.mean([s["plan_correct"] for s in rows])),
                  "draws": _mean_or_none(s.get("draws") for s in rows),
                  "follows": _mean_or_none(s.get("follows") for s in rows),
                  "vae_ceiling": None}
        if round_trips is not None:
            trips = [r["correct"] for r in round_trips if r["task"] == t]
            if not trips:
                raise ValueError(f"no VAE round trips for task {t!r}")
            per[t]["vae_ceiling"] = float(np.mean(trips))
    follows = {t: v["follows"] for t, v in per.items()}
    draws = {t: v["draws"] for t, v in per.items()}
    return {"tasks": per, "overall": {"image": geneval.overall({t: v["image_accuracy"] for t, v in per.items()}),
                                      "plan": geneval.overall({t: v["plan_accuracy"] for t, v in per.items()}),
                                      "draws": None if None in draws.values() else geneval.overall(draws),
                                      "follows": None if None in follows.values() else geneval.overall(follows),
                                      "vae_ceiling": None if round_trips is None else
                                      geneval.overall({t: v["vae_ceiling"] for t, v in per.items()})}}


def format_table(summary: dict) -> str:
    f = lambda v: f"{'-':>9}" if v is None else f"{v:>9.3f}"  # noqa: E731
    lines = [f"{'task':<14} {'prompts':>7} {'images':>6} {'image acc':>9} {'plan acc':>9} {'draws':>9} "
             f"{'follows':>9} {'VAE ceil':>9}"]
    for t, v in summary["tasks"].items():
        lines.append(f"{t:<14} {v['prompts']:>7} {v['images']:>6} {v['image_accuracy']:>9.3f} {v['plan_accuracy']:>9.3f}"
                     f" {f(v.get('draws'))} {f(v.get('follows'))} {f(v.get('vae_ceiling'))}")
    o = summary["overall"]
    lines.append(f"{'overall':<14} {'':>7} {'':>6} {o['image']:>9.3f} {o['plan']:>9.3f} {f(o.get('draws'))} "
                 f"{f(o.get('follows'))} {f(o.get('vae_ceiling'))}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ sampling


def eval_jobs(settings: Settings) -> list[dict]:
    """Every (prompt, image) to sample: task, prompt index, image k, prompt, metadata and the fixed seed."""
    jobs = []
    for t in settings.tasks:
        ti = shapes.TASKS.index(t)
        for p in shapes.eval_prompts(t, settings.prompts_per_task, settings.size, settings.combos):
            for k in range(settings.images_per_prompt):
                seed = settings.seed + 10_000 * ti + settings.images_per_prompt * p["index"] + k
                jobs.append({"task": t, "index": p["index"], "k": k, "prompt": p["prompt"],
                             "metadata": p["metadata"], "seed": seed})
    return jobs


def sample_jobs(pipe, jobs: list[dict], settings: Settings, log=print) -> list[tuple[Image.Image, str]]:
    """(image, GoT text) per job, in fixed-size batches (the last padded with copies of its last job)."""
    out = []
    bs = max(1, settings.batch_size)
    for start in range(0, len(jobs), bs):
        batch = jobs[start:start + bs]
        padded = batch + [batch[-1]] * (bs - len(batch))
        t0 = time.perf_counter()
        res = pipe([j["prompt"] for j in padded], seed=[j["seed"] for j in padded], mode="t2i",
                   height=settings.size, width=settings.size, num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, layout_guidance_scale=settings.layout_guidance_scale,
                   image_guidance_scale=settings.image_guidance_scale, scheduler=settings.scheduler,
                   max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                   zero_layout=settings.no_layout, no_chain=settings.no_chain)
        out.extend(zip(res.images[:len(batch)], res.got_texts[:len(batch)]))
        log(f"sampled {min(start + bs, len(jobs))}/{len(jobs)} images ({time.perf_counter() - t0:.1f} s this batch)")
    return out


def evaluate_samples(jobs: list[dict], sampled: Sequence[tuple[Image.Image, str]], *,
                     no_chain: bool = False) -> list[dict]:
    """Scores each sampled (image, GoT text) of ``jobs``: image and plan side by side, and whether the image
    follows its plan (None with ``no_chain``: there is no plan)."""
    samples = []
    for job, (img, got) in zip(jobs, sampled, strict=True):
        ok, reason, dets = score_image(img, job["metadata"])
        plan_ok, plan_reason = score_plan(got, job["metadata"])
        draws, draws_reason = (None, "") if no_chain else draws_plan(img, got)
        samples.append({**job, "correct": bool(ok), "reason": reason, "plan_correct": bool(plan_ok),
                        "plan_reason": plan_reason, "got_text": got, "draws": draws, "draws_reason": draws_reason,
                        "follows": None if no_chain else bool(follows_plan(img, got)),
                        "detections": [[d.cls, d.color, list(d.box)] for d in dets]})
    return samples


# ------------------------------------------------------------------------------------ outputs


def contact_sheet(samples: Sequence[dict], images: Sequence[Image.Image], *, columns: int = 6,
                  max_tiles: int = 48) -> Image.Image:
    """Failed samples (image or plan wrong) as tiles: the image (upscaled) with the plan's boxes, then the
    prompt, the image verdict, the plan verdict and whether the image draws its plan, with their first reasons."""
    fails = [(s, im) for s, im in zip(samples, images) if not (s["correct"] and s["plan_correct"])][:max_tiles]
    text_h = 118
    if not fails:
        sheet = Image.new("RGB", (TILE * 2, 40), (255, 255, 255))
        ImageDraw.Draw(sheet).text((6, 12), "no failures", fill=(0, 0, 0))
        return sheet
    cols = min(columns, len(fails))
    rows = -(-len(fails) // cols)
    sheet = Image.new("RGB", (cols * (TILE + 4), rows * (TILE + text_h + 4)), (225, 225, 225))
    draw = ImageDraw.Draw(sheet)
    for n, (s, im) in enumerate(fails):
        r, c = divmod(n, cols)
        x, y = c * (TILE + 4), r * (TILE + text_h + 4)
        tile = draw_overlay(im.convert("RGB").resize((TILE, TILE), Image.NEAREST), parse_got(s["got_text"]))
        sheet.paste(tile, (x, y))
        verdict = lambda ok, why: "ok" if ok else "FAIL " + (why.splitlines()[0] if why else "")  # noqa: E731
        text = (textwrap.wrap(f"[{s['task']}] {s['prompt']}", 34)
                + textwrap.wrap("image: " + verdict(s["correct"], s["reason"]), 34)[:2]
                + textwrap.wrap("plan: " + verdict(s["plan_correct"], s["plan_reason"]), 34)[:2]
                + ([] if s.get("draws") is None else textwrap.wrap("draws plan: " + verdict(s["draws"],
                                                                                             s.get("draws_reason")), 34)[:2]))
        for li, line in enumerate(text[:10]):
            draw.text((x + 2, y + TILE + 2 + 11 * li), line, fill=(0, 0, 0))
    return sheet


def run(pipe, out: str | os.PathLike, settings: Settings, *, ckpt: str | None = None, log=print) -> dict:
    """Samples, scores and writes everything under ``out``; returns the results dict (as in results.json)."""
    unknown = [t for t in settings.tasks if t not in shapes.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {shapes.TASKS}")
    if settings.prompts_per_task < 1 or settings.images_per_prompt < 1:
        raise ValueError("prompts_per_task and images_per_prompt must be >= 1")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = eval_jobs(settings)
    t0 = time.perf_counter()
    sampled = sample_jobs(pipe, jobs, settings, log)
    seconds = time.perf_counter() - t0
    samples = evaluate_samples(jobs, sampled, no_chain=settings.no_chain)
    images = [im for im, _ in sampled]
    for s, im in zip(samples, images):
        s["image"] = f"images/{s['task']}_{s['index']:03d}_{s['k']}.png"
        atomic_write(out / s["image"], lambda p, im=im: im.save(p, format="PNG"))
    round_trips = vae_round_trips(pipe, settings)
    summary = summarize(samples, settings.tasks, round_trips)
    results = {"ckpt": ckpt, "settings": {**dataclasses.asdict(settings), "tasks": list(settings.tasks)},
               "sampling_seconds": seconds, **summary, "samples": samples, "vae_round_trips": round_trips}
    _write_results(out, results, images, log)
    log(f"wrote {out}/results.json, {out}/failures.png and {len(samples)} images")
    return results


JOB_KEYS = ("task", "index", "k", "prompt", "metadata", "seed")


def rescore(out: str | os.PathLike, log=print) -> dict:
    """Scores again the samples a run wrote under ``out`` (each sample's GoT text in results.json and its PNG in
    ``images/``) with today's scorers, keeps the stored VAE round trips, and rewrites results.json and
    failures.png: a new or fixed score needs no sampling. PNGs are lossless, so re-scoring with unchanged scorers
    gives back the stored results."""
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json to re-score (python -m got_jax.eval.shapes --out {out} "
                                "writes one)")
    old = json.loads(path.read_text())
    try:
        jobs = [{k: s[k] for k in JOB_KEYS} for s in old["samples"]]
        texts = [s["got_text"] for s in old["samples"]]
        names = [s["image"] for s in old["samples"]]
        tasks, no_chain = old["settings"]["tasks"], bool(old["settings"]["no_chain"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a shapes-GenEval results file (missing {e})") from e
    images = []
    for name in names:
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name}: the image of a stored sample is missing")
        with Image.open(out / name) as im:
            images.append(im.convert("RGB"))
    samples = evaluate_samples(jobs, list(zip(images, texts)), no_chain=no_chain)
    for smp, name in zip(samples, names):
        smp["image"] = name
    results = {**old, **summarize(samples, tasks, old.get("vae_round_trips")), "samples": samples}
    _write_results(out, results, images, log)
    log(f"re-scored {len(samples)} samples; wrote {out}/results.json and {out}/failures.png")
    return results


def _write_results(out: Path, results: dict, images: Sequence[Image.Image], log) -> None:
    atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=1) + "\n"))
    atomic_write(out / "failures.png", lambda p: contact_sheet(results["samples"], images).save(p, format="PNG"))
    log(format_table(results))


def load_pipeline(ckpt: str, dtype: str = "float32"):
    """The converted folder ``ckpt`` as ``sample.py --ckpt`` loads it (one device, no mesh)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415
    from got_jax.got.pipeline import GoTPipeline  # noqa: PLC0415
    from got_jax.models.options import ModelOptions  # noqa: PLC0415

    opts = ModelOptions(dtype=jnp.dtype(dtype), param_dtype=read_config(ckpt).get("param_dtype") or "float32")
    return GoTPipeline.from_pretrained(ckpt, options=opts)


def main(argv=None) -> dict:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="converted GoT folder (sample.py --ckpt); default: the shipped "
                   "demo GoT (got_jax/assets/demo)")
    p.add_argument("--out", required=True, help="output folder (results.json, failures.png, images/)")
    p.add_argument("--prompts_per_task", type=int, default=d.prompts_per_task)
    p.add_argument("--images_per_prompt", type=int, default=d.images_per_prompt)
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--steps", type=int, default=d.steps)
    for name in GUIDANCE:  # default: the folder's sampling_defaults, else the paper's (Settings)
        p.add_argument(f"--{name}", type=float, default=None,
                       help=f"default: the checkpoint's config.json sampling_defaults, else {getattr(d, name)}")
    p.add_argument("--scheduler", default=d.scheduler)
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="images per pipeline call (fixed)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated subset of " + ",".join(shapes.TASKS))
    p.add_argument("--no_layout", action="store_true", help="zero the layout latents at sampling (ablation)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--combos", default=d.combos, choices=tuple(shapes.COMBOS),
                   help="position / colour-attribution prompts from the held-out combinations (the benchmark) or "
                   "from those training may realise ('train': a diagnostic of compositional generalisation)")
    p.add_argument("--rescore", action="store_true", help="score again the samples already in --out (its "
                   "results.json and images/) with today's scorers; no model is loaded, nothing is sampled")
    a = p.parse_args(argv)
    if a.rescore:
        try:
            return rescore(a.out)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--rescore: {e}")
    if a.ckpt is None:
        from got_jax.got.demo import DEMO_DIR  # noqa: PLC0415

        a.ckpt = DEMO_DIR
    tasks = tuple(t.strip() for t in a.tasks.split(",") if t.strip())
    settings = Settings(prompts_per_task=a.prompts_per_task, images_per_prompt=a.images_per_prompt, size=a.size,
                        steps=a.steps, scheduler=a.scheduler,
                        max_new_tokens=a.max_new_tokens, temperature=a.temperature, batch_size=a.batch_size,
                        seed=a.seed, no_layout=a.no_layout, tasks=tasks, combos=a.combos)
    unknown = [t for t in tasks if t not in shapes.TASKS]
    if unknown:  # before the model loads
        p.error(f"--tasks: unknown task(s) {unknown}; expected some of {','.join(shapes.TASKS)}")
    for t in ("position", "color_attr"):
        have = len(shapes.combinations(t, a.combos))
        if t in tasks and a.prompts_per_task > have:
            p.error(f"--prompts_per_task {a.prompts_per_task}: only {have} {t} combinations {shapes.COMBOS[a.combos]}")
    defaults = _check_folder(p, a.ckpt, a.size)
    settings = dataclasses.replace(settings, no_layout=a.no_layout or bool(defaults.get("zero_layout")),
                                   no_chain=bool(defaults.get("no_chain")), **guidance(defaults, vars(a)))
    pipe = load_pipeline(a.ckpt, a.dtype)
    return run(pipe, a.out, settings, ckpt=a.ckpt)


def guidance(defaults: dict, given: dict | None = None) -> dict[str, float]:
    """The three guidance scales: ``given`` (command-line values, None = not given), else the checkpoint's
    ``sampling_defaults`` (``defaults``), else :class:`Settings`' (the paper's T2I values)."""
    given = given or {}
    return {k: float(given[k] if given.get(k) is not None else defaults.get(k, getattr(Settings, k)))
            for k in GUIDANCE}


def _check_folder(parser, ckpt: str, size: int) -> dict:
    """Before the model loads: the folder is a converted one and ``size`` is a multiple of its VAE factor x UNet
    down-sampling. Returns the folder's ``sampling_defaults`` (an ablation export's flags, an export's guidance
    scales)."""
    from got_jax.checkpoint.errors import CheckpointError  # noqa: PLC0415
    from got_jax.checkpoint.orbax_io import read_config  # noqa: PLC0415

    try:
        cfg = read_config(ckpt)
    except CheckpointError as e:
        parser.error(f"--ckpt: {e}")
    try:
        f = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1) * 2 ** (len(cfg["unet"]["block_out_channels"]) - 1)
    except (KeyError, TypeError) as e:
        parser.error(f"--ckpt {ckpt}: config.json has no vae / unet block_out_channels ({e})")
    if size <= 0 or size % f:
        parser.error(f"--size {size}: must be a positive multiple of {f} for {ckpt} (VAE factor x UNet down-sampling)")
    return dict(cfg.get("sampling_defaults") or {})


if __name__ == "__main__":
    from got_jax.cli import fewer_gc_passes

    fewer_gc_passes()  # the command only: main() is also called from Python, whose collector stays as it is
    main()
