"""Tensor (and sequence) parallelism: collectives as autograd functions, sharded layers, RNG streams and
the vocab-parallel selective LM head."""
