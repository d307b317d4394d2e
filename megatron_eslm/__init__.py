"""megatron-eslm: Megatron-style GPT pretraining that trains only on the tokens that teach the model."""

__version__ = "0.1.0"
