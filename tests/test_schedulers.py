"""Scheduler parity with diffusers 0.42.1: full trajectories with a deterministic fake model, float32.

Tolerance: max abs error <= 1e-4 * max(1, max|reference|) over the whole trajectory.
Our loops run under jax.jit + lax.fori_loop through the uniform stateful API (init_state / step(state=)).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_mod

from got_jax.diffusion import TrainSchedule, make_scheduler

REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "reference")

CFG = json.load(open(os.path.join(REFERENCE_CONFIGS, "sdxl_scheduler_config.json")))


def _fake_np(x, t):
  return np.sin(x * 0.3 + t / 300.0).astype(np.float32)


def _fake_jnp(x, t):
  return jnp.sin(x * 0.3 + t / 300.0)


def _run_diffusers(cls, cfg, n, x0, noises, fake_double=False, start=0, **step_kw):
  s = cls.from_config(cfg)
  s.set_timesteps(n)
  if start:
    s.set_begin_index(start)
  x = torch.from_numpy(x0.copy())
  it = iter(noises) if noises is not None else None
  orig = ddpm_mod.randn_tensor
  if it is not None:
    ddpm_mod.randn_tensor = lambda shape, **kw: torch.from_numpy(next(it))
  try:
    for t in s.timesteps[start:]:
      out = torch.from_numpy(_fake_np(s.scale_model_input(x, t).numpy(), float(t)))
      if fake_double:
        out = torch.cat([out, torch.tanh(out)], 1)
      x = s.step(out, t, x, **step_kw).prev_sample
  finally:
    ddpm_mod.randn_tensor = orig
  return x.numpy()


def _nhwc(x):
  return np.moveaxis(np.asarray(x), -3, -1)


def _run_ours(name, cfg, n, x0, noises, fake_double=False, stateful=True, start=0, **step_kw):
  """Generic sampling loop (what a pipeline does) for any scheduler, jitted with lax.fori_loop.

  Takes and returns NCHW arrays like diffusers but runs our schedulers on NHWC (channels last, as
  got-jax's UNet), so a learned variance (``fake_double``) is split on the channel axis."""
  s = make_scheduler(name, cfg, n)
  x0 = _nhwc(x0)
  noises = jnp.asarray(_nhwc(np.stack(noises))) if noises is not None else jnp.zeros((n,) + x0.shape)

  def model(x, i):
    t = jnp.asarray(s.timesteps)[i].astype(jnp.float32)
    out = _fake_jnp(s.scale_model_input(x, i), t)
    return jnp.concatenate([out, jnp.tanh(out)], -1) if fake_double else out

  @jax.jit
  def loop(x):
    if not stateful:
      return jax.lax.fori_loop(start, n, lambda i, x: s.step(model(x, i), i, x, noise=noises[i], **step_kw), x)

    def body(i, carry):
      x, state = carry
      return s.step(model(x, i), i, x, noise=noises[i], state=state, **step_kw)
    return jax.lax.fori_loop(start, n, body, (x, s.init_state(x)))[0]
  return np.moveaxis(np.asarray(loop(jnp.asarray(x0))), -1, -3)


def _check(ref, got):
  err = np.abs(ref - got).max()
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err


@pytest.mark.parametrize("n,extra,double", [
    (50, {}, False), (10, {}, False),
    (10, {"variance_type": "learned_range", "prediction_type": "v_prediction"}, True)])
def test_ddpm(n, extra, double):
  cfg = dict(CFG, **extra)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  noises = [rng.standard_normal(x0.shape).astype(np.float32) for _ in range(n)]
  ref = _run_diffusers(diffusers.DDPMScheduler, cfg, n, x0, noises, double)
  _check(ref, _run_ours("ddpm", cfg, n, x0, noises, double))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(eta):
  rng = np.random.default_rng(1)
  n = 10
  x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  noises = [rng.standard_normal(x0.shape).astype(np.float32) for _ in range(n)]
  import diffusers.schedulers.scheduling_ddim as ddim_mod
  orig = ddim_mod.randn_tensor
  it = iter(noises)
  ddim_mod.randn_tensor = lambda shape, **kw: torch.from_numpy(next(it))
  try:
    ref = _run_diffusers(diffusers.DDIMScheduler, CFG, n, x0, None, eta=eta)
  finally:
    ddim_mod.randn_tensor = orig
  _check(ref, _run_ours("ddim", CFG, n, x0, noises, eta=eta))


def test_add_noise_velocity():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
  e = rng.standard_normal(x.shape).astype(np.float32)
  t = np.array([0, 500, 999])
  ref = diffusers.DDPMScheduler.from_config(CFG)
  ours = TrainSchedule.from_config(CFG)
  X, E, T = torch.from_numpy(x), torch.from_numpy(e), torch.from_numpy(t)
  _check(ref.add_noise(X, E, T).numpy(), np.asarray(ours.add_noise(jnp.asarray(x), jnp.asarray(e), t)))
  _check(ref.get_velocity(X, E, T).numpy(), np.asarray(ours.get_velocity(jnp.asarray(x), jnp.asarray(e), t)))


def test_bad_config():
  with pytest.raises(ValueError, match="timestep_spacing"):
    make_scheduler("ddpm", dict(CFG, timestep_spacing="bogus"), 10)


@pytest.mark.parametrize("karras", [False, True])
def test_euler(karras):
  cfg = dict(CFG, use_karras_sigmas=karras)
  rng = np.random.default_rng(3)
  n = 10
  x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  s = make_scheduler("euler", cfg, n)
  ref_s = diffusers.EulerDiscreteScheduler.from_config(cfg)
  ref_s.set_timesteps(n)
  np.testing.assert_allclose(s.timesteps, ref_s.timesteps.numpy(), rtol=1e-5)  # betas: np vs torch float32 linspace
  assert abs(s.init_noise_sigma - float(ref_s.init_noise_sigma)) <= 1e-4 * s.init_noise_sigma
  x0 = x0 * s.init_noise_sigma
  ref = _run_diffusers(diffusers.EulerDiscreteScheduler, cfg, n, x0, None)
  _check(ref, _run_ours("euler", cfg, n, x0, None))


@pytest.mark.parametrize("name,extra", [("ddpm", {}), ("ddim", {}), ("euler", {"use_karras_sigmas": True})])
def test_stateless_step_matches_stateful(name, extra):
  cfg = dict(CFG, **extra)
  rng = np.random.default_rng(4)
  n = 10
  x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  noises = [rng.standard_normal(x0.shape).astype(np.float32) for _ in range(n)]
  s = make_scheduler(name, cfg, n)
  assert s.init_state(jnp.asarray(x0)) == ()
  a = _run_ours(name, cfg, n, x0, noises, stateful=False)
  b = _run_ours(name, cfg, n, x0, noises, stateful=True)
  np.testing.assert_array_equal(a, b)


def _dpm_ref_schedule(cfg, n):
  ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
  ref.set_timesteps(n)
  return ref


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_schedule(spacing, karras):
  """Timesteps (exact) and sigmas of DPMSolverMultistep for several step counts; host-side only."""
  for n in (1, 12, 15, 25):
    for extra in ({}, {"final_sigmas_type": "sigma_min", "steps_offset": 0}):
      cfg = dict(CFG, timestep_spacing=spacing, use_karras_sigmas=karras, **extra)
      s = make_scheduler("dpm_solver_multistep", cfg, n)
      ref = _dpm_ref_schedule(cfg, n)
      np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy())
      np.testing.assert_allclose(s.sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=0)
      assert s.init_noise_sigma == float(ref.init_noise_sigma) == 1.0
  # lambda_min_clipped (cosine schedules) moves the last usable timestep.
  cfg = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing=spacing,
             use_karras_sigmas=karras)
  np.testing.assert_array_equal(make_scheduler("dpmpp_2m", cfg, 10).timesteps,
                                _dpm_ref_schedule(cfg, 10).timesteps.numpy())


