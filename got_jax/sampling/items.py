"""The work list of a sampling run: one :class:`Item` per prompt, from flags or a prompts file.

Prompts file formats (chosen by the file name):

* ``*.jsonl``: one JSON object per line with ``prompt`` and optionally ``image`` (a source image: the row
  is an edit; a relative path is taken from the prompts file's folder), ``got_text`` (a plan to paint
  instead of sampling one), ``seed`` (default ``config.seed + row``) and ``id`` (the output name; default
  the row number ``NNNNN``). Blank lines are skipped and do not count as rows. A line that is not a JSON
  object, or has unknown keys or wrong types, becomes a failed item naming the file and line number; the
  other rows still run.
* anything else: plain text, one prompt per line; output ``NNNNN`` is line ``NNNNN + 1``, so a blank line
  inside the file is an error for the whole file (trailing blank lines are ignored).

Rows of a file that cannot be sampled (empty prompt, missing or unreadable image, a plan whose boxes fall
outside the documented clamping, duplicate ids) are *failed items*: recorded with their error and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

from got_jax.got.layout import painted_boxes
from got_jax.got.text import parse_got_report

ROW_KEYS = ("prompt", "image", "got_text", "seed", "id")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,119}$")
RESERVED = ("records", "run", "grid")  # names of the run's own files


class PromptsFileError(ValueError):
    """A prompts file that cannot be used at all (unreadable, blank line inside a text file)."""


@dataclasses.dataclass
class Item:
    """One prompt to sample. ``error`` set: a bad row, recorded as failed and not sampled."""

    index: int
    id: str
    prompt: str
    seed: int
    image: str | None = None
    got_text: str | None = None
    where: str = ""  # e.g. "prompts.jsonl:3" or "--prompt 1", for messages
    error: str | None = None

    def key(self) -> dict:
        """What makes two runs of this item the same work (compared on resume); ``plan`` is the given got_text."""
        return {"prompt": self.prompt, "image": self.image, "plan": self.got_text, "seed": self.seed}


def _text_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [ln.rstrip("\r\n") for ln in f]
    except OSError as e:
        raise PromptsFileError(f"cannot read {path}: {e}") from None
    while lines and not lines[-1].strip():  # trailing blank lines end the file
        lines.pop()
    blank = [n + 1 for n, ln in enumerate(lines) if not ln.strip()]
    if blank:
        raise PromptsFileError(f"{path}: line(s) {blank[:5]} are blank; outputs are numbered by line, so remove "
                               f"the blank lines (or put a prompt on them)")
    return lines


def _row(obj, path: str, line: int, index: int, base_seed: int, folder: str) -> Item:
    where = f"{path}:{line}"
    item = Item(index, f"{index:05d}", "", base_seed + index, where=where)
    if not isinstance(obj, dict):
        item.error = f"{where}: expected a JSON object with a 'prompt', got {type(obj).__name__}"
        return item
    unknown = sorted(set(obj) - set(ROW_KEYS))
    if unknown:
        item.error = f"{where}: unknown key(s) {unknown}; a row has {list(ROW_KEYS)}"
        return item
    if "id" in obj:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            item.error = f"{where}: 'id' must be a string or integer, got {obj['id']!r}"
            return item
        item.id = str(obj["id"])
    for key in ("prompt", "image", "got_text"):
        v = obj.get(key)
        if v is not None and not isinstance(v, str):
            item.error = f"{where}: {key!r} must be a string, got {type(v).__name__}"
            return item
    item.prompt = obj.get("prompt") or ""
    if obj.get("image") is not None:
        item.image = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(folder, obj["image"])
    item.got_text = obj.get("got_text")
    if "seed" in obj:
        if not isinstance(obj["seed"], int) or isinstance(obj["seed"], bool) or not 0 <= obj["seed"] < 2 ** 32:
            item.error = f"{where}: 'seed' must be an integer in 0..2**32-1, got {obj['seed']!r}"
            return item
        item.seed = obj["seed"]
    return item


def read_prompts_file(path: str, *, first_index: int = 0, base_seed: int = 0) -> list[Item]:
    """The items of a prompts file (module docstring); rows are numbered from ``first_index``."""
    if not path.endswith(".jsonl"):
        return [Item(first_index + n, f"{first_index + n:05d}", p, base_seed + first_index + n, where=f"{path}:{n + 1}")
                for n, p in enumerate(_text_lines(path))]
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsFileError(f"cannot read {path}: {e}") from None
    folder = os.path.dirname(os.path.abspath(path))
    items = []
    for n, ln in enumerate(lines):
        if not ln.strip():
            continue
        index = first_index + len(items)
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            items.append(Item(index, f"{index:05d}", "", base_seed + index, where=f"{path}:{n + 1}",
                              error=f"{path}:{n + 1}: malformed JSON line ({e.msg} at column {e.colno})"))
            continue
        items.append(_row(obj, path, n + 1, index, base_seed, folder))
    if not items:
        raise PromptsFileError(f"{path}: no rows (one JSON object per line, each with a 'prompt')")
    return items


def flag_items(prompts: Sequence[str], images: Sequence[str], got_texts: Sequence[str], base_seed: int) -> list[Item]:
    """Items of the ``--prompt`` / ``--image`` / ``--got_text`` flags (one image / plan per prompt when given)."""
    out = []
    for i, p in enumerate(prompts):
        out.append(Item(i, f"{i:05d}", p, base_seed + i, image=images[i] if images else None,
                        got_text=got_texts[i] if got_texts else None, where=f"--prompt {i + 1}"))
    return out


def check_item(item: Item, max_boxes: int) -> str | None:
    """Why ``item`` cannot be sampled (cheap checks, no image decoding), or None."""
    if item.error:
        return item.error
    w = item.where
    if not _SAFE_ID.match(item.id) or item.id.split(".")[0] in RESERVED:
        return (f"{w}: id {item.id!r} is not usable as a file name (letters, digits, _ . + = -, at most 120, "
                f"not {'/'.join(RESERVED)})")
    if not item.prompt.strip():
        return f"{w}: empty prompt"
    if item.image is not None and not os.path.isfile(item.image):
        return f"{w}: edit row's image {item.image} not found"
    if item.got_text is not None:
        if not item.got_text.strip():
            return f"{w}: empty got_text"
        boxes, problems = parse_got_report(item.got_text)
        dropped = [p for p in problems if " dropped: " in p]
        if dropped:  # clamping into 0..1000 is documented; a box that is empty after it is not usable
            return f"{w}: got_text has unusable boxes: {'; '.join(dropped[:3])}"
        n = len(painted_boxes(boxes))
        if n > max_boxes:
            return f"{w}: got_text has {n} coloured boxes, more than max_boxes={max_boxes}"
    return None


def find_duplicates(items: Sequence[Item]) -> None:
    """Marks every later item whose id repeats an earlier one as failed (outputs are named by id)."""
    seen: dict[str, Item] = {}
    for it in items:
        if it.error:
            continue
        if it.id in seen:
            it.error = f"{it.where}: id {it.id!r} repeats the id of {seen[it.id].where}"
        else:
            seen[it.id] = it


def shard(items: Sequence[Item], process_index: int, process_count: int) -> list[Item]:
    """This process's share: every ``process_count``-th item starting at ``process_index``."""
    return list(items[process_index::process_count])


def load_image(path: str):
    """The RGB image at ``path``; ``ValueError`` naming the file when it cannot be decoded."""
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image file {path} ({type(e).__name__}: {e})") from None
