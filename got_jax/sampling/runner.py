"""The resumable, data-parallel sampling loop behind ``sample.py``.

Output folder of a run (``id`` = an item's id, ``NNNNN`` by default):

* ``{id}.png`` (the image; its PNG text chunks hold ``got_text``, ``prompt``, ``seed`` and ``settings``),
  ``{id}_got.txt`` (the chain) and ``{id}_layout.png`` (overlay + one painted canvas per box); with
  ``only_return_got`` just ``{id}_got.txt``. Every file is written under a temporary name
  (``.{name}.tmp-*``) and renamed, so a kill never leaves a half file under a final name.
* ``records.jsonl`` (``records-PPPPP-of-NNNNN.jsonl`` for process ``PPPPP`` of ``NNNNN``: no two processes
  write one file): one JSON object per item, appended (and flushed) after the item's files are in place:
  ``status`` (``ok`` / ``failed``), ``id``, ``index``, ``prompt``, ``image``, ``seed``, ``plan`` (the given
  got_text, if any), ``got_text`` (the chain),
  ``boxes`` (parsed, 0..1000 units), ``outputs``, ``settings``, ``checkpoint``, ``timings``, ``error``.
* ``run.json``: the settings of the run. A rerun with other settings is refused unless ``overwrite``
  (the records would mix settings); with ``overwrite`` every item is sampled again and old records go.

An item counts as complete, and is skipped on a rerun, when an ``ok`` record of any records file has its
id and the same prompt / image / plan / seed, and its output files exist. A kill between the files
and the record (or a half-written last record line, which is ignored) only means the item runs again.

Batches: ``batch_size`` items per pipeline call, rounded up to a multiple of ``data_size`` (the devices on
the mesh's data axes, over which the pipeline splits the batch); a short last batch is padded by repeating
its last item (the copies are discarded), so every call has the same shapes and compiles once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from got_jax.got.layout import layout_grid, painted_boxes, render_layout_canvases
from got_jax.sampling.items import Item, check_item, load_image

RUN_FILE = "run.json"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[^/]*$")


class OutdirError(ValueError):
    """The output folder cannot be used (not writable, or it holds a run with other settings)."""


def records_name(process_index: int = 0, process_count: int = 1) -> str:
    if process_count == 1:
        return "records.jsonl"
    return f"records-{process_index:05d}-of-{process_count:05d}.jsonl"


def output_names(item_id: str, only_got: bool) -> list[str]:
    return [f"{item_id}_got.txt"] if only_got else [f"{item_id}.png", f"{item_id}_got.txt", f"{item_id}_layout.png"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to ``.{name}.tmp-*`` beside ``path``, then rename it to ``path`` (usual file mode)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_outdir(outdir: str | os.PathLike) -> Path:
    """Creates ``outdir`` and proves it writable (before any model work); :class:`OutdirError` otherwise."""
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe.tmp-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutdirError(f"--outdir {outdir}: cannot write there ({e.strerror or e})") from None
    return out


def prepare_outdir(out: Path, settings: dict, *, overwrite: bool, writer: bool = True) -> None:
    """Checks ``run.json`` against ``settings``; the ``writer`` process (process 0) writes it and, with
    ``overwrite``, removes the old records first."""
    path = out / RUN_FILE
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text()).get("settings", {})
        except (OSError, ValueError):
            old = None
        if old != settings:
            diff = ("unreadable run.json" if old is None else ", ".join(
                f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)))
            raise OutdirError(f"--outdir {out} holds a run with other settings ({diff}); the records would mix "
                              f"settings: choose another --outdir, or pass --overwrite to sample everything again")
    if not writer:
        return
    if overwrite:
        for p in out.glob("records*.jsonl"):
            p.unlink()
    if overwrite or not path.is_file():
        atomic_write(path, lambda p: Path(p).write_text(json.dumps({"settings": settings}, indent=1) + "\n"))


def read_records(out: Path) -> list[dict]:
    """Every parseable record of every records file in ``out`` (a half-written line is skipped)."""
    recs = []
    for path in sorted(out.glob("records*.jsonl")):
        with open(path) as f:
            for ln in f:
                try:
                    r = json.loads(ln)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    recs.append(r)
    return recs


def completed_ids(out: Path, items: Sequence[Item], only_got: bool) -> set[str]:
    """Ids of ``items`` whose outputs are complete (module docstring)."""
    ok = {}
    for r in read_records(out):
        if r.get("status") == "ok" and isinstance(r.get("id"), str):
            ok[r["id"]] = r
    done = set()
    for it in items:
        r = ok.get(it.id)
        if r is None or any(r.get(k) != v for k, v in it.key().items()):
            continue
        if all((out / n).is_file() for n in output_names(it.id, only_got)):
            done.add(it.id)
    return done


def remove_stale_temps(out: Path, items: Sequence[Item]) -> int:
    """Deletes temporary files a killed run left for ``items`` (never another process's items)."""
    names = {n for it in items for n in output_names(it.id, False)}
    gone = 0
    for p in out.iterdir():
        m = _TMP.match(p.name)
        if m and m.group("name") in names:
            p.unlink(missing_ok=True)
            gone += 1
    return gone


@dataclasses.dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    images: int = 0
    reasoning_tokens: int = 0
    seconds: float = 0.0
    finals: list = dataclasses.field(default_factory=list)  # (id, image) of this run, for a grid

    def line(self) -> str:
        return f"summary: {self.done} done, {self.skipped} skipped (already complete), {self.failed} failed"

    def throughput(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"throughput: {self.images / s:.3f} images/s, {self.reasoning_tokens / s:.1f} reasoning tokens/s "
                f"({self.images} image(s), {self.reasoning_tokens} reasoning token(s) in {self.seconds:.1f} s, "
                f"compilation included)")


def _png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))  # iTXt when not latin-1
    return info


