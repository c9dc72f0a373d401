"""Batch sampling (got_jax/sampling): JSONL rows, bad rows recorded and skipped, records and PNG metadata,
resume after a kill, settings checks, per-process shards. In process on the 8 fake CPU devices conftest sets,
on one tiny random-weight GoT whose batch is split over a (data=2, fsdp=4) mesh; every call has the same
shapes (8 prompts, 64x64, 2 steps), so the paint program compiles once for the whole module."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs.sharding_rules import RULES
from got_jax import sharding
from got_jax.got.text import parse_got
from got_jax.sampling import items as it
from got_jax.sampling import runner

KW = dict(height=64, width=64, num_inference_steps=2, max_new_tokens=3, only_return_got=False, guidance_scale=7.5,
          layout_guidance_scale=4.0, image_guidance_scale=1.0, scheduler="ddpm", temperature=0.0, max_rounds=1)
SETTINGS = dict(KW, dtype="float32", max_boxes=32, checkpoint="demo")
PLAN = "<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(100,200),(700,900)<|box_end|> (orange)"


class Recorder:
    """The pipeline, recording the prompts of every call (and failing on the prompt 'boom')."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []
        self.tokenizer = pipe.tokenizer

    def __call__(self, prompts, **kw):
        self.calls.append(list(prompts))
        if "boom" in prompts:
            raise ValueError("boom: a failure inside the pipeline")
        return self.pipe(prompts, **kw)


@pytest.fixture(scope="module")
def pipe():
    from got_jax.got.demo import demo_pipeline

    assert jax.device_count() == 8
    mesh = sharding.make_mesh((2, 4, 1))
    return demo_pipeline(mesh=mesh, rules=RULES)


def _runner(pipe, out, **kw):
    out = runner.check_outdir(out)
    runner.prepare_outdir(out, SETTINGS, overwrite=kw.pop("overwrite", False))
    return runner.Runner(Recorder(pipe), out, call_kwargs=KW, settings=SETTINGS, checkpoint="demo", batch_size=3,
                         data_size=8, log=lambda s: None, **kw)


def _records(out):
    return [json.loads(ln) for ln in (Path(out) / "records.jsonl").read_text().splitlines()]


