"""sample.py end to end (a subprocess, as users run it): the demo's T2I and interactive plan, files written, config
overrides honoured, a rerun skipping complete items; bad input as one line with the usage-error status before any
model work; two processes on localhost sharing a prompts file."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpu_env import LLVM_O0, NO_YNN, xla_flags

ROOT = Path(__file__).resolve().parent.parent


def test_sample_demo_writes_images_chains_and_layouts(tmp_path):
    plan = "<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(100,200),(700,900)<|box_end|> (orange)"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--random_weights", "--prompt", "a red circle", "--prompt", "a cat",
           "--got_text", "nothing", "--got_text", plan, "--outdir", str(tmp_path), "--config.height=64",
           "--config.width=64", "--config.num_inference_steps=2", "--config.max_new_tokens=4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "random-weight" in run.stdout and "wrote" in run.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000.png", "00000_got.txt", "00000_layout.png", "00001.png", "00001_got.txt",
                     "00001_layout.png", "grid.png", "records.jsonl", "run.json"]
    assert "summary: 2 done, 0 skipped (already complete), 0 failed" in run.stdout
    assert re.search(r"throughput: [0-9.]+ images/s, [0-9.]+ reasoning tokens/s", run.stdout)
    recs = [json.loads(ln) for ln in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"], r["seed"]) for r in recs] == [("00000", "ok", 42), ("00001", "ok", 43)]
    assert Image.open(tmp_path / "00001.png").text["got_text"] == (tmp_path / "00001_got.txt").read_text()[:-1]
    assert Image.open(tmp_path / "00001.png").size == (64, 64)  # --config overrides beat the demo defaults
    assert (tmp_path / "00001_got.txt").read_text().startswith(plan)
    layout = np.asarray(Image.open(tmp_path / "00001_layout.png"))
    # overlay tile, 2 px gap, then the painted canvas of the single box: orange at its centre
    assert layout.shape == (64, 64 * 2 + 2, 3)
    assert layout[35, 66 + 25].tolist() == [255, 165, 0]
    # a rerun finds every item complete and loads no model; other settings in the same folder are refused
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "all 2 item(s) already complete" in again.stdout, again.stderr[-2000:]
    assert "random-weight" not in again.stdout
    other = subprocess.run(cmd + ["--config.num_inference_steps=3"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
    assert other.returncode == 2 and "holds a run with other settings (num_inference_steps: 2 -> 3)" in other.stderr
    assert "Traceback" not in other.stderr and "random-weight" not in other.stdout


def _sample(args, cwd, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_unknown_scheduler_fails_before_any_model_work(tmp_path):
    """Checked before the demo model is built or any chain is generated (it used to fail after reasoning)."""
    r = _sample(["--random_weights", "--prompt", "a cat", "--outdir", str(tmp_path / "o"), "--config.scheduler=ddpmm"], tmp_path)
    assert r.returncode != 0 and "--config.scheduler='ddpmm': unknown scheduler 'ddpmm'" in r.stderr, r.stderr[-2000:]
    assert "random-weight" not in r.stdout and not (tmp_path / "o").exists()


def test_bad_size_fails_before_any_model_work(tmp_path):
    r = _sample(["--random_weights", "--prompt", "a cat", "--outdir", str(tmp_path / "o"), "--config.height=100"], tmp_path)
    assert r.returncode != 0 and "--config.height=100: must be a positive multiple of 32" in r.stderr
    assert "random-weight" not in r.stdout


def test_unreadable_image_fails_before_the_model_loads(tmp_path):
    """A bad --image is reported before --ckpt is even opened (here the checkpoint does not exist)."""
    (tmp_path / "photo.jpg").write_bytes(b"not a jpeg")
    r = _sample(["--ckpt", str(tmp_path / "no-ckpt"), "--prompt", "make it blue", "--image", "photo.jpg",
                 "--outdir", "o"], tmp_path)
    assert r.returncode != 0 and "--image photo.jpg: cannot read image file" in r.stderr, r.stderr[-2000:]


def test_blank_prompt_lines_are_an_error_not_renumbered(tmp_path):
    """Output NNNNN is line NNNNN+1 of the file: a blank line inside would shift every later output."""
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n\n")
    r = _sample(["--ckpt", str(tmp_path / "no-ckpt"), "--prompts_file", "prompts.txt", "--outdir", "o"], tmp_path)
    assert r.returncode != 0 and "prompts.txt: line(s) [2] are blank" in r.stderr, r.stderr[-2000:]


def test_setup_errors_are_one_line_with_the_usage_status(tmp_path):
    """A wrong --ckpt, an empty prompt, an unwritable --outdir, --image with a JSONL file: one line on stderr,
    status 2, nothing sampled; --verbosity=1 shows the traceback."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n')
    cases = [
        (["--ckpt", "no-ckpt", "--prompt", "a cat"], "no-ckpt: not a converted got-jax folder"),
        (["--random_weights", "--prompt", " "], "--prompt 1: empty prompt"),
        (["--random_weights", "--prompt", "a cat", "--outdir", "file/out"], "--outdir file/out: cannot write there"),
        (["--random_weights", "--prompts_file", "p.jsonl", "--image", "x.png"], "in a JSONL prompts file give each row"),
    ]
    for args, msg in cases:
        r = _sample(args, tmp_path)
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("sample.py: error: ")]
        assert r.returncode == 2 and len(errs) == 1 and msg in errs[0], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "random-weight" not in r.stdout
    r = _sample(["--ckpt", "no-ckpt", "--prompt", "a cat", "--verbosity=1"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_the_prompts_file(tmp_path):
    """jax.distributed on localhost, 2 processes x 2 CPU devices, a tiny converted checkpoint: each process
    samples its own rows (batch split over its 2 devices) into its own records file, and together they cover
    the file; Orbax's INFO lines stay off the console; the compilation cache fills."""
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder
    from got_jax.got.demo import demo_config, random_model

    config = demo_config()
    tok = ROOT / "got_jax" / "assets" / "tokenizer"
    write_checkpoint_folder(str(tmp_path / "ckpt"), dict(config, param_dtype="float32"),
                            pure_tree(random_model(config, 0)), {p.name: str(p) for p in tok.iterdir()})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"prompt {i}", "id": f"r{i}"}) + "\n"
                                              for i in range(5)))
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(2, LLVM_O0, NO_YNN), PYTHONPATH=str(ROOT))
    args = ["--ckpt", "ckpt", "--prompts_file", "p.jsonl", "--outdir", "o", "--config.height=64",
            "--config.width=64", "--config.num_inference_steps=1", "--config.max_new_tokens=2",
            "--config.batch_size=1", "--config.mesh_shape=(-1,1,1)", "--config.dtype=float32",
            "--config.compilation_cache_dir=cache", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args, f"--process_id={i}"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert not re.search(r"^I\d{4} ", err, re.M), err[-3000:]  # no absl/Orbax INFO lines
        assert "note: batch of 2" in out  # batch_size 1 rounded up to the 2 devices of the data axes
    ids = []
    for i in range(2):
        recs = [json.loads(ln) for ln in (tmp_path / "o" / f"records-{i:05d}-of-00002.jsonl").read_text().splitlines()]
        assert all(r["status"] == "ok" and r["process"] == i for r in recs)
        ids.append({r["id"] for r in recs})
    assert ids == [{"r0", "r2", "r4"}, {"r1", "r3"}]
    assert all((tmp_path / "o" / f"r{i}.png").is_file() for i in range(5))
    assert any((tmp_path / "cache").iterdir())


def test_converters_share_the_conventions(tmp_path, capsys):
    """got_jax.convert.*: one line on stderr with status 2; --verbosity=1 raises (the traceback) instead."""
    from got_jax.checkpoint import CheckpointError
    from got_jax.convert import sdxl

    args = ["--sdxl_dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert sdxl.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith(f": error: --sdxl_dir: {tmp_path / 'none'} is not a folder") and "--verbosity=1" in err[1]
    with pytest.raises(CheckpointError, match="is not a folder"):
        sdxl.main(args + ["--verbosity=1"])
