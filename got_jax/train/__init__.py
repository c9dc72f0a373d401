"""Training: the trainable filter, losses, batch preparation and the sharded train step."""