def _dpm_trajectory(name, cfg, n, seed, start=0, double=False, channels=4):
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((1, channels, 8, 8)).astype(np.float32)
  s = make_scheduler(name, cfg, n)
  x0 = x0 * s.init_noise_sigma
  ref = _run_diffusers(diffusers.DPMSolverMultistepScheduler, cfg, n, x0, None, double, start=start)
  _check(ref, _run_ours(name, cfg, n, x0, None, double, start=start))


def test_dpm_learned_variance_split_on_channels():
  """A model output with 2x channels (learned variance) keeps the first half of the channel axis (NHWC).
  (diffusers keeps channels [:3], written for 3-channel pixel models: 3 channels here.)"""
  _dpm_trajectory("dpmpp_2m", dict(CFG, variance_type="learned_range"), 10, seed=7, double=True, channels=3)


@pytest.mark.parametrize("n", [12, 25])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_dpmpp_2m(n, karras, pred):
  """DPM-Solver++ 2M (midpoint, lower_order_final, final sigma 0) with SDXL's scheduler config."""
  cfg = dict(CFG, prediction_type=pred, use_karras_sigmas=karras)
  _dpm_trajectory("dpmpp_2m", cfg, n, seed=5)


@pytest.mark.parametrize("n,extra,start", [
    (12, {"solver_type": "heun", "prediction_type": "sample", "timestep_spacing": "trailing"}, 0),
    (16, {"final_sigmas_type": "sigma_min", "timestep_spacing": "linspace"}, 0),  # second-order last step
    (12, {"solver_type": "heun", "use_karras_sigmas": True}, 4)])  # img2img-style start mid-schedule
