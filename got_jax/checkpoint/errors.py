"""The one error type raised for unusable checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint file, folder or tensor cannot be used; the message names file, key and shapes."""
