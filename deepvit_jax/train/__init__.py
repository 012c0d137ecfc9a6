"""Training: state, steps, loop, checkpoints (see loop.train_and_evaluate)."""
