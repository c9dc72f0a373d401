"""Throughput of the full GoT input pipeline on CPU (examples/s), generation and editing.

Synthetic shapes records (GoT text with real boxes), images stored as JPEG at the output size,
so decode + resize + layout rendering + tokenisation (+ the 448x448 reasoner view for editing)
are all timed. Usage::

    python benchmarks/input_pipeline.py --sizes 256 1024 --workers 0 2 --examples 64
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from got_jax.data import pipeline as P  # noqa: E402
from got_jax.data import shapes  # noqa: E402
from got_jax.got import tokenizer as T  # noqa: E402


def _jpeg(arr: np.ndarray, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).resize((size, size), Image.NEAREST).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_source(kind: str, n: int, size: int) -> list[dict]:
    out = []
    for i in range(n):
        if kind == "generation":
            ex = shapes.generation_example(0, i, 250)
            out.append({"id": ex["id"], "caption": ex["caption"], "got": ex["got"], "image": _jpeg(ex["image"], size)})
        else:
            ex = shapes.editing_example(0, i, 250)
            out.append({"id": ex["id"], "instruction": ex["instruction"], "got": ex["got"],
                        "source_image": _jpeg(ex["source_image"], size), "target_image": _jpeg(ex["target_image"], size)})
    return out


def measure(kind: str, size: int, workers: int, n: int, batch: int, tok) -> float:
    cfg = P.PipelineConfig(kind=kind, batch_size=batch, buckets=((size, size),), max_text_len=1024, max_boxes=8,
                           num_epochs=None, worker_count=workers, worker_buffer_size=2)
    ds = P.make_dataset(make_source(kind, n, size), cfg, tok)
    it = iter(ds)
    next(it)  # start-up (worker spawn) is not counted
    steps = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--kinds", nargs="+", default=["generation", "editing"])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    tok = T.load_tokenizer()
    print(f"{'kind':<11} {'size':>5} {'workers':>7} {'examples/s':>11}")
    for kind in a.kinds:
        for size in a.sizes:
            for w in a.workers:
                rate = measure(kind, size, w, a.examples, a.batch, tok)
                print(f"{kind:<11} {size:>5} {w:>7} {rate:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