def test_jsonl_rows_bad_rows_records_and_metadata(pipe, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), np.uint8)).save(tmp_path / "src.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        json.dumps({"prompt": "a red circle", "id": "circle", "seed": 7}),
        json.dumps({"prompt": "make it blue", "image": "src.png"}),  # relative to the prompts file
        json.dumps({"prompt": "a cat", "got_text": PLAN, "id": 12}),
        '{"prompt": "half a line',  # malformed JSON
        "",  # blank lines are skipped, not rows
        json.dumps({"prompt": "edit", "image": "missing.png"}),
        json.dumps({"prompt": "edit", "image": "broken.png"}),
        json.dumps({"prompt": "   "}),
        json.dumps({"prompt": "a dog", "got_text": "<|box_start|>(900,0),(1200,-50)<|box_end|> (red)"}),
        json.dumps({"prompt": "again", "id": "circle"}),
        json.dumps({"prompt": "escape", "id": "../up"}),
        json.dumps({"promt": "typo"}),
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    items = it.read_prompts_file(str(tmp_path / "p.jsonl"), base_seed=100)
    it.find_duplicates(items)
    assert [x.index for x in items] == list(range(11)) and items[1].seed == 101 and items[0].seed == 7
    run = _runner(pipe, tmp_path / "out")
    summary = run.run(items)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, 8)
    # the batch of 3 is rounded up to the 8 devices on the data axes (padded with copies of the last item)
    assert run.batch == 8 and run.pipe.calls == [["a red circle", "make it blue"] + ["a cat"] * 6]
    recs = {r["id"]: r for r in _records(tmp_path / "out") if r["status"] == "ok"}
    errors = {f"{r['index']:05d}": r["error"] for r in _records(tmp_path / "out") if r["status"] == "failed"}
    assert sorted(recs) == ["00001", "12", "circle"] and len(errors) == 8
    p = str(tmp_path / "p.jsonl")
    assert errors["00003"].startswith(f"{p}:4: malformed JSON line (Unterminated string")
    assert errors["00004"] == f"{p}:6: edit row's image {tmp_path / 'missing.png'} not found"
    assert errors["00005"].startswith(f"{p}:7: cannot read image file {tmp_path / 'broken.png'}")
    assert errors["00006"] == f"{p}:8: empty prompt"
    assert errors["00007"].startswith(f"{p}:9: got_text has unusable boxes") and "dropped" in errors["00007"]
    assert errors["00008"] == f"{p}:10: id 'circle' repeats the id of {p}:1"
    assert errors["00009"].startswith(f"{p}:11: id '../up' is not usable as a file name")
    assert errors["00010"].startswith(f"{p}:12: unknown key(s) ['promt']")
    out = tmp_path / "out"
    for key in ("circle", "00001", "12"):
        r = recs[key]
        assert r["status"] == "ok" and r["settings"] == SETTINGS and r["checkpoint"] == "demo"
        assert r["outputs"] == [f"{key}.png", f"{key}_got.txt", f"{key}_layout.png"]
        assert all((out / n).is_file() for n in r["outputs"])
        text = (out / f"{key}_got.txt").read_text().rstrip("\n")
        assert r["got_text"] == text and Image.open(out / f"{key}.png").text["got_text"] == text
        assert json.loads(Image.open(out / f"{key}.png").text["settings"]) == SETTINGS
        assert r["timings"]["batch_items"] == 3 and r["timings"]["batch_seconds"] > 0
    assert recs["circle"]["seed"] == 7 and recs["00001"]["image"] == str(tmp_path / "src.png")
    assert Image.open(out / "00001.png").size == (round(64 * 72 / 40), 64)  # the source's aspect ratio
    assert recs["12"]["plan"] == PLAN and recs["12"]["boxes"] == [
        {"x1": 100, "y1": 200, "x2": 700, "y2": 900, "phrase": "a cat", "color": "orange"}]
    assert [b.coords for b in parse_got(recs["12"]["got_text"])] == [(100, 200, 700, 900)]
    assert recs["12"]["reasoning_tokens"] == 0 and recs["circle"]["reasoning_tokens"] > 0
    assert summary.reasoning_tokens == recs["circle"]["reasoning_tokens"] + recs["00001"]["reasoning_tokens"]
    assert "images/s" in summary.throughput() and summary.images == 3


def test_a_failing_batch_is_retried_item_by_item(pipe, tmp_path):
    run = _runner(pipe, tmp_path / "out")
    s = run.run(it.flag_items(["boom", "fine"], [], [], 0))
    assert (s.done, s.failed) == (1, 1)
    assert run.pipe.calls == [["boom"] + ["fine"] * 7, ["boom"] * 8, ["fine"] * 8]
    (bad,) = [r for r in _records(tmp_path / "out") if r["status"] == "failed"]
    assert bad["id"] == "00000" and bad["error"] == "--prompt 1: ValueError: boom: a failure inside the pipeline"
    assert (tmp_path / "out" / "00001.png").is_file() and not (tmp_path / "out" / "00000.png").exists()


