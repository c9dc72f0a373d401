"""Mutation check of the parity suite: does some test fail when a plausible one-line bug is put in?

Not part of CI (pytest does not collect this file). For each mutation below the script copies the
repository (without ``.git``, virtual environments and caches) to a temporary directory, applies the
mutation there as a text patch (the original text must occur exactly once, so a patch that no
longer applies is reported instead of silently passing), runs the mutation's targeted tests in the
copy and prints a table mutation -> tests that failed ("CAUGHT" when at least one did). A
mutation that no test catches is a blind spot of the suite: add a test input that can see it.

    python tests/mutation_check.py                       # every mutation, its targeted tests
    python tests/mutation_check.py --only gqa_modulo     # some of them (names below)
    python tests/mutation_check.py --baseline            # first run the union of targets unmutated
    python tests/mutation_check.py --list

Run it from the repository root with the test environment active (torch, diffusers, transformers);
it runs one pytest process at a time. Exit status 1 if a mutation is not caught or a patch does not
apply. Add a mutation by appending a :class:`Mutation` (file, exact old text, new text, the test
node ids expected to catch it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = "tests/test_got_pipeline.py"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("unet_time_ids_reversed", "UNet reads the six micro-conditioning time_ids in reverse order",
             "got_jax/models/sdxl/unet.py", "timestep_embedding(jnp.asarray(time_ids).reshape(-1),",
             "timestep_embedding(jnp.asarray(time_ids)[:, ::-1].reshape(-1),",
             ("tests/test_sdxl_unet.py::test_unet_matches_diffusers_12ch_text_time",
              "tests/test_sdxl_unet.py::test_unet_fp16_variant")),
    Mutation("pipeline_time_ids_wh", "pipeline builds time_ids as (w, h, crop_left, crop_top, w, h)",
             "got_jax/got/pipeline.py", "[[height, width, crop[0], crop[1], height, width]]",
             "[[width, height, crop[1], crop[0], width, height]]",
             (PIPE + "::test_t2i_matches_released_generate",
              PIPE + "::test_interactive_plan_matches_released_and_moves_layout")),
    Mutation("layout_sum", "layout latents summed over the boxes instead of averaged",
             "got_jax/got/model.py", "return jnp.sum(modes * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)",
             "return jnp.sum(modes * w, axis=1)",
             (PIPE + "::test_t2i_matches_released_generate", PIPE + "::test_edit_matches_released_generate")),
    Mutation("text_rope_theta_10000", "decoder rope_theta hard-coded to 10000",
             "got_jax/models/qwen2_5_vl/model.py", "inv_freq = 1.0 / (cfg.rope_theta ** (",
             "inv_freq = 1.0 / (10000.0 ** (",
             ("tests/test_qwen_model.py::test_text_logits",
              "tests/test_qwen_generate.py::test_stop_tokens_text_only")),
    Mutation("vision_rope_theta_10000", "vision tower rope_theta hard-coded to 10000",
             "got_jax/models/qwen2_5_vl/vision.py", "rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta)",
             "rotary_cos_sin(pos, cfg.head_dim, 10000.0)",
             ("tests/test_qwen_vision.py::test_single_image_matches_transformers",
              "tests/test_qwen_vision.py::test_two_images_and_video_frames_in_one_call")),
    Mutation("gqa_modulo", "query head i reads key/value head i % K instead of i // G",
             "got_jax/models/qwen2_5_vl/model.py", "qg = q.reshape(b, t, kh, n // kh, h)",
             "qg = q.reshape(b, t, n // kh, kh, h).swapaxes(2, 3)",
             ("tests/test_qwen_model.py::test_text_logits",
              "tests/test_qwen_generate.py::test_stop_tokens_text_only")),
    Mutation("mrope_grid_hw_swapped", "M-RoPE image positions built on a (w, h) grid instead of (h, w)",
             "got_jax/models/qwen2_5_vl/model.py", "lh, lw = gh // m, gw // m", "lh, lw = gw // m, gh // m",
             ("tests/test_qwen_model.py::test_one_image_windows_and_rope_index",
              "tests/test_qwen_model.py::test_two_images_and_padded_batch")),
    Mutation("mrope_sections_hw_swapped", "M-RoPE height and width frequency sections swapped",
             "got_jax/models/qwen2_5_vl/model.py", "axis = np.repeat(np.arange(3), cfg.mrope_section)",
             "axis = np.repeat(np.arange(3), np.asarray(cfg.mrope_section)[[0, 2, 1]])",
             ("tests/test_qwen_model.py::test_one_image_windows_and_rope_index",
              "tests/test_qwen_model.py::test_two_images_and_padded_batch")),
    Mutation("sampling_same_key_every_step", "sampled decoding reuses one key for every token",
             "got_jax/models/qwen2_5_vl/generate.py", "jax.random.fold_in(key, i), sampler.temperature",
             "key, sampler.temperature",
             ("tests/test_qwen_generate.py::test_sampled_generation_matches_hf_under_the_same_noise",)),
)

IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis", "out", "*.pyc",
                                "*.egg-info", "build", "dist", "workdir")


def copy_repo(dst: str) -> None:
    shutil.copytree(ROOT, dst, ignore=IGNORE, symlinks=True)


def apply(m: Mutation, root: str) -> None:
    path = os.path.join(root, m.path)
    with open(path) as f:
        text = f.read()
    count = text.count(m.old)
    if count != 1:
        raise RuntimeError(f"{m.name}: the text to mutate occurs {count} times in {m.path} (expected once): "
                           f"{m.old!r}")
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def run_tests(root: str, tests, label: str) -> tuple[list[str], int, float]:
    """Runs ``tests`` in ``root``; returns (failed node ids, tests run, seconds)."""
    xml = os.path.join(root, f".junit_{label}.xml")
    env = dict(os.environ, PYTHONPATH=root)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                           *tests], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if not os.path.exists(xml):
        raise RuntimeError(f"{label}: pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    failed, total = [], 0
    for case in ET.parse(xml).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
    return failed, total, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    ap.add_argument("--baseline", action="store_true", help="first check that the targets pass unmutated")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutations {sorted(unknown)}; --list shows the names")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:30s} {m.what}\n{'':30s} {m.path}: {m.old!r} -> {m.new!r}")
        return 0
    rows, bad = [], False
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        if args.baseline:
            base = os.path.join(tmp, "baseline")
            copy_repo(base)
            targets = sorted({t for m in chosen for t in m.tests})
            failed, total, sec = run_tests(base, targets, "baseline")
            print(f"baseline: {total} tests, {len(failed)} failed, {sec:.0f} s", flush=True)
            if failed:
                print("the unmutated targets fail, fix them first:", *failed, sep="\n  ")
                return 1
            shutil.rmtree(base)
        for m in chosen:
            root = os.path.join(tmp, m.name)
            copy_repo(root)
            try:
                apply(m, root)
            except RuntimeError as e:
                rows.append((m.name, "PATCH FAILED", str(e), 0.0))
                bad = True
                continue
            failed, total, sec = run_tests(root, list(m.tests), m.name)
            verdict = f"CAUGHT ({len(failed)}/{total})" if failed else f"MISSED (0/{total})"
            bad |= not failed
            rows.append((m.name, verdict, ", ".join(failed) or "-", sec))
            print(f"{m.name}: {verdict} in {sec:.0f} s: {', '.join(failed) or '-'}", flush=True)
            shutil.rmtree(root)
    print("\n| mutation | verdict | failing tests | s |\n| --- | --- | --- | --- |")
    for name, verdict, tests, sec in rows:
        print(f"| {name} | {verdict} | {tests} | {sec:.0f} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
