"""Pipeline parallelism: activations and gradients between adjacent stages, and micro-batch schedules."""
