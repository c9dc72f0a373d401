"""Pure, jit-able noise schedulers matching diffusers 0.42.1 (DDPM, DDIM, EulerDiscrete, DPM-Solver++ 2M).

A scheduler is a frozen dataclass of host-computed schedule arrays for a fixed number of inference
steps. `step(model_output, step_index, sample, key, noise=None)` is pure and takes a (possibly traced)
integer `step_index` into `timesteps`, so it runs inside `lax.fori_loop`.

Uniform stateful API (every scheduler; required for multistep solvers such as DPM-Solver++):
  state = sched.init_state(sample)           # pytree with static shapes (`()` for single-step schedulers)
  prev, state = sched.step(model_output, i, sample, key=..., noise=..., state=state)
Passing `state=None` (the default) keeps the stateless form returning only `prev`; multistep schedulers
require a state. A generic sampling loop:
  x = noise * sched.init_noise_sigma; state = sched.init_state(x)
  for i in range(len(sched.timesteps)):   # or lax.fori_loop over (x, state)
    out = model(sched.scale_model_input(x, i), sched.timesteps[i])
    x, state = sched.step(out, i, x, key=jax.random.fold_in(key, i), state=state)

Supported config keys: num_train_timesteps, beta_start, beta_end, beta_schedule (linear, scaled_linear,
squaredcos_cap_v2), trained_betas, prediction_type (epsilon, v_prediction, sample), variance_type
(fixed_small, fixed_small_log, fixed_large, learned, learned_range), clip_sample, clip_sample_range,
timestep_spacing (linspace, leading, trailing), steps_offset, set_alpha_to_one (DDIM), eta (DDIM step arg),
use_karras_sigmas (Euler, DPM), and for DPMSolverMultistep: algorithm_type ('dpmsolver++' only), solver_order
(1, 2), solver_type (midpoint, heun), lower_order_final, euler_at_final, final_sigmas_type (zero, sigma_min),
lambda_min_clipped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _betas(config: dict) -> np.ndarray:
  n = int(config.get("num_train_timesteps", 1000))
  if config.get("trained_betas") is not None:
    return np.asarray(config["trained_betas"], np.float32)
  sched = config.get("beta_schedule", "linear")
  bs, be = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
  if sched == "linear":
    return np.linspace(bs, be, n, dtype=np.float32)
  if sched == "scaled_linear":
    return (np.linspace(bs**0.5, be**0.5, n, dtype=np.float32) ** 2).astype(np.float32)
  if sched == "squaredcos_cap_v2":
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.asarray([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
  raise ValueError(f"unsupported scheduler config: beta_schedule={sched!r}")


def _alphas_cumprod(config: dict) -> np.ndarray:
  # torch.cumprod (CPU, float32) accumulates in float64; doing the same matches diffusers bit-for-bit.
  return np.cumprod((1.0 - _betas(config)).astype(np.float64)).astype(np.float32)


def _timesteps(config: dict, n: int) -> np.ndarray:
  total = int(config.get("num_train_timesteps", 1000))
  spacing = config.get("timestep_spacing", "leading")
  if n > total:
    raise ValueError(f"num_inference_steps={n} > num_train_timesteps={total}")
  if spacing == "linspace":
    return np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
  if spacing == "leading":
    ratio = total // n
    return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + int(config.get("steps_offset", 0))
  if spacing == "trailing":
    ratio = total / n
    return np.round(np.arange(total, 0, -ratio)).astype(np.int64) - 1
  raise ValueError(f"unsupported scheduler config: timestep_spacing={spacing!r}")


def _pred_x0_eps(prediction_type, model_output, sample, a, b):
  if prediction_type == "epsilon":
    return (sample - b**0.5 * model_output) / a**0.5, model_output
  if prediction_type == "sample":
    return model_output, (sample - a**0.5 * model_output) / b**0.5
  if prediction_type == "v_prediction":
    return a**0.5 * sample - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * sample
  raise ValueError(f"unsupported scheduler config: prediction_type={prediction_type!r}")


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
  """Training helpers: add_noise / get_velocity / sample_timesteps."""
  alphas_cumprod: np.ndarray
  num_train_timesteps: int

  @classmethod
  def from_config(cls, config: dict) -> "TrainSchedule":
    return cls(_alphas_cumprod(config), int(config.get("num_train_timesteps", 1000)))

  def _coeffs(self, timesteps, ndim):
    ac = jnp.asarray(self.alphas_cumprod)[timesteps]
    shape = ac.shape + (1,) * (ndim - ac.ndim)
    return (ac**0.5).reshape(shape), ((1 - ac) ** 0.5).reshape(shape)

  def add_noise(self, original, noise, timesteps):
    sa, sb = self._coeffs(timesteps, original.ndim)
    return sa * original + sb * noise

  def get_velocity(self, sample, noise, timesteps):
    sa, sb = self._coeffs(timesteps, sample.ndim)
    return sa * noise - sb * sample

  def sample_timesteps(self, key, batch: int):
    return jax.random.randint(key, (batch,), 0, self.num_train_timesteps)


@dataclasses.dataclass(frozen=True)
class DDPMScheduler:
  """diffusers DDPMScheduler for a fixed number of inference steps."""
  timesteps: np.ndarray
  alphas_cumprod: np.ndarray
  num_train_timesteps: int
  num_inference_steps: int
  prediction_type: str = "epsilon"
  variance_type: str = "fixed_small"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  init_noise_sigma: float = 1.0

  @classmethod
  def from_config(cls, config: dict, num_inference_steps: int) -> "DDPMScheduler":
    vt = config.get("variance_type", "fixed_small")
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
      raise ValueError(f"unsupported scheduler config: variance_type={vt!r}")
    if config.get("thresholding", False):
      raise ValueError("unsupported scheduler config: thresholding=True")
    return cls(_timesteps(config, num_inference_steps), _alphas_cumprod(config),
               int(config.get("num_train_timesteps", 1000)), num_inference_steps,
               config.get("prediction_type", "epsilon"), vt, bool(config.get("clip_sample", True)),
               float(config.get("clip_sample_range", 1.0)))

  def scale_model_input(self, sample, step_index):
    return sample

  def init_state(self, sample):
    return ()

  def step(self, model_output, step_index, sample, key=None, noise=None, state=None):
    """One reverse step. `noise` (same shape as sample) overrides the key-drawn variance noise.

    Returns prev_sample, or (prev_sample, state) when `state` (from `init_state`) is given."""
    t = jnp.asarray(self.timesteps)[step_index]
    ac = jnp.asarray(self.alphas_cumprod)
    prev_t = t - self.num_train_timesteps // self.num_inference_steps
    a = ac[t]
    a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], 1.0)
    b, b_prev = 1 - a, 1 - a_prev
    cur_alpha = a / a_prev
    cur_beta = 1 - cur_alpha
    pv = None
    if self.variance_type in ("learned", "learned_range") and model_output.shape[-1] == 2 * sample.shape[-1]:
      model_output, pv = jnp.split(model_output, 2, axis=-1)  # NHWC: channels last
    x0, _ = _pred_x0_eps(self.prediction_type, model_output, sample, a, b)
    if self.clip_sample:
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    prev = (a_prev**0.5 * cur_beta / b) * x0 + (cur_alpha**0.5 * b_prev / b) * sample
    if noise is None:
      noise = jax.random.normal(key, sample.shape, sample.dtype)
    var = jnp.maximum(b_prev / b * cur_beta, 1e-20)
    vt = self.variance_type
    if vt == "fixed_small":
      std = var**0.5
    elif vt == "fixed_small_log":
      std = jnp.exp(0.5 * jnp.log(var))
    elif vt == "fixed_large":
      std = cur_beta**0.5
    elif vt == "learned":
      std = pv**0.5 if pv is not None else var**0.5
    else:  # learned_range
      if pv is None:
        raise ValueError("variance_type='learned_range' needs model_output with 2x channels")
      frac = (pv + 1) / 2
      std = jnp.exp(0.5 * (frac * jnp.log(cur_beta) + (1 - frac) * jnp.log(var)))
    prev = prev + jnp.where(t > 0, 1.0, 0.0) * std * noise
    return prev if state is None else (prev, state)


@dataclasses.dataclass(frozen=True)
class DDIMScheduler:
  """diffusers DDIMScheduler for a fixed number of inference steps."""
  timesteps: np.ndarray
  alphas_cumprod: np.ndarray
  final_alpha_cumprod: float
  num_train_timesteps: int
  num_inference_steps: int
  prediction_type: str = "epsilon"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  init_noise_sigma: float = 1.0

  @classmethod
  def from_config(cls, config: dict, num_inference_steps: int) -> "DDIMScheduler":
    if config.get("thresholding", False):
      raise ValueError("unsupported scheduler config: thresholding=True")
    ac = _alphas_cumprod(config)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(ac[0])
    return cls(_timesteps(config, num_inference_steps), ac, final,
               int(config.get("num_train_timesteps", 1000)), num_inference_steps,
               config.get("prediction_type", "epsilon"), bool(config.get("clip_sample", True)),
               float(config.get("clip_sample_range", 1.0)))

  def scale_model_input(self, sample, step_index):
    return sample

  def init_state(self, sample):
    return ()

  def step(self, model_output, step_index, sample, key=None, noise=None, eta: float = 0.0, state=None):
    t = jnp.asarray(self.timesteps)[step_index]
    ac = jnp.asarray(self.alphas_cumprod)
    prev_t = t - self.num_train_timesteps // self.num_inference_steps
    a = ac[t]
    a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], self.final_alpha_cumprod)
    b = 1 - a
    x0, eps = _pred_x0_eps(self.prediction_type, model_output, sample, a, b)
    if self.clip_sample:
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    var = (1 - a_prev) / b * (1 - a / a_prev)
    std = eta * var**0.5
    direction = (1 - a_prev - std**2) ** 0.5 * eps
    prev = a_prev**0.5 * x0 + direction
    if eta > 0:
      if noise is None:
        noise = jax.random.normal(key, sample.shape, sample.dtype)
      prev = prev + std * noise
    return prev if state is None else (prev, state)


def _sigma_to_t(sigma, log_sigmas):
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high = low + 1
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
  return ((1 - w) * low + w * high).reshape(sigma.shape)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler:
  """diffusers EulerDiscreteScheduler (s_churn=0, interpolation_type='linear')."""
  timesteps: np.ndarray  # float32 model timesteps
  sigmas: np.ndarray  # (n + 1,), last is 0
  init_noise_sigma: float
  prediction_type: str = "epsilon"

  @classmethod
  def from_config(cls, config: dict, num_inference_steps: int) -> "EulerDiscreteScheduler":
    if config.get("interpolation_type", "linear") != "linear":
      raise ValueError(f"unsupported scheduler config: interpolation_type={config['interpolation_type']!r}")
    for k in ("use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
      if config.get(k, False):
        raise ValueError(f"unsupported scheduler config: {k}=True")
    total = int(config.get("num_train_timesteps", 1000))
    n = num_inference_steps
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
      ts = np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
      ts = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.float32) + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
      ts = (np.arange(total, 0, -total / n)).round().copy().astype(np.float32) - 1
    else:
      raise ValueError(f"unsupported scheduler config: timestep_spacing={spacing!r}")
    ac = _alphas_cumprod(config)
    full = (((1 - ac) / ac) ** 0.5).astype(np.float32)
    log_sigmas = np.log(full)
    sig = np.interp(ts, np.arange(0, len(full)), full)
    if config.get("use_karras_sigmas", False):
      smin, smax, rho = float(sig[-1]), float(sig[0]), 7.0
      ramp = np.linspace(0, 1, n)
      sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
      ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig]).astype(np.float32)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    smax = float(sig.max())
    init = smax if spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
    return cls(ts.astype(np.float32), sig, float(np.float32(init)), config.get("prediction_type", "epsilon"))

  def scale_model_input(self, sample, step_index):
    sigma = jnp.asarray(self.sigmas)[step_index]
    return sample / (sigma**2 + 1) ** 0.5

  def init_state(self, sample):
    return ()

  def step(self, model_output, step_index, sample, key=None, noise=None, state=None):
    sig = jnp.asarray(self.sigmas)
    sigma, sigma_next = sig[step_index], sig[step_index + 1]
    if self.prediction_type == "epsilon":
      x0 = sample - sigma * model_output
    elif self.prediction_type == "v_prediction":
      x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:
      raise ValueError(f"unsupported scheduler config: prediction_type={self.prediction_type!r}")
    prev = sample + (sample - x0) / sigma * (sigma_next - sigma)
    return prev if state is None else (prev, state)


class DPMSolverState(NamedTuple):
  """Multistep carry of DPMSolverMultistepScheduler: last data (x0) prediction + number of steps taken."""
  prev_x0: jax.Array  # float32, sample's shape
  lower_order_nums: jax.Array  # int32 scalar, saturates at solver_order


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler:
  """diffusers DPMSolverMultistepScheduler, algorithm_type='dpmsolver++' (DPM-Solver++ 1S/2M), VP sigmas.

  The multistep history lives in an explicit `DPMSolverState` (from `init_state`), so `step` is pure and the
  whole loop runs under `lax.fori_loop`/`scan`. Like diffusers, the first step after `init_state` is first
  order (also when starting mid-schedule, e.g. img2img), and the last step is first order when
  `euler_at_final`, `final_sigmas_type == 'zero'` or (`lower_order_final` and fewer than 15 steps).
  """
  timesteps: np.ndarray  # int64 model timesteps, (n,)
  sigmas: np.ndarray  # float32 (n + 1,) sqrt((1 - a) / a); last is 0 ('zero') or the t=0 sigma ('sigma_min')
  num_inference_steps: int
  prediction_type: str = "epsilon"
  solver_order: int = 2
  solver_type: str = "midpoint"
  final_first_order: bool = True  # last step is first order (lower_order_final / euler_at_final / zero)
  split_learned_variance: bool = False
  init_noise_sigma: float = 1.0

  @classmethod
  def from_config(cls, config: dict, num_inference_steps: int) -> "DPMSolverMultistepScheduler":
    algo = config.get("algorithm_type", "dpmsolver++")
    if algo == "deis":  # diffusers silently maps deis -> dpmsolver++
      algo = "dpmsolver++"
    if algo != "dpmsolver++":
      raise ValueError(f"unsupported scheduler config: algorithm_type={algo!r}")
    order = int(config.get("solver_order", 2))
    if order not in (1, 2):
      raise ValueError(f"unsupported scheduler config: solver_order={order}")
    solver_type = config.get("solver_type", "midpoint")
    if solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
      solver_type = "midpoint"
    if solver_type not in ("midpoint", "heun"):
      raise ValueError(f"unsupported scheduler config: solver_type={solver_type!r}")
    pred = config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
      raise ValueError(f"unsupported scheduler config: prediction_type={pred!r}")
    for k in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
              "rescale_betas_zero_snr", "use_dynamic_shifting"):
      if config.get(k, False):
        raise ValueError(f"unsupported scheduler config: {k}=True")
    final_type = config.get("final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
      raise ValueError(f"unsupported scheduler config: final_sigmas_type={final_type!r}")

    total = int(config.get("num_train_timesteps", 1000))
    n = num_inference_steps
    if n > total:
      raise ValueError(f"num_inference_steps={n} > num_train_timesteps={total}")
    ac = _alphas_cumprod(config)
    lmc = config.get("lambda_min_clipped", -float("inf"))
    lmc = -float("inf") if lmc is None else float(lmc)
    lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    last = total - int(np.searchsorted(np.flip(lambda_t), lmc))
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
      ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
      ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
      ts += int(config.get("steps_offset", 0))
    elif spacing == "trailing":
      ts = np.arange(last, 0, -total / n).round().copy().astype(np.int64) - 1
    else:
      raise ValueError(f"unsupported scheduler config: timestep_spacing={spacing!r}")

    full = (((1 - ac) / ac) ** 0.5).astype(np.float32)
    log_sigmas = np.log(full)
    if config.get("use_karras_sigmas", False):
      smin, smax, rho = float(full[0]), float(full[-1]), 7.0
      ramp = np.linspace(0, 1, n)
      sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
      ts = _sigma_to_t(sig, log_sigmas)
      if config.get("beta_schedule", "linear") != "squaredcos_cap_v2":
        ts = ts.round()
      ts = ts.astype(np.int64)
    else:
      sig = np.interp(ts, np.arange(0, len(full)), full)
    last_sigma = float(full[0]) if final_type == "sigma_min" else 0.0
    sig = np.concatenate([sig, [last_sigma]]).astype(np.float32)
    n = len(ts)
    final_first = (bool(config.get("euler_at_final", False)) or final_type == "zero"
                   or (bool(config.get("lower_order_final", True)) and n < 15))
    split = config.get("variance_type") in ("learned", "learned_range") and pred == "epsilon"
    return cls(ts, sig, n, pred, order, solver_type, final_first, split)

  def scale_model_input(self, sample, step_index):
    return sample

  def init_state(self, sample) -> DPMSolverState:
    return DPMSolverState(jnp.zeros(sample.shape, jnp.float32), jnp.zeros((), jnp.int32))

  def convert_model_output(self, model_output, step_index, sample):
    """Data prediction x0 (float32) from the raw model output at `step_index`."""
    sigma = jnp.asarray(self.sigmas)[step_index]
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    model_output = model_output.astype(jnp.float32)
    sample = sample.astype(jnp.float32)
    if self.split_learned_variance and model_output.shape[-1] == 2 * sample.shape[-1]:
      model_output = model_output[..., :sample.shape[-1]]  # NHWC: channels last
    if self.prediction_type == "epsilon":
      return (sample - sigma_t * model_output) / alpha_t
    if self.prediction_type == "sample":
      return model_output
    return alpha_t * sample - sigma_t * model_output  # v_prediction

  def step(self, model_output, step_index, sample, key=None, noise=None, state=None):
    """One DPM-Solver++ step; returns (prev_sample, new_state). `key`/`noise` are unused (deterministic)."""
    if state is None:
      raise ValueError("DPMSolverMultistepScheduler.step needs state=scheduler.init_state(sample)")
    sig = jnp.asarray(self.sigmas)
    i = step_index
    x0 = self.convert_model_output(model_output, i, sample)
    x = sample.astype(jnp.float32)

    def alpha_sigma_lambda(s):
      a = 1 / (s**2 + 1) ** 0.5
      st = s * a
      return a, st, jnp.log(a) - jnp.log(st)

    alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sig[i + 1])
    _, sigma_s0, lam_s0 = alpha_sigma_lambda(sig[i])
    _, _, lam_s1 = alpha_sigma_lambda(sig[jnp.maximum(i - 1, 0)])
    h = lam_t - lam_s0  # +inf on a final step to sigma 0 (then the update is exactly x0)
    em1 = jnp.exp(-h) - 1.0
    prev = (sigma_t / sigma_s0) * x - (alpha_t * em1) * x0  # first order (DDIM)

    if self.solver_order >= 2:
      use_first = state.lower_order_nums < 1
      if self.final_first_order:
        use_first = use_first | (i == self.num_inference_steps - 1)
      # Second-order correction, with inf/0 guarded so the unused branch stays finite.
      h_s = jnp.where(use_first, 1.0, h)
      h0_s = jnp.where(use_first, 1.0, lam_s0 - lam_s1)
      d1 = (h_s / h0_s) * (x0 - state.prev_x0)  # (1 / r0) * (m0 - m1)
      if self.solver_type == "midpoint":
        c1 = -0.5 * (alpha_t * (jnp.exp(-h_s) - 1.0))
      else:  # heun
        c1 = alpha_t * ((jnp.exp(-h_s) - 1.0) / h_s + 1.0)
      prev = prev + jnp.where(use_first, 0.0, c1) * d1

    new_state = DPMSolverState(x0, jnp.minimum(state.lower_order_nums + 1, self.solver_order).astype(jnp.int32))
    return prev.astype(sample.dtype), new_state


def make_scheduler(name: str, config: dict, num_inference_steps: int):
  """Build a scheduler by name from any diffusers scheduler_config dict.

  Names: 'ddpm', 'ddim', 'euler', 'dpm_solver_multistep' (DPMSolverMultistepScheduler honouring the config's
  solver_order/solver_type/...), 'dpmpp_2m' (same with algorithm_type='dpmsolver++', solver_order=2 forced),
  'dpmpp_2m_karras' ('dpmpp_2m' with use_karras_sigmas=True). Karras sigmas for 'euler' / 'dpm_solver_multistep'
  / 'dpmpp_2m' come from the config key `use_karras_sigmas`.
  """
  name = name.lower()
  if name in ("dpmpp_2m", "dpmpp_2m_karras"):
    config = dict(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpmpp_2m_karras":
      config["use_karras_sigmas"] = True
    name = "dpm_solver_multistep"
  table = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
           "dpm_solver_multistep": DPMSolverMultistepScheduler}
  if name not in table:
    raise ValueError(f"unknown scheduler {name!r}; supported: {sorted(table) + ['dpmpp_2m', 'dpmpp_2m_karras']}")
  return table[name].from_config(config, num_inference_steps)