class Runner:
    """Samples ``items`` with ``pipe`` (a :class:`~got_jax.got.pipeline.GoTPipeline`) into ``out``.

    ``call_kwargs``: the pipeline's sampling arguments (sizes, steps, scales, scheduler, ...);
    ``settings``: what the records and ``run.json`` store (the call arguments plus dtype, checkpoint...).
    """

    def __init__(self, pipe, out: Path, *, call_kwargs: dict, settings: dict, checkpoint: str, batch_size: int,
                 data_size: int = 1, max_boxes: int = 32, process_index: int = 0, process_count: int = 1,
                 log: Callable[[str], None] = print, progress: bool = False, keep_finals: int = 64):
        self.pipe, self.out = pipe, Path(out)
        self.kw, self.settings, self.checkpoint = dict(call_kwargs), dict(settings), checkpoint
        self.only_got = bool(call_kwargs.get("only_return_got", False))
        self.batch = max(1, math.ceil(max(1, int(batch_size)) / data_size)) * data_size
        self.max_boxes, self.log, self.progress, self.keep_finals = max_boxes, log, progress, keep_finals
        self.process_index = process_index
        self.records = self.out / records_name(process_index, process_count)

    # ------------------------------------------------------------------------------ records

    def _append(self, rec: dict) -> None:
        rec = {**rec, "settings": self.settings, "checkpoint": self.checkpoint, "process": self.process_index}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with open(self.records, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a killed run's half line stays a line of its own (and is ignored)
                    f.write(b"\n")
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def _fail(self, it: Item, error: str, summary: Summary) -> None:
        summary.failed += 1
        self._append({"status": "failed", "id": it.id, "index": it.index, **it.key(), "where": it.where,
                      "error": error})
        self.log(f"[{it.id}] failed: {error}")

    # ------------------------------------------------------------------------------ the loop

    def run(self, items: Sequence[Item], *, overwrite: bool = False) -> Summary:
        summary = Summary()
        remove_stale_temps(self.out, items)
        done = set() if overwrite else completed_ids(self.out, items, self.only_got)
        todo: list[tuple[Item, object]] = []
        for it in items:
            if it.id in done and not it.error:
                summary.skipped += 1
                continue
            err = check_item(it, self.max_boxes)
            if err:
                self._fail(it, err, summary)
            else:
                todo.append((it, None))
        t0 = time.perf_counter()
        bar = None
        if self.progress and todo:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=len(todo), desc="sampling", unit="item")
            self.log = bar.write
        try:
            for start in range(0, len(todo), self.batch):
                chunk = []
                for it, _ in todo[start:start + self.batch]:
                    try:
                        chunk.append((it, load_image(it.image) if it.image else None))
                    except ValueError as e:
                        self._fail(it, f"{it.where}: {e}", summary)
                if chunk:
                    self._batch(chunk, summary)
                if bar is not None:
                    bar.update(len(todo[start:start + self.batch]))
        finally:
            if bar is not None:
                bar.close()
        summary.seconds = time.perf_counter() - t0
        return summary

    def _call(self, chunk: list[tuple[Item, object]]):
        pad = chunk + [chunk[-1]] * (self.batch - len(chunk))
        edit = any(im is not None for _, im in pad)
        plans = any(it.got_text is not None for it, _ in pad)
        return self.pipe([it.prompt for it, _ in pad], images=[im for _, im in pad] if edit else None,
                         got_texts=[it.got_text for it, _ in pad] if plans else None,
                         seed=[it.seed for it, _ in pad], progress=self.progress, **self.kw)

    def _batch(self, chunk: list[tuple[Item, object]], summary: Summary) -> None:
        t = time.perf_counter()
        try:
            res = self._call(chunk)
        except Exception as e:  # noqa: BLE001 - one bad item must not end the run
            if len(chunk) == 1:
                self._fail(chunk[0][0], f"{chunk[0][0].where}: {type(e).__name__}: {e}", summary)
                return
            for one in chunk:  # find the culprit: each item alone (same padded shapes, no new compile)
                self._batch([one], summary)
            return
        seconds = time.perf_counter() - t
        for j, (it, _) in enumerate(chunk):
            self._write(it, res, j, {"batch_seconds": round(seconds, 4), "batch_items": len(chunk),
                                     "seconds_per_item": round(seconds / len(chunk), 4)}, summary)

    def _write(self, it: Item, res, j: int, timings: dict, summary: Summary) -> None:
        text = res.got_texts[j]
        atomic_write(self.out / f"{it.id}_got.txt", lambda p: Path(p).write_text(text + "\n"))
        img = res.images[j]
        if img is not None:
            meta = {"got_text": text, "prompt": it.prompt, "seed": str(it.seed),
                    "settings": json.dumps(self.settings, sort_keys=True)}
            atomic_write(self.out / f"{it.id}.png", lambda p: img.save(p, format="PNG", pnginfo=_png_info(meta)))
            canv = render_layout_canvases(painted_boxes(res.plans[j]), img.size[1], img.size[0],
                                          max_boxes=self.max_boxes)
            grid = layout_grid(canv, res.overlay(j))
            atomic_write(self.out / f"{it.id}_layout.png", lambda p: grid.save(p, format="PNG"))
            summary.images += 1
            if len(summary.finals) < self.keep_finals:
                summary.finals.append((it.id, img))
        tokens = 0
        if it.got_text is None:  # the reasoner wrote this chain
            tokens = len(self.pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
            summary.reasoning_tokens += tokens
        boxes = [dataclasses.asdict(b) for b in res.plans[j]]
        self._append({"status": "ok", "id": it.id, "index": it.index, **it.key(), "got_text": text,
                      "boxes": boxes, "forced_image_start": bool(res.forced_image_start[j]),
                      "reasoning_tokens": tokens, "outputs": output_names(it.id, img is None),
                      "timings": timings})
        summary.done += 1
        flag = " (chain ended before <|im_gen_start|>; appended)" if res.forced_image_start[j] else ""
        self.log(f"[{it.id}] {it.prompt!r}: {len(boxes)} box(es){flag}")


def grid_image(images: Sequence):
    """The images on a near-square grid (grey background)."""
    from PIL import Image  # noqa: PLC0415

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid
