"""Command-line converters between released PyTorch checkpoints and got-jax's Orbax folders."""
