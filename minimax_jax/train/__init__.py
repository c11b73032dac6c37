"""Training: typed config, loss, jitted train step, orbax checkpoints, metrics and the training loop."""
