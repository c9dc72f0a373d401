"""The converters' command lines from any working directory, and their cheap checks before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from got_jax.checkpoint import CheckpointError
from got_jax.convert import export_pytorch, qwen2_5_vl, sdxl

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("got_checkpoint", "qwen2_5_vl", "sdxl", "export_pytorch")


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # what `pip install -e .` gives
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.parametrize("name", NAMES)
def test_scripts_and_modules_run_outside_the_repository(tmp_path, name):
    """``python path/to/convert/X.py`` and ``python -m got_jax.convert.X`` from a folder outside the checkout."""
    for args in ([str(ROOT / "convert" / f"{name}.py"), "--help"], ["-m", f"got_jax.convert.{name}", "--help"]):
        r = _run(args, tmp_path)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert "--out" in r.stdout and "--overwrite" in r.stdout


def test_thin_scripts_keep_the_module_api():
    """``from convert import got_checkpoint`` (repository root on the path) is the package module's API."""
    from convert import got_checkpoint as thin

    from got_jax.convert import got_checkpoint

    assert thin.convert_got is got_checkpoint.convert_got and thin.main is got_checkpoint.main


@pytest.mark.parametrize("convert", [
    lambda out: qwen2_5_vl.convert_qwen("/nonexistent/qwen", out),
    lambda out: sdxl.convert_sdxl("/nonexistent/sdxl", out),
    lambda out: export_pytorch.export("/nonexistent/ckpt", out),
], ids=["qwen", "sdxl", "export"])
def test_existing_out_is_refused_first(tmp_path, convert):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"already exists and is not empty: choose a new path, or pass --overwrite"):
        convert(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["old.txt"]