def test_dpm_variants(n, extra, start):
  _dpm_trajectory("dpm_solver_multistep", dict(CFG, **extra), n, seed=6, start=start)


def test_dpm_names_and_errors():
  a = make_scheduler("dpmpp_2m_karras", CFG, 12)
  b = make_scheduler("dpm_solver_multistep", dict(CFG, use_karras_sigmas=True), 12)
  assert np.array_equal(a.timesteps, b.timesteps) and np.array_equal(a.sigmas, b.sigmas)
  assert make_scheduler("dpmpp_2m", dict(CFG, solver_order=3), 12).solver_order == 2
  s = make_scheduler("dpmpp_2m", CFG, 12)
  with pytest.raises(ValueError, match="state"):
    s.step(jnp.zeros((1, 4, 2, 2)), 0, jnp.zeros((1, 4, 2, 2)))
  with pytest.raises(ValueError, match="algorithm_type"):
    make_scheduler("dpm_solver_multistep", dict(CFG, algorithm_type="sde-dpmsolver++"), 12)
  with pytest.raises(ValueError, match="solver_order"):
    make_scheduler("dpm_solver_multistep", dict(CFG, solver_order=3), 12)


def test_demo_and_shipped_configs_are_sdxls_scheduler_config():
  """The demo GoT's scheduler config (what ``train.export`` writes, and the shipped demo's config.json) is SDXL
  base's, every key. A config without ``clip_sample`` builds DDPM / DDIM that clip x0 to [-1, 1] (diffusers'
  default): the demo sampled that way for three stops, its objects turned to blobs and red ones to green."""
  from got_jax.got.demo import DEMO_DIR, SDXL_SCHEDULER  # noqa: PLC0415

  assert SDXL_SCHEDULER == CFG
  shipped = json.load(open(os.path.join(DEMO_DIR, "config.json")))["scheduler"]
  assert shipped == CFG
  for name in ("ddpm", "ddim"):
    assert make_scheduler(name, SDXL_SCHEDULER, 10).clip_sample is False
    assert make_scheduler(name, {k: v for k, v in CFG.items() if k != "clip_sample"}, 10).clip_sample is True


@pytest.mark.parametrize("name,cls", [("ddpm", diffusers.DDPMScheduler), ("ddim", diffusers.DDIMScheduler)])
def test_sdxl_config_keeps_large_latents_unclipped(name, cls):
  """Latents at +-4 (SDXL-style latents reach that) through DDPM / DDIM built from SDXL's config: equal to
  diffusers', and nothing is clipped; the same trajectory under clip_sample=True differs (the check can fail)."""
  rng = np.random.default_rng(3)
  x0 = (4.0 * np.tanh(rng.standard_normal((1, 4, 8, 8)))).astype(np.float32)
  noises = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(5)]
  ours = _run_ours(name, CFG, 5, x0, noises)
  ref = _run_diffusers(cls, CFG, 5, x0, noises if name == "ddpm" else None)
  np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
  clipped = _run_ours(name, dict(CFG, clip_sample=True), 5, x0, noises)
  assert np.abs(clipped - ours).max() > 0.1
