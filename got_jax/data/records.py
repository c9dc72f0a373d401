"""GoT training records and readers for the released annotation files (JSON, JSONL, Parquet).

A record keeps its images as *encoded bytes* (PNG / JPEG as stored on disk); decoding happens in
the input pipeline, so a corrupt image is a per-record problem there, never a crash here.

The released annotation files name their columns differently per dataset, so every reader takes a
:class:`FieldMapping` whose fields are *candidate* column names (the first one present in a row is
used). ``MAPPINGS`` ships one per source dataset; pass your own for anything else. Image fields may
hold a path (relative to ``image_root``), raw bytes, or a Hugging Face image struct
``{"bytes": ..., "path": ...}``. OmniEdit-style annotations whose images live in another table are
joined by id with :func:`join_images`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A malformed annotation row or file (the message names the file, row and field)."""


@dataclasses.dataclass(frozen=True)
class GenerationRecord:
    """Text-to-image example: caption, GoT text and the encoded target image."""

    id: str
    caption: str
    got: str
    image: bytes


@dataclasses.dataclass(frozen=True)
class EditingRecord:
    """Editing example: instruction, GoT editing plan, encoded source and target images."""

    id: str
    instruction: str
    got: str
    source_image: bytes
    target_image: bytes


@dataclasses.dataclass(frozen=True)
class FieldMapping:
    """Candidate column names for each record field (first present wins).

    ``text`` is the caption (generation) or the instruction (editing); a list value (e.g.
    OmniEdit's ``edited_prompt_list``) contributes its first element. ``image`` is the target
    image, ``source_image`` the editing source (editing only).
    """

    kind: str  # "generation" | "editing"
    id: tuple[str, ...] = ("id",)
    text: tuple[str, ...] = ("caption", "prompt")
    got: tuple[str, ...] = ("got", "got_text", "cot")
    image: tuple[str, ...] = ("image", "image_path")
    source_image: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("generation", "editing"):
            raise ValueError(f"FieldMapping.kind must be 'generation' or 'editing', got {self.kind!r}")
        if self.kind == "editing" and not self.source_image:
            raise ValueError("an editing FieldMapping needs source_image column names")


_GEN_TEXT = ("caption", "prompt", "text")
_GEN_GOT = ("got", "got_text", "cot", "GoT", "response")
_EDIT_TEXT = ("instruction", "edit_instruction", "prompt", "edited_prompt_list", "text")

# Mappings per source dataset. The column names of the released GoT annotation files are not
# all documented; each field lists the names seen in the released files and their sources, and
# any of them may be overridden by passing a custom FieldMapping.
MAPPINGS: dict[str, FieldMapping] = {
    "shapes": FieldMapping("generation"),
    "shapes_edit": FieldMapping("editing", text=("instruction",), image=("target_image",), source_image=("source_image",)),
    "laion_aesthetics_got": FieldMapping("generation", id=("id", "key", "image_id"), text=_GEN_TEXT, got=_GEN_GOT, image=("image", "image_path", "path", "file_name")),
    "journeydb_got": FieldMapping("generation", id=("id", "img_path", "image_id"), text=_GEN_TEXT, got=_GEN_GOT, image=("img_path", "image", "image_path", "path")),
    "flux_got": FieldMapping("generation", id=("id", "image_id"), text=_GEN_TEXT, got=_GEN_GOT, image=("image", "image_path", "path")),
    "omniedit_got": FieldMapping(
        "editing", id=("omni_edit_id", "id"), text=_EDIT_TEXT, got=_GEN_GOT,
        image=("edited_img", "target_image", "edited_image"), source_image=("src_img", "source_image", "input_image"),
    ),
    "seed_edit_multiturn_got": FieldMapping(
        "editing", id=("id", "image_id"), text=_EDIT_TEXT, got=_GEN_GOT,
        image=("target_image", "edited_image", "output_image"), source_image=("source_image", "input_image", "src_image"),
    ),
}


