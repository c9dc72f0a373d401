"""benchmarks/accelerator.py stays runnable: its ``--size small`` path (demo GoT, CPU) with minimal settings.

Checks that both sides (JAX and PyTorch) time every phase, that XLA's cost analysis gives positive UNet / VAE
FLOP counts, and that the floor and seconds per image follow the documented formulas.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_run_times_every_phase_on_both_sides():
    spec = importlib.util.spec_from_file_location("accelerator_bench", os.path.join(ROOT, "benchmarks", "accelerator.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--size", "small", "--batch", "2", "--prompt", "5", "--tokens", "2", "--steps", "3",
                      "--repeats", "1", "--peak-tflops", "1", "--peak-gbps", "10"])
    a, ((b, res),) = out["args"], out["rows"]
    assert b == 2 and set(res) == {"jax", "torch"}
    for side in res.values():
        assert set(side) == {"reason", "unet", "vae"} and all(t > 0 for t in side.values())
    assert out["unet_flop"] > 1e6 and out["vae_flop"] > 1e6 and out["weight_bytes"] > 0
    r = res["jax"]
    assert bench.per_image(a, b, r) == pytest.approx((r["reason"] * 850 / 2 + 3 * r["unet"] + r["vae"]) / 2)
    floor = bench.floor_per_image(a, b, out["unet_flop"], out["vae_flop"], out["weight_bytes"], 1.0, 10.0)
    assert floor == pytest.approx(850 * out["weight_bytes"] / 1e10 / 2 + (12 * out["unet_flop"] + out["vae_flop"]) / 1e12)
