"""Noise schedulers."""
from got_jax.diffusion.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverState,
                                          EulerDiscreteScheduler, TrainSchedule, make_scheduler)