def read_rows(path: str | os.PathLike) -> Iterator[dict]:
    """Rows (dicts) of a ``.json`` (list or ``{"data": [...]}``), ``.jsonl`` or ``.parquet`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise RecordError(f"annotation file {path} does not exist")
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecordError(f"{path}:{n}: invalid JSON ({e})") from e
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: invalid JSON ({e})") from e
        if isinstance(data, Mapping):
            data = next((data[k] for k in ("data", "annotations", "records") if k in data), None)
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        yield from data
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=256):
            yield from batch.to_pylist()
    else:
        raise RecordError(f"{path}: unsupported annotation format {suffix!r} (use .json, .jsonl or .parquet)")


def _field(row: Mapping, names: Sequence[str], what: str, where: str, required: bool = True) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if isinstance(value, list) and what == "text":
                value = value[0] if value else None
            if value is not None:
                return value
    if required:
        raise RecordError(f"{where}: no {what} column (looked for {list(names)}; row has {sorted(row)})")
    return None


def _image_bytes(value: Any, image_root: Path | None, where: str) -> bytes:
    """Encoded image bytes from a path, bytes or HF image struct. A missing file gives b''."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        p = Path(value)
        if not p.is_absolute() and image_root is not None:
            p = image_root / p
        try:
            return p.read_bytes()
        except OSError:
            return b""  # counted as "missing_image" by the pipeline
    raise RecordError(f"{where}: image field is {type(value).__name__}, expected a path, bytes or {{'bytes', 'path'}}")


def row_to_record(row: Mapping, mapping: FieldMapping, image_root: str | os.PathLike | None = None, where: str = "row"):
    """One annotation row as a :class:`GenerationRecord` or :class:`EditingRecord`."""
    root = Path(image_root) if image_root is not None else None
    rid = str(_field(row, mapping.id, "id", where))
    text = str(_field(row, mapping.text, "text", where))
    got = str(_field(row, mapping.got, "got", where))
    image = _image_bytes(_field(row, mapping.image, "image", where), root, f"{where} (id {rid})")
    if mapping.kind == "generation":
        return GenerationRecord(rid, text, got, image)
    source = _image_bytes(_field(row, mapping.source_image, "source_image", where), root, f"{where} (id {rid})")
    return EditingRecord(rid, text, got, source, image)


def read_records(path: str | os.PathLike, mapping: FieldMapping | str, image_root: str | os.PathLike | None = None,
                 image_rows: Mapping[str, Mapping] | None = None) -> Iterator[GenerationRecord | EditingRecord]:
    """Records of one annotation file. ``image_root`` defaults to the file's folder.

    ``image_rows`` (from :func:`index_rows`) joins each annotation row with the row of another
    table holding its images, by the mapping's id column (OmniEdit-GoT: ``omni_edit_id``).
    """
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise RecordError(f"unknown field mapping {mapping!r}; known: {sorted(MAPPINGS)}")
        mapping = MAPPINGS[mapping]
    root = Path(image_root) if image_root is not None else Path(path).parent
    for n, row in enumerate(read_rows(path)):
        where = f"{path} row {n}"
        if image_rows is not None:
            row = join_images(row, image_rows, mapping, where)
        yield row_to_record(row, mapping, root, where)


def index_rows(paths: Sequence[str | os.PathLike], id_columns: Sequence[str]) -> dict[str, dict]:
    """``{id: row}`` over the rows of other tables (e.g. the OmniEdit image parquet shards)."""
    out: dict[str, dict] = {}
    for path in paths:
        for n, row in enumerate(read_rows(path)):
            out[str(_field(row, id_columns, "id", f"{path} row {n}"))] = row
    return out


def join_images(row: Mapping, image_rows: Mapping[str, Mapping], mapping: FieldMapping, where: str) -> dict:
    """``row`` with the image columns of ``image_rows[row id]`` added (annotation columns win)."""
    rid = str(_field(row, mapping.id, "id", where))
    other = image_rows.get(rid)
    if other is None:
        raise RecordError(f"{where}: id {rid!r} not found in the joined image table")
    return {**other, **{k: v for k, v in row.items() if v is not None}}
