r"""Binding diagnostic: does a GoT draw each planned shape in its own box, or only the shapes the scene holds?

    python -m got_jax.eval.binding [--ckpt DIR] [--prompts 12] [--images_per_prompt 2] [--out FILE.json]

Without ``--ckpt`` it checks the demo GoT shipped in the package. Prompts: the held-out shapes-GenEval position
prompts (:func:`got_jax.data.shapes.eval_prompts`: two objects of different shapes and colours). For each, the
model's greedy plan is generated once; then images are sampled, through interactive generation (the plan given as
``got_texts``, so both arms tokenise their plan the same way), from

* the plan itself, and
* the same plan with the two objects' shapes traded (:func:`swap_shapes`: "an orange triangle ... a green circle"
  -> "an orange circle ... a green triangle", same boxes and colours; kind paints, which name the shapes, traded
  with them),

with the same seeds and the guidance scales the folder records (else the paper's). Per planned object it asks
whether the image draws it as the plan says (shape and colour, centre in its box: :func:`got_jax.eval.shapes.match_plan`).
A model that binds shapes to boxes draws both arms as planned; one that ignores which shape goes where draws the
same images for both (its swapped-arm images then match the *original* plan). It also reports how far the swap
moves the 64 query hidden states (relative L2 change) beside the move to another prompt's plan, i.e. how much of the
binding reaches the semantic guidance at all. Prints a table; ``--out`` writes the numbers and every verdict as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from got_jax.data import shapes
from got_jax.eval import shapes as ev
from got_jax.got.text import parse_got
from got_jax.sampling.runner import atomic_write


def swap_shapes(got_text: str) -> str | None:
    """``got_text`` with the shapes of its first two planned objects of different shapes and colours traded,
    everywhere the text names them ("{colour} {shape}"), boxes kept, colour tags kept when they are the objects'
    colours and traded with the shapes when they are kind paints (:data:`got_jax.data.shapes.KIND_PAINTS`); None
    if the plan has no such pair or names them otherwise."""
    objs = ev.plan_detections(got_text)
    pair = next(((a, b) for a, b in itertools.combinations(objs, 2) if a.cls != b.cls and a.color != b.color), None)
    if pair is None:
        return None
    a, b = pair
    old_a, old_b = f"{a.color} {a.cls}", f"{b.color} {b.cls}"
    if old_a not in got_text or old_b not in got_text:
        return None
    text = got_text.replace(old_a, "\0a").replace(old_b, "\0b")
    text = text.replace("\0a", f"{a.color} {b.cls}").replace("\0b", f"{b.color} {a.cls}")
    paints = {k: shapes.KIND_PAINTS.get(k) for k in ((a.color, a.cls), (b.color, b.cls), (a.color, b.cls), (b.color, a.cls))}
    tags = {(x.phrase or "", x.color) for x in parse_got(got_text)}
    if any(f"{o.color} {o.cls}" in phrase and tag == paints[o.color, o.cls] != o.color
           for o in (a, b) for phrase, tag in tags):
        # kind paints (shapes data's paint="kind"): the layout names each box's shape too, so it is traded as well
        text = text.replace(f"({paints[a.color, a.cls]})", "\0a").replace(f"({paints[b.color, b.cls]})", "\0b")
        text = text.replace("\0a", f"({paints[a.color, b.cls]})").replace("\0b", f"({paints[b.color, a.cls]})")
    swapped = {(d.color, d.cls) for d in ev.plan_detections(text)}
    return text if {(a.color, b.cls), (b.color, a.cls)} <= swapped else None


def _drawn(image, got_text: str) -> list[bool]:
    """Per planned object: drawn as the plan says."""
    _, _, matches = ev.match_plan(image, got_text)
    return [m is not None for m in matches]


def _hidden(result) -> np.ndarray:
    return np.stack([np.asarray(rounds[-1]["hidden"]) for rounds in result.intermediates])


def _sample(pipe, prompts, seeds, texts, kw, batch_size):
    """Images and query hidden states for ``texts`` (interactive), in fixed-size padded batches."""
    images, hidden = [], []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        p, s, t = prompts[sl], seeds[sl], texts[sl]
        pad = batch_size - len(p)
        res = pipe(p + p[-1:] * pad, seed=s + s[-1:] * pad, got_texts=t + t[-1:] * pad, return_intermediates=True,
                   **kw)
        images += res.images[:len(p)]
        hidden += list(_hidden(res)[:len(p)])
    return images, np.stack(hidden)


def run(pipe, *, prompts: int = 12, images_per_prompt: int = 2, size: int = 64, steps: int = 50,
        scales: dict | None = None, batch_size: int = 8, seed: int = 0, log=print) -> dict:
    """The diagnostic on ``pipe`` (a :class:`got_jax.got.pipeline.GoTPipeline`); returns the numbers and the
    per-image verdicts."""
    scales = ev.guidance({}, scales)
    kw = dict(mode="t2i", height=size, width=size, num_inference_steps=steps, scheduler="ddpm", **scales)
    specs = shapes.eval_prompts("position", prompts, size)
    texts = [p["prompt"] for p in specs]
    planned = pipe(texts, seed=[seed] * len(texts), max_new_tokens=256, temperature=0.0, **kw).got_texts
    rows = [(t, g, swap_shapes(g)) for t, g in zip(texts, planned)]
    usable = [(t, g, sw) for t, g, sw in rows if sw is not None]
    if not usable:
        raise ValueError("no plan with two objects of different shapes and colours to swap")
    jobs = [(t, g, sw, seed + images_per_prompt * i + k) for i, (t, g, sw) in enumerate(usable)
            for k in range(images_per_prompt)]
    p, s = [j[0] for j in jobs], [j[3] for j in jobs]
    img_true, h_true = _sample(pipe, p, s, [j[1] for j in jobs], kw, batch_size)
    img_swap, h_swap = _sample(pipe, p, s, [j[2] for j in jobs], kw, batch_size)
    other = [usable[(i + 1) % len(usable)][1] for i, (t, g, sw) in enumerate(usable) for _ in range(images_per_prompt)]
    _, h_other = _sample(pipe, p, s, other, kw, batch_size)
    records = []
    for (t, g, sw, sd), a, b in zip(jobs, img_true, img_swap):
        records.append({"prompt": t, "seed": sd, "plan": g, "swapped_plan": sw, "true_drawn": _drawn(a, g),
                        "swapped_drawn": _drawn(b, sw), "swapped_drawn_as_original": _drawn(b, g)})
    rel = lambda x, y: float(np.mean([np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(x, y)]))  # noqa: E731
    frac = lambda key: float(np.mean([v for r in records for v in r[key]]))  # noqa: E731
    out = {"prompts": len(usable), "skipped_plans": len(rows) - len(usable), "images": len(records),
           "scales": scales, "true_plan_drawn": frac("true_drawn"), "swapped_plan_drawn": frac("swapped_drawn"),
           "swapped_drawn_as_original": frac("swapped_drawn_as_original"),
           "hidden_shift_swap": rel(h_true, h_swap), "hidden_shift_other_plan": rel(h_true, h_other),
           "records": records}
    log(format_table(out))
    return out


def format_table(out: dict) -> str:
    return "\n".join([
        f"{out['prompts']} position prompts x {out['images'] // max(out['prompts'], 1)} images "
        f"({out['skipped_plans']} plans without a swappable pair), per planned object:",
        f"  true plan drawn as planned            {out['true_plan_drawn']:.3f}",
        f"  swapped plan drawn as planned         {out['swapped_plan_drawn']:.3f}",
        f"  swapped plan drawn as the true plan   {out['swapped_drawn_as_original']:.3f}",
        f"query hidden states moved by the swap   {out['hidden_shift_swap']:.3f} (another prompt's plan: "
        f"{out['hidden_shift_other_plan']:.3f})"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="converted GoT folder; default: the shipped demo GoT")
    p.add_argument("--prompts", type=int, default=12, help="held-out position prompts")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    for name in ev.GUIDANCE:
        p.add_argument(f"--{name}", type=float, default=None, help="default: the folder's, else the paper's")
    p.add_argument("--out", default=None, help="write the numbers and the verdicts here (JSON)")
    a = p.parse_args(argv)
    if a.ckpt is None:
        from got_jax.got.demo import DEMO_DIR  # noqa: PLC0415

        a.ckpt = DEMO_DIR
    have = len(shapes.combinations("position"))
    if not 1 <= a.prompts <= have:
        p.error(f"--prompts {a.prompts}: between 1 and {have} (the held-out position combinations)")
    defaults = ev._check_folder(p, a.ckpt, a.size)
    pipe = ev.load_pipeline(a.ckpt)
    out = run(pipe, prompts=a.prompts, images_per_prompt=a.images_per_prompt, size=a.size, steps=a.steps,
              scales=ev.guidance(defaults, vars(a)), batch_size=a.batch_size, seed=a.seed)
    if a.out:
        atomic_write(Path(a.out), lambda f: Path(f).write_text(json.dumps(out, indent=1) + "\n"))
    return out


if __name__ == "__main__":
    main()
