"""Grain input pipeline for GoT training: deterministic, sharded, checkpointable, skip-and-count.

Order: random-access source -> repeat(num_epochs) -> seeded global shuffle (a new permutation per
epoch) -> per-process shard (``[shard_index::shard_count]``) -> per-example processing (in Grain
worker processes when ``worker_count > 0``) -> skip/count bad examples, group by aspect-ratio
bucket and batch (main process). Every per-example random draw comes from
``np.random.default_rng([seed, global_position])``, so results do not depend on the number of
workers or hosts.

Batch (``B`` = batch_size, ``L`` = max_text_len, ``P`` = reasoner_max_patches, ``K`` = max_boxes,
``H, W`` = the batch's bucket; every batch holds one bucket):

==================  =======  ================  ================================================
key                 dtype    shape             meaning
==================  =======  ================  ================================================
input_ids           int32    (B, L)            chat prompt + GoT answer + ``<|im_gen_start|>`` +
                                               64 query tokens, right-padded with the pad token
attention_mask      int32    (B, L)            1 on real tokens
labels              int32    (B, L)            ``input_ids`` on GoT answer tokens (incl.
                                               ``<|im_gen_start|>``), -100 elsewhere (HF
                                               convention: logits at t-1 predict labels[t])
loss_mask           bool     (B, L)            ``labels != -100``
query_mask          bool     (B, L)            the 64 ``<|im_gen_NNNN|>`` query positions
pixel_values        float32  (B, P, 1176)      reasoner view of the source image (editing:
                                               448x448 bicubic, Qwen2.5-VL processor), zero-
                                               padded to P patches; all zero for T2I
image_grid_thw      int32    (B, 3)            (t, h, w) patch grid; (0, 0, 0) without image
has_source_image    bool     (B,)              editing example
target_image        float32  (B, H, W, 3)      target, resize-to-cover + centre crop, [-1, 1]
reference_image     float32  (B, H, W, 3)      editing source resized to (H, W) (no crop),
                                               [-1, 1]; all -1 (black) for T2I
layout_canvases     uint8    (B, K, H, W, 3)   one canvas per coloured box
                                               (:func:`got_jax.got.layout.render_layout_canvases`),
                                               zero-padded to K; ``to_model_range`` on device
layout_mask         bool     (B, K)            real canvases (one all-black canvas if no box)
time_ids            float32  (B, 6)            SDXL (orig_h, orig_w, crop_top, crop_left, H, W)
drop_text           bool     (B,)              condition-dropout draws (see ``cond_dropout_prob``)
drop_layout         bool     (B,)
drop_reference      bool     (B,)
bucket              int32    (B,)              index into ``PipelineConfig.buckets``
index               int64    (B,)              global stream position of the example
==================  =======  ================  ================================================

Bad examples (missing / corrupt image, unparsable GoT text, too many boxes, over-long text, a
malformed record) are skipped and counted per reason: ``iterator.metrics()`` returns the counts,
and a :class:`DataError` is raised once more than ``max_bad_fraction`` of at least
``min_examples_for_bad_check`` examples were bad. ``iterator.get_state()`` / ``set_state()``
restore to the exact next batch (examples buffered in partially-filled buckets are stored by
position and recomputed on restore).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from got_jax.got import layout as got_layout
from got_jax.got import text as got_text
from got_jax.got import tokenizer as got_tokenizer

log = logging.getLogger(__name__)

PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch (Qwen2.5-VL)
SKIP_REASONS = ("missing_image", "corrupt_image", "bad_got", "too_many_boxes", "too_long", "bad_record")


class DataError(RuntimeError):
    """Too large a fraction of the input examples was bad (message gives counts per reason)."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Static settings of the input pipeline (all shapes the batch has follow from these)."""

    kind: str = "generation"  # "generation" | "editing"
    batch_size: int = 8
    buckets: tuple[tuple[int, int], ...] = ((1024, 1024),)  # (height, width) aspect-ratio buckets
    max_text_len: int = 1024
    max_boxes: int = 8
    num_query_tokens: int = 64
    reasoner_size: int = 448  # editing source view for the reasoner (square, bicubic)
    reasoner_max_patches: int = 1024  # (448 / 14) ** 2
    cond_dropout_prob: float = 0.05  # prob. of a combination other than the full one (uniform)
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    shard_index: int = 0
    shard_count: int = 1
    worker_count: int = 0
    worker_buffer_size: int = 1
    max_bad_fraction: float = 0.05
    min_examples_for_bad_check: int = 100

    def __post_init__(self):
        if self.kind not in ("generation", "editing"):
            raise ValueError(f"kind must be 'generation' or 'editing', got {self.kind!r}")
        if not self.buckets or any(h <= 0 or w <= 0 for h, w in self.buckets):
            raise ValueError(f"buckets must be non-empty (height, width) pairs, got {self.buckets}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
        if self.reasoner_size % 28:
            raise ValueError(f"reasoner_size {self.reasoner_size} must be a multiple of 28 (patch 14 x merge 2)")
        if (self.reasoner_size // 14) ** 2 > self.reasoner_max_patches:
            raise ValueError(f"reasoner_max_patches {self.reasoner_max_patches} < {(self.reasoner_size // 14) ** 2} patches of the view")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _decode(data: Any, what: str) -> Image.Image:
    if data is None or len(data) == 0:
        raise _Skip("missing_image", f"{what} is missing")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # any decoder failure is a bad record, never a crash
        raise _Skip("corrupt_image", f"{what} cannot be decoded ({type(e).__name__}: {e})") from None


def choose_bucket(buckets: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to ``width / height``."""
    r = math.log(width / height)
    return int(np.argmin([abs(math.log(w / h) - r) for h, w in buckets]))


def resize_center_crop(img: Image.Image, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Bicubic resize to cover (height, width), then centre crop. Returns (uint8 HWC, top, left)."""
    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    rh, rw = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (rh, rw) != (h0, w0):
        img = img.resize((rw, rh), Image.BICUBIC)
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.asarray(img, np.uint8)[top : top + height, left : left + width], top, left


def crop_boxes(boxes, h0: int, w0: int, height: int, width: int, top: int, left: int) -> list[got_text.Box]:
    """GoT boxes (0..1000 of the original image) in 0..1000 units of the resized + cropped image.

    Identity when the image was only scaled to exactly (height, width).
    """
    scale = max(height / h0, width / w0)
    rh, rw = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (rh, rw, top, left) == (height, width, 0, 0):
        return list(boxes)
    conv = lambda c, rs, off, s: min(1000, max(0, round((c / 1000 * rs - off) / s * 1000)))  # noqa: E731
    return [dataclasses.replace(b, x1=conv(b.x1, rw, left, width), x2=conv(b.x2, rw, left, width),
                                y1=conv(b.y1, rh, top, height), y2=conv(b.y2, rh, top, height)) for b in boxes]


def _model_range(img: np.ndarray) -> np.ndarray:
    return got_layout.to_model_range(img)


class ExampleProcessor:
    """Turns one raw record (dict from TFDS / records) into one padded example, or a skip marker."""

    def __init__(self, config: PipelineConfig, tokenizer):
        self.cfg = config
        self.tok = tokenizer
        self.ids = got_tokenizer.got_token_ids(tokenizer)
        npix = config.reasoner_size**2
        self.processor = got_tokenizer.make_image_processor(min_pixels=npix, max_pixels=npix)  # the one processor
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.ids.endoftext

    def __call__(self, index: int, record: dict) -> dict:
        gidx = self.cfg.shard_index + index * self.cfg.shard_count
        try:
            ex = self._process(gidx, record)
        except _Skip as s:
            rid = _text(record.get("id", "?")) if isinstance(record, dict) else "?"
            return {"_skip": s.reason, "_detail": f"record {rid} (position {gidx}): {s}", "_index": index}
        ex["_index"] = index
        return ex

    # -- pieces -------------------------------------------------------------------------------

    def _process(self, gidx: int, rec: dict) -> dict:
        cfg = self.cfg
        editing = cfg.kind == "editing"
        try:
            text = _text(rec["instruction" if editing else "caption"])
            got = _text(rec["got"])
            target_bytes = rec["target_image" if editing else "image"]
            source_bytes = rec["source_image"] if editing else None
        except (KeyError, TypeError) as e:
            raise _Skip("bad_record", f"missing field {e}") from None
        if not got.strip():
            raise _Skip("bad_got", "empty GoT text")
        boxes, problems = got_text.parse_got_report(got)
        markers = got.count("<|box_start|>")
        if markers != len(boxes):
            problems = [*problems, f"{markers - len(boxes)} of {markers} box markups unparsable"]
        if problems:
            raise _Skip("bad_got", "; ".join(problems))
        if len(got_layout.painted_boxes(boxes)) > cfg.max_boxes:
            raise _Skip("too_many_boxes", f"{len(got_layout.painted_boxes(boxes))} coloured boxes > max_boxes={cfg.max_boxes}")
        target = _decode(target_bytes, "target image")
        source = _decode(source_bytes, "source image") if editing else None

        w0, h0 = target.size
        b = choose_bucket(cfg.buckets, h0, w0)
        H, W = cfg.buckets[b]
        target_arr, top, left = resize_center_crop(target, H, W)
        try:
            canv = got_layout.render_layout_canvases(crop_boxes(boxes, h0, w0, H, W, top, left), H, W, max_boxes=cfg.max_boxes)
        except (got_text.GotTextError, ValueError) as e:
            raise _Skip("bad_got", f"layout: {e}") from None
        canvases = np.zeros((cfg.max_boxes, H, W, 3), np.uint8)
        canvases[: len(canv)] = canv
        layout_mask = np.arange(cfg.max_boxes) < len(canv)

        # Images stay uint8 (and T2I examples carry no pixel_values) until the main process
        # batches them: 4x less data through the worker queues.
        extra = {}
        grid = np.zeros(3, np.int32)
        if editing:
            pixel_values = np.zeros((cfg.reasoner_max_patches, PATCH_DIM), np.float32)
            pv, grid, _ = got_tokenizer.reasoner_image(source, self.processor, cfg.reasoner_size)
            grid = np.asarray(grid[0], np.int32)
            pixel_values[: len(pv)] = pv
            extra["pixel_values"] = pixel_values
            reference = np.asarray(source.resize((W, H), Image.BICUBIC), np.uint8)
        else:
            reference = np.zeros((H, W, 3), np.uint8)  # black

        tokens = self._tokens(text, got, editing, int(np.prod(grid)) // 4)
        rng = np.random.default_rng([cfg.seed, gidx])
        drop_text, drop_layout, drop_reference = self._dropout(rng, editing)
        return {
            **tokens,
            **extra, "image_grid_thw": grid, "has_source_image": np.bool_(editing),
            "target_image": target_arr, "reference_image": reference,
            "layout_canvases": canvases, "layout_mask": layout_mask,
            "time_ids": np.array([h0, w0, top, left, H, W], np.float32),
            "drop_text": np.bool_(drop_text), "drop_layout": np.bool_(drop_layout), "drop_reference": np.bool_(drop_reference),
            "bucket": np.int32(b), "index": np.int64(gidx),
        }

    def _tokens(self, text: str, got: str, with_image: bool, n_image_tokens: int) -> dict:
        cfg = self.cfg
        p_ids = got_tokenizer.prompt_ids(self.tok, text, n_image_tokens if with_image else 0)
        a_ids = self.tok(got, add_special_tokens=False)["input_ids"] + [self.ids.im_gen_start]
        q_ids = list(self.ids.query[: cfg.num_query_tokens])
        n = len(p_ids) + len(a_ids) + len(q_ids)
        if n > cfg.max_text_len:
            raise _Skip("too_long", f"{n} tokens > max_text_len={cfg.max_text_len}")
        L = cfg.max_text_len
        ids = np.full(L, self.pad_id, np.int32)
        ids[:n] = p_ids + a_ids + q_ids
        pos = np.arange(L)
        loss_mask = (pos >= len(p_ids)) & (pos < len(p_ids) + len(a_ids))
        return {
            "input_ids": ids, "attention_mask": (pos < n).astype(np.int32),
            "labels": np.where(loss_mask, ids, -100).astype(np.int32), "loss_mask": loss_mask,
            "query_mask": (pos >= n - len(q_ids)) & (pos < n),
        }

    def _dropout(self, rng: np.random.Generator, editing: bool) -> tuple[bool, bool, bool]:
        """Full conditioning, or (with cond_dropout_prob) one of the other combinations, uniformly."""
        u, pick = rng.random(), rng.random()
        if u >= self.cfg.cond_dropout_prob:
            return False, False, False
        combos = [(t, l, r) for t in (0, 1) for l in (0, 1) for r in ((0, 1) if editing else (0,)) if (t, l, r) != (0, 0, 0)]
        t, l, r = combos[min(int(pick * len(combos)), len(combos) - 1)]
        return bool(t), bool(l), bool(r)


# --------------------------------------------------------------------------------------------
# Skip / count / bucket-batch (main process)


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, mapped: grain.MapDataset, config: PipelineConfig):
        super().__init__(parent)
        self._mapped = mapped
        self._cfg = config
        self._buffers: dict[int, list[dict]] = {}
        self._counts = {"seen": 0, "ok": 0, **{r: 0 for r in SKIP_REASONS}}

    def metrics(self) -> dict[str, float]:
        """Counts of examples seen, kept and skipped per reason, and the bad fraction."""
        m = dict(self._counts)
        m["bad_fraction"] = (m["seen"] - m["ok"]) / m["seen"] if m["seen"] else 0.0
        return m

    def _account(self, ex: dict) -> bool:
        c = self._counts
        c["seen"] += 1
        if "_skip" not in ex:
            c["ok"] += 1
            return True
        c[ex["_skip"]] += 1
        bad = c["seen"] - c["ok"]
        if bad <= 20 or bad % 1000 == 0:
            log.warning("skipping %s (%d bad of %d so far)", ex["_detail"], bad, c["seen"])
        if c["seen"] >= self._cfg.min_examples_for_bad_check and bad / c["seen"] > self._cfg.max_bad_fraction:
            per = ", ".join(f"{r}={c[r]}" for r in SKIP_REASONS if c[r])
            raise DataError(f"{bad} of {c['seen']} examples are bad ({bad / c['seen']:.1%} > max_bad_fraction="
                            f"{self._cfg.max_bad_fraction:.1%}): {per}; last: {ex['_detail']}")
        return False

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            ex = next(self._parent)  # StopIteration ends the stream (partial buckets are dropped)
            if not self._account(ex):
                continue
            buf = self._buffers.setdefault(int(ex["bucket"]), [])
            buf.append(ex)
            if len(buf) == self._cfg.batch_size:
                del self._buffers[int(ex["bucket"])]
                return self._collate(buf)

    def _collate(self, buf: list[dict]) -> dict[str, np.ndarray]:
        out = {k: np.stack([e[k] for e in buf]) for k in buf[0] if not k.startswith("_")}
        for k in ("target_image", "reference_image"):
            out[k] = _model_range(out[k])
        if "pixel_values" not in out:
            out["pixel_values"] = np.zeros((len(buf), self._cfg.reasoner_max_patches, PATCH_DIM), np.float32)
        return out

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffers": {str(b): [int(e["_index"]) for e in v] for b, v in self._buffers.items()},
            "counts": dict(self._counts),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {k: int(v) for k, v in state["counts"].items()}
        self._buffers = {int(b): [self._mapped[i] for i in idx] for b, idx in state["buffers"].items()}


class _BucketBatch(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, mapped: grain.MapDataset, config: PipelineConfig):
        super().__init__(parent)
        self._mapped = mapped
        self._cfg = config

    def __iter__(self) -> _BucketBatchIterator:
        return _BucketBatchIterator(self._parent.__iter__(), self._mapped, self._cfg)


# --------------------------------------------------------------------------------------------
# Sources and the pipeline


def tfds_source(name: str, config: str, data_dir: str, split: str = "train"):
    """Random-access TFDS source (ArrayRecord) of a built ``got_generation`` / ``got_editing`` dataset."""
    from got_jax.data import tfds_builders

    if name not in tfds_builders.BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(tfds_builders.BUILDERS)}")
    builder = tfds_builders.BUILDERS[name](config=config, data_dir=data_dir)
    return builder.as_data_source(split=split)


def records_source(recs: Sequence) -> list[dict]:
    """Random-access source from in-memory :mod:`got_jax.data.records` records (tests, small sets)."""
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in recs]


def make_dataset(source, config: PipelineConfig, tokenizer) -> grain.IterDataset:
    """The full pipeline over a random-access ``source`` (sequence of record dicts) as an IterDataset.

    ``iter(make_dataset(...))`` yields numpy batches (see the module docstring); the iterator has
    ``get_state`` / ``set_state`` / ``metrics``.
    """
    if len(source) == 0:
        raise ValueError("the data source is empty")
    ds = grain.MapDataset.source(source)
    ds = ds.repeat(config.num_epochs)
    ds = ds.shuffle(seed=config.seed)  # per-epoch permutation (Grain reseeds each epoch)
    ds = ds[config.shard_index :: config.shard_count]
    mapped = ds.map_with_index(ExampleProcessor(config, tokenizer))
    it = mapped.to_iter_dataset(grain.ReadOptions(num_threads=0 if config.worker_count else 4, prefetch_buffer_size=0 if config.worker_count else 16))
    if config.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker code reads absl flags (defaults outside an absl app)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return _BucketBatch(it, mapped, config)
