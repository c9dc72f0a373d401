"""sample.py --demo end to end (a subprocess, as users run it): T2I and an interactive plan, files written,
config overrides honoured."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_sample_demo_writes_images_chains_and_layouts(tmp_path):
    plan = "<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(100,200),(700,900)<|box_end|> (orange)"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--demo", "--prompt", "a red circle", "--prompt", "a cat",
           "--got_text", "nothing", "--got_text", plan, "--outdir", str(tmp_path), "--config.height=64",
           "--config.width=64", "--config.num_inference_steps=2", "--config.max_new_tokens=4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "random-weight" in run.stdout and "wrote" in run.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000.png", "00000_got.txt", "00000_layout.png", "00001.png", "00001_got.txt",
                     "00001_layout.png", "grid.png"]
    assert Image.open(tmp_path / "00001.png").size == (64, 64)  # --config overrides beat the demo defaults
    assert (tmp_path / "00001_got.txt").read_text().startswith(plan)
    layout = np.asarray(Image.open(tmp_path / "00001_layout.png"))
    # overlay tile, 2 px gap, then the painted canvas of the single box: orange at its centre
    assert layout.shape == (64, 64 * 2 + 2, 3)
    assert layout[35, 66 + 25].tolist() == [255, 165, 0]


def _sample(args, cwd, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_unknown_scheduler_fails_before_any_model_work(tmp_path):
    """Checked before the demo model is built or any chain is generated (it used to fail after reasoning)."""
    r = _sample(["--demo", "--prompt", "a cat", "--outdir", str(tmp_path / "o"), "--config.scheduler=ddpmm"], tmp_path)
    assert r.returncode != 0 and "--config.scheduler='ddpmm': unknown scheduler 'ddpmm'" in r.stderr, r.stderr[-2000:]
    assert "random-weight" not in r.stdout and not (tmp_path / "o").exists()


def test_bad_size_fails_before_any_model_work(tmp_path):
    r = _sample(["--demo", "--prompt", "a cat", "--outdir", str(tmp_path / "o"), "--config.height=100"], tmp_path)
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
