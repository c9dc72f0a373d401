"""Helpers shared by the converters: reading configs, finding weights and tokenizer files, CLI setup."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Sequence

from got_jax.checkpoint import CheckpointError, TensorSource, open_tensor_folder

# Files that make up the Qwen2.5-VL tokenizer / processor (copied to ``tokenizer/`` when present).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)
DTYPES = ("float32", "bfloat16", "float16")


def read_json(path: str, what: str) -> dict:
    """Reads a JSON file, raising :class:`CheckpointError` that names ``what`` and the path."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: cannot read {path} ({type(e).__name__}: {e})") from None


def require_dir(path: str | None, flag: str) -> str:
    if not path:
        raise CheckpointError(f"{flag} is required")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag}: {path} is not a folder")
    return path


def check_out(out: str, overwrite: bool, flag: str = "--out") -> str:
    """Fails before any conversion work when ``out`` exists and is not empty (unless ``overwrite``)."""
    if not out:
        raise CheckpointError(f"{flag} is required")
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{flag} {out} already exists and is not empty: choose a new path, or pass "
                              f"--overwrite to replace it")
    return out


def tokenizer_files(*folders: str | None) -> dict[str, str]:
    """``{file name: path}`` for the tokenizer files, each taken from the first folder that has it."""
    found: dict[str, str] = {}
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for name in TOKENIZER_FILES:
            p = os.path.join(folder, name)
            if name not in found and os.path.isfile(p):
                found[name] = p
    return found


def open_diffusers_weights(folder: str) -> TensorSource:
    """Weights of one diffusers component folder (``unet/``, ``vae/``): full precision first, then fp16."""
    try:
        return open_tensor_folder(folder, stems=("diffusion_pytorch_model",))
    except CheckpointError as first:
        if not os.path.isdir(folder):
            raise
        try:
            return open_tensor_folder(folder, stems=("diffusion_pytorch_model",), variant="fp16")
        except CheckpointError:
            raise first from None


def sdxl_component(sdxl_dir: str, kind: str) -> tuple[dict, str]:
    """``(config dict, folder)`` of ``unet`` / ``vae`` in a diffusers SDXL folder."""
    folder = os.path.join(sdxl_dir, kind)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{sdxl_dir}: no {kind}/ folder (not a diffusers SDXL folder)")
    return read_json(os.path.join(folder, "config.json"), f"SDXL {kind} config"), folder


def scheduler_config(sdxl_dir: str | None) -> dict | None:
    if not sdxl_dir:
        return None
    path = os.path.join(sdxl_dir, "scheduler", "scheduler_config.json")
    return read_json(path, "SDXL scheduler config") if os.path.isfile(path) else None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty; written atomically)")
    p.add_argument("--param_dtype", default="float32", choices=DTYPES,
                   help="dtype of the stored parameters (float32 master weights; bfloat16 halves the size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (checked before converting; without it an existing, "
                        "non-empty --out is an error)")
    p.add_argument("--no_progress", action="store_true", help="no per-tensor progress bar")
    return p


def run_main(fn, args: Sequence[str] | None, p: argparse.ArgumentParser) -> int:
    """Parses ``args`` and runs ``fn(namespace)`` with the entry points' conventions (:mod:`got_jax.cli`): any
    error prints one line (``<prog>: error: ...``) and returns the usage-error status 2; ``--verbosity=1``
    shows the traceback (and the libraries' INFO logs) instead."""
    from got_jax import cli  # noqa: PLC0415

    if not any(a.dest == "verbosity" for a in p._actions):
        p.add_argument("--verbosity", "-v", type=int, default=0,
                       help="0: one-line errors, library INFO logs off; 1: tracebacks and INFO logs")
    ns = p.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.quiet_logging(ns.verbosity)  # Orbax logs every read/write at INFO
    try:
        fn(ns)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - one line, not a traceback (unless --verbosity=1)
        if ns.verbosity >= 1:
            raise
        return cli.report(p.prog, e)
    return 0