def test_resume_after_a_kill_redoes_only_incomplete_items(pipe, tmp_path):
    items = it.flag_items(["one", "two", "three"], [], [], 0)
    out = tmp_path / "out"
    first = _runner(pipe, out)
    assert first.run(items).done == 3
    before = {n: (out / n).read_bytes() for n in ("00001.png", "00002.png")}
    # a kill: 00001's record half written (its files are complete), 00002's layout never renamed into place
    # (only a half temp file), a stale temp of 00001's image
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if json.loads(ln)["id"] != "00001"]
    half = next(ln for ln in lines if json.loads(ln)["id"] == "00001")[:40]
    (out / "records.jsonl").write_text("".join(keep) + half)
    (out / "00002_layout.png").unlink()
    (out / ".00002_layout.png.tmp-abc123").write_bytes(b"\x89PNG half")
    (out / ".00001.png.tmp-def456").write_bytes(b"\x89PNG half")
    assert runner.completed_ids(out, items, False) == {"00000"}
    again = _runner(pipe, out)
    s = again.run(items)
    assert (s.done, s.skipped, s.failed) == (2, 1, 0)
    assert again.pipe.calls == [["two", "three"] + ["three"] * 6]  # padded with copies of the last item
    assert not list(out.glob(".*.tmp-*"))
    for n, data in before.items():  # same seeds, same images
        assert (out / n).read_bytes() == data
    lines = (out / "records.jsonl").read_text().splitlines()
    assert lines[2] == half  # the half line stays a line of its own (and is ignored)
    # 00002's first record stays (its files were incomplete, so it did not count); the rerun appended its new one
    assert sorted(r["id"] for r in runner.read_records(out)) == ["00000", "00001", "00002", "00002"]
    assert runner.completed_ids(out, items, False) == {"00000", "00001", "00002"}
    # a changed prompt under the same id is not complete; --overwrite redoes everything and drops old records
    assert runner.completed_ids(out, it.flag_items(["one", "2", "three"], [], [], 0), False) == {"00000", "00002"}
    third = _runner(pipe, out, overwrite=True)
    assert third.run(items, overwrite=True).done == 3 and len(_records(out)) == 3


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    out = runner.check_outdir(tmp_path / "o")
    runner.prepare_outdir(out, SETTINGS, overwrite=False)
    runner.prepare_outdir(out, SETTINGS, overwrite=False)  # same settings: a resume
    (out / "records.jsonl").write_text("{}\n")
    other = dict(SETTINGS, num_inference_steps=3)
    with pytest.raises(runner.OutdirError, match=r"holds a run with other settings \(num_inference_steps: 2 -> 3\).*"
                                                  r"--overwrite"):
        runner.prepare_outdir(out, other, overwrite=False)
    runner.prepare_outdir(out, other, overwrite=True)
    assert json.loads((out / "run.json").read_text())["settings"] == other and not (out / "records.jsonl").exists()


def test_unwritable_outdir_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runner.OutdirError, match=r"--outdir .*file/out: cannot write there"):
        runner.check_outdir(tmp_path / "file" / "out")


def test_text_files_shards_and_ids(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\ne\n\n")
    items = it.read_prompts_file(str(tmp_path / "p.txt"), first_index=2, base_seed=10)
    assert [(x.id, x.prompt, x.seed) for x in items][:2] == [("00002", "a", 12), ("00003", "b", 13)]
    shards = [it.shard(items, p, 3) for p in range(3)]
    assert sorted(x.id for s in shards for x in s) == sorted(x.id for x in items)
    assert not set(x.id for x in shards[0]) & set(x.id for x in shards[1])
    assert runner.records_name(1, 3) == "records-00001-of-00003.jsonl" and runner.records_name() == "records.jsonl"
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(it.PromptsFileError, match=r"blank.txt: line\(s\) \[2\] are blank"):
        it.read_prompts_file(str(tmp_path / "blank.txt"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(it.PromptsFileError, match="no rows"):
        it.read_prompts_file(str(tmp_path / "empty.jsonl"))


def test_grid_image_places_images_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    grid = np.asarray(runner.grid_image([Image.new("RGB", (6, 4), c) for c in colours]))
    assert grid.shape == (2 * 4, 3 * 6, 3)  # 5 images: ceil(sqrt(5)) = 3 columns, 2 rows
    for k, c in enumerate(colours):
        r, col = divmod(k, 3)
        assert grid[r * 4 + 1, col * 6 + 2].tolist() == list(c)
    assert grid[4 + 1, 2 * 6 + 2].tolist() == [128, 128, 128]  # the empty cell stays grey
