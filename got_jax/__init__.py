"""got-jax: GoT (Generation Chain-of-Thought) in JAX / Flax NNX.

Sub-packages:
  models.qwen2_5_vl  the reasoner (Qwen2.5-VL vision tower + M-RoPE decoder, decoding)
  models.sdxl        SDXL UNet (12-channel GoT input) and AutoencoderKL
  diffusion          noise schedulers (DDPM, DDIM, Euler, DPM-Solver++)
  got                GoT text, layouts, the Semantic-Spatial Guidance Module and pipeline
  data               records, TFDS builders, Grain pipelines, the synthetic shapes set
  checkpoint         tensor files, declarative name mapping, Orbax checkpoints
  sharding           logical axis names and mesh rules (the only place they are mapped)
"""

__version__ = "0.1.0"
