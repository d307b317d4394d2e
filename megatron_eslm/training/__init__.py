"""Training: the step, optimizer and schedule, checkpoints, FLOPs accounting and logging."""
