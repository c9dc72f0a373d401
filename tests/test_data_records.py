"""Annotation readers: JSON / JSONL / Parquet, field mappings, OmniEdit-style join by id."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from got_jax.data import records

GOT = "A cat.\n<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|> (red)"


def _rows(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"png-%d" % i)
    return [{"key": f"k{i}", "prompt": f"cap {i}", "got_text": GOT, "image_path": f"img/{i}.png"} for i in range(3)]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "json_data"])
def test_generation_formats(tmp_path, fmt):
    rows = _rows(tmp_path)
    path = tmp_path / f"ann.{fmt.split('_')[0]}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "json_data":
        path.write_text(json.dumps({"data": rows}))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    got = list(records.read_records(path, "laion_aesthetics_got"))
    assert got == [records.GenerationRecord(f"k{i}", f"cap {i}", GOT, b"png-%d" % i) for i in range(3)]


def test_custom_mapping_and_missing_image(tmp_path):
    rows = _rows(tmp_path)
    rows[1]["image_path"] = "img/absent.png"
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    m = records.FieldMapping("generation", id=("key",), text=("prompt",), got=("got_text",), image=("image_path",))
    recs = list(records.read_records(path, m))
    assert recs[1].image == b""  # counted as missing_image by the pipeline, not an error here
    assert recs[2].caption == "cap 2"


def test_errors_name_file_row_and_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"id": "x", "caption": "c", "image": "i.png"}) + "\n")
    with pytest.raises(records.RecordError, match=r"a.jsonl row 0: no got column"):
        list(records.read_records(path, "shapes"))
    with pytest.raises(records.RecordError, match="unknown field mapping"):
        list(records.read_records(path, "nope"))
    bad = tmp_path / "a.csv"
    bad.write_text("x")
    with pytest.raises(records.RecordError, match="unsupported annotation format"):
        list(records.read_records(bad, "shapes"))
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(records.RecordError, match=r"b.jsonl:1: invalid JSON"):
        list(records.read_records(tmp_path / "b.jsonl", "shapes"))


def test_omniedit_join_by_id(tmp_path):
    images = [{"omni_edit_id": f"o{i}", "src_img": {"bytes": b"src%d" % i, "path": None},
               "edited_img": {"bytes": b"tgt%d" % i, "path": None}, "edited_prompt_list": [f"orig {i}", "alt"]} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(images), tmp_path / "images.parquet")
    ann = [{"omni_edit_id": f"o{i}", "got": GOT} for i in (2, 0)]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    table = records.index_rows([tmp_path / "images.parquet"], ("omni_edit_id",))
    recs = list(records.read_records(tmp_path / "ann.json", "omniedit_got", image_rows=table))
    assert recs == [records.EditingRecord("o2", "orig 2", GOT, b"src2", b"tgt2"),
                    records.EditingRecord("o0", "orig 0", GOT, b"src0", b"tgt0")]
    (tmp_path / "ann2.json").write_text(json.dumps([{"omni_edit_id": "zz", "got": GOT}]))
    with pytest.raises(records.RecordError, match="'zz' not found in the joined image table"):
        list(records.read_records(tmp_path / "ann2.json", "omniedit_got", image_rows=table))
